"""The wire between a coordinator and a node: JSON lines for control, fixed headers for tensors.

Control (TCP, one JSON object per line, UTF-8): the admission handshake, the node's word that
the process group formed and its rendezvous store is shut, then requests with an `id` and their
replies, and the node's unsolicited telemetry samples. Nothing on this channel
is ever evaluated or unpickled: a message is a dict of strings, numbers, lists and dicts.

Tensors (torch.distributed send/recv on a two-rank process group, node rank 0, coordinator
rank 1): every exchange opens with an int64 header of HEADER_LEN slots whose first slot is the
operation; the sizes of what follows are in the header, so no side ever receives a size it did
not expect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import threading

import torch

from vramancer.config.errors import VramancerError
from vramancer.config.validation import read_token_file
from vramancer.platforms.devices import DeviceLost

PROTOCOL_VERSION = 2  # 2: the node confirms the group formed ("formed") before anything else
SERVICE_TYPE = "_vramancer._tcp.local."
DEFAULT_NODE_PORT = 7070
TOKEN_ENV = "VRM_CLUSTER_TOKEN"
MAX_LINE = 1 << 20  # a control message longer than this is refused: nothing legitimate is near it
HANDSHAKE_TIMEOUT_S = 10.0  # for the whole handshake, however slowly a peer trickles bytes
# A node holds its coordinator by a lease that any control message renews (an idle coordinator
# pings): one silent longer than this (stopped, cut off) is let go, and its memory freed.
DEFAULT_LEASE_S = 30.0
NODE_RANK, COORDINATOR_RANK = 0, 1
TAG = 0  # one ordered stream per direction is all we need

# --- tensor channel ----------------------------------------------------------------------

HEADER_LEN = 8
OP_RUN = 1  # [op, tokens, first, last, past, use_cache, positions_explicit, position_start]
OP_KV_PULL = 2  # [op, first, last]  → node answers a KV header, then keys/values per layer
OP_KV_PUSH = 3  # [op, first, last, tokens, kv_heads, head_dim, dtype, tokens seen] then keys/values per layer
OP_ECHO = 4  # [op, numel] then float32[numel], sent straight back
OP_BYE = 5  # the coordinator is done with this process group

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype)


def header(*values: int) -> torch.Tensor:
    slots = list(values) + [0] * (HEADER_LEN - len(values))
    return torch.tensor(slots, dtype=torch.int64)


# --- errors ------------------------------------------------------------------------------


class ClusterError(VramancerError):
    """A node could not be reached, refused a request, or answered something we cannot use."""


class AdmissionRefused(ClusterError):
    """The node and this coordinator do not share the cluster token."""


class NodeLost(ClusterError, DeviceLost):
    """A node died or stopped answering while we depended on it: the engine's DeviceLost."""

    def __init__(self, node: str, reason: str):
        DeviceLost.__init__(self, node, reason)
        self.node = node


# --- the shared secret -------------------------------------------------------------------


def cluster_token(token_file: str | None = None) -> bytes | None:
    """The cluster's secret: the --token-file's contents, else VRM_CLUSTER_TOKEN, else None."""
    if token_file:
        try:
            return read_token_file(token_file)
        except VramancerError as exc:
            raise ClusterError(str(exc)) from None
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token.encode() if token else None


def new_nonce() -> str:
    return secrets.token_hex(32)


def coordinator_proof(token: bytes, node_nonce: str, coordinator_nonce: str) -> str:
    """What the coordinator shows to be admitted: HMAC-SHA256 over both nonces, role-tagged."""
    message = f"vramancer/{PROTOCOL_VERSION}/coordinator|{node_nonce}|{coordinator_nonce}".encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def node_proof(token: bytes, node_nonce: str, coordinator_nonce: str) -> str:
    """What the node shows back, so a coordinator never hands layers to an impostor."""
    message = f"vramancer/{PROTOCOL_VERSION}/node|{coordinator_nonce}|{node_nonce}".encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def proof_matches(expected: str, offered: object) -> bool:
    # compare_digest refuses str with non-ASCII characters (TypeError): such a proof is just wrong
    return isinstance(offered, str) and offered.isascii() and hmac.compare_digest(expected, offered)


# --- JSON lines --------------------------------------------------------------------------


class LineChannel:
    """JSON objects, one per line, over a connected socket; safe to send from several threads."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send(self, message: dict) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._send_lock:
            self.sock.sendall(data)

    def receive(self) -> dict | None:
        """The next message, or None when the connection is closed (by the peer or by us)."""
        try:
            line = self._reader.readline(MAX_LINE + 1)
        except ValueError:  # our own end was closed meanwhile
            return None
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise ClusterError("a control message was too long or cut short.")
        try:
            message = json.loads(line)
        except ValueError:
            raise ClusterError("a control message was not JSON.") from None
        if not isinstance(message, dict):
            raise ClusterError("a control message was not a JSON object.")
        return message

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._reader.close()
        finally:
            self.sock.close()
