"""A bare server (no model: /metrics answers) with short deadlines, in a process of its own,
for tests/integration/test_server_abuse.py: it prints its port, then serves until stdin closes. Its
stderr is the server's whole log."""

from __future__ import annotations

import sys

from vramancer.server.connections import Limits
from vramancer.server.service import InferenceServer

if __name__ == "__main__":
    max_connections, header_s = int(sys.argv[1]), float(sys.argv[2])
    server = InferenceServer(limits=Limits(max_connections=max_connections, keep_alive_s=header_s,
                                           header_s=header_s, body_s=header_s, log_interval_s=10.0))
    print(server.start("127.0.0.1", 0), flush=True)
    sys.stdin.read()  # the test closes it to stop us
    server.stop()
