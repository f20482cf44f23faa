"""A compiled extension in a folder that is either complete or not used at all.

A build can be stopped at any point (kill -9, a closed terminal, a full disk), and several
processes can start at once. So:
- the compiler writes into a private folder (`.<key>.building-<pid>`); only when the module
  has compiled and imported is a manifest (its size and SHA-256) written and the folder renamed
  to `<key>`, in one step. A folder without a manifest is never loaded.
- one process builds at a time, holding an `flock` on `<key>.lock`. The kernel drops that lock
  when its holder dies, so a lock left by a dead process is simply taken; a live holder is
  waited for, up to a deadline.
- whoever takes the lock first removes what interrupted builds left behind.
- the compiler runs in a child process group that the builder kills when it stops, and that
  kills itself when the builder dies, so no ninja or g++ outlives the build.
- a module is checked against its manifest before it is loaded: a truncated or rewritten file
  is refused with one sentence instead of being mapped (a short file mapped crashes the
  process with SIGBUS when a page past its end is touched).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not locked against each other
    fcntl = None

log = logging.getLogger(__name__)

MANIFEST = "complete.json"
WAIT_SECONDS = 900.0  # how long to wait for another process's build (a full one takes minutes)
COMPILE_SECONDS = 1800.0  # how long our own compile may run
POLL_SECONDS = 0.2


class BuildFailed(Exception):
    """The module cannot be used; the message is one sentence saying why."""


def module_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.so"


def is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def verify(folder: Path, name: str) -> Path:
    """The module file of a complete `folder`, checked against its manifest, or BuildFailed."""
    path = module_file(folder, name)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected_size, expected_hash = int(manifest["bytes"]), str(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BuildFailed(f"the manifest of the compiled kernels in {folder} cannot be read ({type(exc).__name__})") from None
    try:
        size = path.stat().st_size
        if size != expected_size:
            raise BuildFailed(f"the compiled kernels {path} hold {size} bytes where {expected_size} were written")
        if file_hash(path) != expected_hash:
            raise BuildFailed(f"the compiled kernels {path} were changed after they were built")
    except OSError as exc:
        raise BuildFailed(f"the compiled kernels {path} cannot be read: {exc.strerror or exc}") from None
    return path


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_module(path: Path, name: str):
    """Import the extension at `path` (verified first by the caller)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def build_lock(path: Path, wait_seconds: float):
    """Hold an exclusive flock on `path`, waiting at most `wait_seconds` for another holder."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, said = time.monotonic() + wait_seconds, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                if time.monotonic() > deadline:
                    raise BuildFailed(f"process {holder} has been building the kernels in {path.parent} for over "
                                      f"{wait_seconds:g} s") from None
                if not said:
                    log.warning("waiting for process %s, which is compiling the CPU kernels", holder)
                    said = True
                time.sleep(POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def remove_leftovers(root: Path, key: str) -> None:
    """Folders of interrupted builds of `key`, and a `key` folder that never completed (an older
    layout, or one whose build was cut short). Called with the build lock held."""
    for leftover in root.glob(f".{key}.building-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    folder = root / key
    if folder.exists() and not is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)


def ensure_built(folder: Path, name: str, sources: list[Path], flags: list[str],
                 wait_seconds: float = WAIT_SECONDS, on_build=None) -> Path:
    """The verified module file in the complete `folder`, building it first if needed.
    `on_build()` is called just before this process starts compiling."""
    root, key = folder.parent, folder.name
    if is_complete(folder):
        try:
            return verify(folder, name)
        except BuildFailed as exc:  # damaged after it was built: never mapped, and not kept
            removed = _discard(folder)
            raise BuildFailed(f"{exc}; {'they were removed and' if removed else 'remove that folder:'} "
                              "the next run compiles them again") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildFailed(f"the kernel folder {root} cannot be made: {exc.strerror or exc}") from None
    try:
        with build_lock(root / f"{key}.lock", wait_seconds):
            if is_complete(folder):  # built by the process we waited for
                return verify(folder, name)
            remove_leftovers(root, key)
            if on_build is not None:
                on_build()
            work = root / f".{key}.building-{os.getpid()}"
            try:
                work.mkdir()
                compile_into(work, name, sources, flags)
                path = module_file(work, name)
                manifest = {"module": name, "bytes": path.stat().st_size, "sha256": file_hash(path)}
                (work / MANIFEST).write_text(json.dumps(manifest))
                os.rename(work, folder)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:
        raise BuildFailed(f"the kernels cannot be built in {root}: {exc.strerror or exc}") from None
    return verify(folder, name)


def _discard(folder: Path) -> bool:
    """Remove a complete folder found damaged, unless another process holds the build lock
    (it may be replacing it). Processes that mapped the module keep their copy."""
    try:
        with build_lock(folder.with_name(f"{folder.name}.lock"), wait_seconds=0):
            shutil.rmtree(folder)
        return True
    except (BuildFailed, OSError):
        return False


def compile_into(work: Path, name: str, sources: list[Path], flags: list[str]) -> None:
    """Compile and import-check the module in a child process group, killed if we stop first."""
    command = [sys.executable, __file__, str(work), name, " ".join(flags),
               *map(str, sources)]
    env = dict(os.environ, VRM_BUILD_PARENT=str(os.getpid()))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                             env=env)
    (work / "compiler.pid").write_text(str(child.pid))
    try:
        output, _ = child.communicate(timeout=COMPILE_SECONDS)
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"compiling the kernels took longer than {COMPILE_SECONDS:g} s") from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # ninja and g++ with it, whatever ended the wait
        child.wait()
    if child.returncode != 0:
        lines = output.decode(errors="replace").strip().splitlines()
        raise BuildFailed(f"the kernels could not be built ({lines[-1] if lines else f'exit {child.returncode}'})")


def _die_with_parent(parent: int) -> None:
    """In the compiling child: end the whole process group once the builder is gone (kill -9),
    so its ninja and g++ stop too."""
    def watch():
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _compile_here(work: str, name: str, flags: str, sources: list[str]) -> int:
    _die_with_parent(int(os.environ.get("VRM_BUILD_PARENT", os.getppid())))
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    try:
        load(name=name, sources=sources, extra_cflags=flags.split(), build_directory=work, verbose=False)
    except Exception as exc:  # no compiler, no ninja, no Python headers, a compile error
        text = str(exc).strip().splitlines()
        print(f"{type(exc).__name__}: {text[0] if text else ''}")
        return 1
    return 0


def _put_ninja_on_path() -> None:
    """torch's cpp_extension runs `ninja` from PATH; the copy our `ninja` dependency installs
    sits in the virtual environment's bin folder, on PATH only while the environment is active."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build then fails and says so
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


if __name__ == "__main__":  # the compiling child of `compile_into`
    sys.exit(_compile_here(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
