"""How the long-running commands (the dashboard, `node`, `serve`) end.

A terminal closing, `kill`, a process manager's stop or an outside SIGINT all mean the same:
stop gracefully now. A process that has not finished within the deadline is ended anyway, so an
orphan never keeps burning a core after its terminal is gone.

A terminal that goes away does not always signal us: when `make` (or any program other than a
shell) is the session leader, only that leader gets SIGHUP. Its file descriptors then fail with
EIO, which `terminal_lost` checks for.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from typing import Callable, NoReturn

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
DEADLINE_S = 1.2  # graceful stop first; forced exit after this, inside the 2 s users are promised

# Leave the alternate screen, show the cursor, stop mouse reporting: what a full-screen app
# turned on, for the forced path, when the app could not undo it itself.
_RESET_SCREEN = b"\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1015l\x1b[?2004l\x1b[?25h\x1b[?1049l"


class Lifetime:
    """Ends a long-running command: `stop` is asked once, then the deadline is enforced."""

    def __init__(self, stop: Callable[[str], None], deadline_s: float = DEADLINE_S,
                 exit_status: int = 0) -> None:
        self._stop = stop
        self._deadline_s = deadline_s
        self._exit_status = exit_status
        self._ending = threading.Event()
        self._previous: dict[int, object] = {}
        self._terminal_fds = [fd for fd in (0, 1, 2) if _is_tty(fd)]
        self._terminal_modes = _terminal_modes(self._terminal_fds)

    @property
    def ending(self) -> bool:
        return self._ending.is_set()

    def install(self) -> "Lifetime":
        """Take SIGTERM, SIGHUP and SIGINT (main thread only). A signal the parent set to be
        ignored (`nohup`) stays ignored."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def end(self, reason: str) -> None:
        """Ask for a graceful stop (once) and start the deadline."""
        if self._ending.is_set():
            return
        self._ending.set()
        log.info("stopping: %s", reason)
        timer = threading.Timer(self._deadline_s, self._force_exit, args=(reason,))
        timer.daemon = True
        timer.name = "vramancer-deadline"
        timer.start()
        self._stop(reason)

    def terminal_lost(self) -> bool:
        """True once the terminal we started on has hung up (its descriptors fail with EIO)."""
        for fd in self._terminal_fds:
            try:
                os.tcgetpgrp(fd)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.ENXIO, errno.EBADF):
                    return True
        return False

    def watch_terminal(self, interval_s: float = 0.25) -> None:
        """Poll the terminal from a daemon thread and end when it hangs up. A no-op without one."""
        if not self._terminal_fds:
            return

        def watch() -> None:
            while not self._ending.wait(interval_s):
                if self.terminal_lost():
                    self.end("terminal closed")
                    return

        threading.Thread(target=watch, name="vramancer-terminal-watch", daemon=True).start()

    def _on_signal(self, signum: int, frame) -> None:
        self.end(signal.Signals(signum).name)

    def _force_exit(self, reason: str) -> None:
        """The graceful stop overran its deadline: put the terminal back if it is still there,
        then end the process. Memory, threads and device allocations go with it."""
        if self._terminal_modes and not self.terminal_lost():
            _restore_terminal(self._terminal_modes)
        try:
            sys.stderr.write(f"vramancer: stopped ({reason}); the graceful stop took longer than "
                             f"{self._deadline_s:g} s.\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # no terminal left to tell
        os._exit(self._exit_status)


def exit_now(status: int) -> NoReturn:
    """End the process once its work is done, skipping the interpreter's teardown: with a model
    loaded that teardown took 2-10 s here to free what the OS frees at once, and no deadline
    timer can run during it. Only for the CLI's own process, never a library caller's."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(status)


def _is_tty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _terminal_modes(fds: list[int]) -> dict[int, list]:
    try:
        import termios
    except ImportError:  # not on POSIX: nothing to restore
        return {}
    modes = {}
    for fd in fds:
        try:
            modes[fd] = termios.tcgetattr(fd)
        except (OSError, termios.error):
            pass
    return modes


def _restore_terminal(modes: dict[int, list]) -> None:
    import termios

    for fd, mode in modes.items():
        try:
            termios.tcsetattr(fd, termios.TCSANOW, mode)
        except (OSError, termios.error):
            pass
    try:
        os.write(next(iter(modes)), _RESET_SCREEN)  # every descriptor is the same terminal
    except OSError:
        pass
