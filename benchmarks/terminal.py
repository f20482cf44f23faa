"""The dashboard as a person starts, leaves idle and quits it: `python -m vramancer` in a
pseudo-terminal of a given size, its screen output read as a terminal would.

- first frame: from starting the process to the first screen output that draws the header.
- loaded: until the events log shows the first plan.
- idle CPU: the process's CPU time (every thread) over a window with the model loaded and
  nothing to do, as a share of one core.
- quit: from sending ctrl+q to the process having exited (back at the shell).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CTRL_Q = b"\x11"


class Session:
    """One dashboard process on a pseudo-terminal; its output is drained continuously (a
    terminal that stops reading would stall the App)."""

    def __init__(self, args: list[str], size: tuple[int, int]) -> None:
        self.started = time.perf_counter()
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the dashboard
            os.chdir(REPO)
            os.execv(sys.executable, [sys.executable, "-m", "vramancer", *args])
        columns, rows = size
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.screen = b""
        self.status: int | None = None

    def read(self, seconds: float) -> None:
        """Take the output for `seconds` (or until the process exits)."""
        deadline = time.perf_counter() + seconds
        while self.status is None and time.perf_counter() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.01)
            if ready:
                try:
                    self.screen += os.read(self.fd, 1 << 16)
                except OSError:
                    pass
            self._reap()

    def until(self, text: bytes, timeout: float) -> float:
        """Seconds since start when `text` first appears in the output."""
        while text not in self.screen:
            if self.status is not None or time.perf_counter() - self.started > timeout:
                raise TimeoutError(f"the dashboard never showed {text!r} (status {self.status})")
            self.read(0.01)
        return time.perf_counter() - self.started

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def quit(self, timeout: float = 30.0) -> float:
        """Press ctrl+q; seconds until the process has exited."""
        pressed = time.perf_counter()
        os.write(self.fd, CTRL_Q)
        while self.status is None:
            if time.perf_counter() - pressed > timeout:
                self.kill()
                raise TimeoutError(f"the dashboard was still running {timeout:.0f} s after ctrl+q")
            self.read(0.005)
        return time.perf_counter() - pressed

    def _reap(self) -> None:
        if self.status is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            self.status = -9
        os.close(self.fd)


def session(args: list[str], size: tuple[int, int], idle_s: float, load_timeout: float = 300.0) -> dict:
    """Start, load, idle, quit: the four figures of one run."""
    run = Session(args, size)
    try:
        first_frame = run.until(b"VRAMancer", load_timeout)
        loaded = run.until(b"plan (", load_timeout)
        run.read(2.0)  # the first readings and the layout settle
        cpu0, wall0 = run.cpu_seconds(), time.perf_counter()
        run.read(idle_s)
        idle_cpu = (run.cpu_seconds() - cpu0) / (time.perf_counter() - wall0) * 100
        quit_s = run.quit()
    finally:
        run.kill()
    return {"first_frame_s": first_frame, "loaded_s": loaded, "idle_cpu_pct": idle_cpu, "quit_s": quit_s,
            "exit_status": run.status}
