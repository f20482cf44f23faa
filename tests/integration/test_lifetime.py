"""The long-running commands end when their terminal goes away or a signal asks them to:
no orphan is left behind `make run` burning a core."""

from __future__ import annotations

import fcntl
import os
import pathlib
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DEADLINE_S = 2.0  # what the README promises: gone within 2 s


def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of the session `sid`: the process tree `make run` started."""
    alive = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue  # exited while we looked
        fields = stat[stat.rfind(b")") + 2:].split()  # the name may hold spaces and parentheses
        if len(fields) > 3 and fields[0] != b"Z" and int(fields[3]) == sid:
            alive.append(int(entry.name))
    return alive


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _gone_within(sid: int, leader: subprocess.Popen, deadline_s: float) -> float | None:
    """Seconds until every process of the session has exited, or None past the deadline."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        leader.poll()  # reap make itself, or it lingers as a zombie
        if not _session_processes(sid):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


class Terminal:
    """A pseudo-terminal with a program as its session leader, as a terminal window runs one."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 40, cols: int = 120) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(rows, cols))
        self.output = bytearray()
        self._lock = threading.Lock()

        def become_terminal_owner() -> None:  # runs in the child, after setsid
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # A shell's foreground job takes SIGINT; a suite run as a background job would
            # hand its children SIGINT ignored, which the product rightly keeps (as `nohup`).
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                                        start_new_session=True, preexec_fn=become_terminal_owner)
        os.close(slave)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        """Read what the program writes, as a terminal does, so its writes never block."""
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.1)
                if ready:
                    chunk = os.read(self.master, 65536)
                    if not chunk:
                        return
                    with self._lock:
                        self.output += chunk
            except OSError:
                return  # closed: the terminal is gone

    def wait_for(self, text: bytes, timeout_s: float) -> bool:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            with self._lock:
                if text in self.output:
                    return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Close the master side: the terminal window goes away."""
        os.close(self.master)


def _winsize(rows: int, cols: int) -> bytes:
    import struct

    return struct.pack("HHHH", rows, cols, 0, 0)


@pytest.fixture
def make_run(tiny_model_dir):
    """`make run` in a fresh terminal, on the tiny model, its first frame drawn."""
    if not (REPO / ".venv" / ".setup-done").exists():
        pytest.skip("`make setup` has not run in this checkout (make test runs it)")
    env = {**os.environ, "VRM_MODEL": tiny_model_dir, "VRM_DEVICES": "sim:2x1GiB", "TERM": "xterm-256color"}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    terminal = Terminal(["make", "--no-print-directory", "run"], env)
    # The header's "needs" line appears once the plan is drawn: the model is loaded and placed.
    if not terminal.wait_for(b"needs", timeout_s=120):
        terminal.process.kill()
        pytest.fail(f"the dashboard did not come up; it wrote: {bytes(terminal.output[-2000:])!r}")
    yield terminal
    for pid in _session_processes(terminal.process.pid):
        os.kill(pid, signal.SIGKILL)


def _dashboard_pid(terminal: Terminal) -> int:
    for pid in _session_processes(terminal.process.pid):
        if "vramancer" in _cmdline(pid) and pid != terminal.process.pid:
            return pid
    raise AssertionError("no vramancer process under make")


def test_closing_the_terminal_ends_make_run(make_run):
    make_run.close()
    took = _gone_within(make_run.process.pid, make_run.process, DEADLINE_S)
    assert took is not None, f"still running {DEADLINE_S} s after the terminal closed: " \
                             f"{[_cmdline(pid) for pid in _session_processes(make_run.process.pid)]}"


def test_sigterm_to_make_ends_the_dashboard(make_run):
    make_run.process.send_signal(signal.SIGTERM)
    took = _gone_within(make_run.process.pid, make_run.process, DEADLINE_S)
    assert took is not None, "make run outlived SIGTERM"


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_a_signal_to_the_dashboard_ends_it_and_restores_the_terminal(make_run, signum):
    os.kill(_dashboard_pid(make_run), signum)
    took = _gone_within(make_run.process.pid, make_run.process, DEADLINE_S)
    assert took is not None, f"the dashboard outlived {signal.Signals(signum).name}"
    # Textual left the alternate screen on its way out: the shell's screen is back.
    assert make_run.wait_for(b"\x1b[?1049l", timeout_s=0.5)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_node_stops_and_withdraws_its_advertisement_on_a_signal(tmp_path, signum):
    from cluster_nodes import start_nodes

    (node,) = start_nodes(tmp_path, 1, advertise=True)
    try:
        node.wait_for_log("advertised")
        start = time.monotonic()
        node.process.send_signal(signum)
        assert node.process.wait(timeout=DEADLINE_S + 5) == 0
        assert time.monotonic() - start < DEADLINE_S
        log = node.log()
        assert "withdrawn" in log and log.rstrip().endswith("vramancer node: stopped"), log
    finally:
        node.stop()


LIFETIME_SCRIPT = """
import sys, threading, time
from vramancer.platforms.lifetime import Lifetime

stopped = threading.Event()
graceful = sys.argv[1] == "graceful"
lifetime = Lifetime(lambda reason: stopped.set() if graceful else None).install()
print("ready", flush=True)
while not stopped.wait(0.05):
    pass
print("stopped gracefully", flush=True)
"""


@pytest.mark.parametrize("graceful", [True, False])
def test_a_stop_that_overruns_its_deadline_is_forced(graceful):
    process = subprocess.Popen([sys.executable, "-c", LIFETIME_SCRIPT, "graceful" if graceful else "stuck"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout.readline().strip() == "ready"
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=DEADLINE_S + 5)
    took = time.monotonic() - start
    assert process.returncode == 0
    assert took < DEADLINE_S
    if graceful:
        assert "stopped gracefully" in out and err == ""
    else:
        assert "stopped gracefully" not in out
        assert "graceful stop took longer" in err


def test_an_ignored_hangup_stays_ignored():
    """Under `nohup` a hang-up must not stop the program."""
    code = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "from vramancer.platforms.lifetime import Lifetime\n"
            "Lifetime(lambda reason: None).install()\n"
            "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["True", "True"]
