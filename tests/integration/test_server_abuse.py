"""Clients that hold connections open: a thousand idle sockets and slowloris clients against
a server in its own process (its log counted whole), on 127.0.0.1 only, bounded in time."""

from __future__ import annotations

import os
import pathlib
import resource
import socket
import subprocess
import sys
import threading
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[2]
IDLE = 1000
SLOW = 50
HEADER_S = 3.0


def _start(max_connections: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "integration" / "abuse_server.py"), str(max_connections),
                                str(HEADER_S)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    return process, int(process.stdout.readline())


def _stop(process: subprocess.Popen) -> str:
    process.stdin.close()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.stderr.read()


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed it (an answer, then end of stream, or a reset)."""
    try:
        while sock.recv(4096):
            pass
        return True
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def _served(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_idle_sockets_and_slowloris_clients_are_closed_while_new_clients_are_served():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))  # this process holds the sockets
    process, port = _start(max_connections=2 * IDLE)
    stop = threading.Event()
    slow: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(SLOW)]
        half = SLOW // 2  # half send headers a byte at a time, half stall their body below Content-Length

        def drip() -> None:
            request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
            body = b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
                   b"Content-Length: 1000\r\n\r\n{"
            for sock in slow[half:]:
                sock.sendall(body)
            for i in range(len(request)):
                if stop.wait(0.3):
                    return
                for sock in slow[:half]:
                    try:
                        sock.send(request[i:i + 1])
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        started = time.monotonic()
        assert _served(port), "a new client is served while 1,050 sockets are held"
        assert time.monotonic() - started < 2
        time.sleep(HEADER_S + 2)
        for sock in idle + slow:
            sock.settimeout(0.01)
        still_open = sum(not _closed_by_server(s) for s in idle + slow)
        assert still_open == 0, f"{still_open} held sockets still open {HEADER_S + 2:g} s after the deadline"
        assert _served(port)
    finally:
        stop.set()
        for sock in [*locals().get("idle", []), *slow]:
            sock.close()
        log = _stop(process)
    assert len(log.splitlines()) < 100, log[-2000:]


def test_past_the_cap_connections_are_refused_at_once_and_logged_once_per_interval():
    process, port = _start(max_connections=200)
    held: list[socket.socket] = []
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        time.sleep(0.5)
        for sock in held:
            sock.settimeout(0.01)
        refused = sum(_closed_by_server(s) for s in held)
        assert refused >= IDLE - 200 - 5, f"only {refused} of {IDLE - 200} over the cap were refused"
        time.sleep(HEADER_S + 1)  # the 200 that were taken pass their deadline
        assert _served(port), "served again once the idle ones were closed"
    finally:
        for sock in held:
            sock.close()
        log = _stop(process)
    lines = log.splitlines()
    assert len(lines) < 100 and sum("refused a connection" in line for line in lines) <= 2, log[-2000:]
