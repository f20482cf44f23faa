"""Starting and stopping real `vramancer node` processes on 127.0.0.1 for the cluster tests."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN = "correct horse battery staple"
START_TIMEOUT_S = 90.0


@dataclass
class NodeProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def label(self) -> str:
        return f"node:127.0.0.1:{self.port}"

    def device(self, name: str = "sim0") -> str:
        return f"{self.label}/{name}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared in the node's log:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_nodes(folder: Path, count: int, devices: str = "sim:1GiB", token: str | None = TOKEN,
                advertise: bool = False) -> list[NodeProcess]:
    """Start `count` nodes at once (each on a free port it picks) and wait for all to serve."""
    env = dict(os.environ)
    env.pop("VRM_CLUSTER_TOKEN", None)
    if token is not None:
        env["VRM_CLUSTER_TOKEN"] = token
    started = []
    try:
        for index in range(count):
            log_path = folder / f"node-{index}-{time.monotonic_ns()}.log"
            command = [sys.executable, "-m", "vramancer", "node", "--devices", devices, "--port", "0",
                       "--bind", "127.0.0.1"] + ([] if advertise else ["--no-advertise"])
            with open(log_path, "w") as log:
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            started.append(NodeProcess(process, 0, log_path))
        for node in started:
            node.port = _read_port(node)
        return started
    except BaseException:
        for node in started:
            node.stop()
        raise


def _read_port(node: NodeProcess) -> int:
    selector = selectors.DefaultSelector()
    selector.register(node.process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = node.process.stdout.readline()
                match = re.search(r"on node:127\.0\.0\.1:(\d+)", line)
                if match:
                    return int(match.group(1))
                if not line and node.process.poll() is not None:
                    break
            elif node.process.poll() is not None:
                break
    finally:
        selector.close()
    raise AssertionError(f"the node did not start serving:\n{node.log()}")
