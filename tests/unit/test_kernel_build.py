"""The kernel build survives what users do to it (kernels/cpu/build_folder.py): kill -9 during a
build, a lock file left behind, two first runs at once, a truncated module. Each case runs
in its own processes on a tiny real C extension (a second or two to compile), the same path
the real kernels take."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TINY = textwrap.dedent("""
    #include <Python.h>
    static PyObject* answer(PyObject* self, PyObject* args) { return PyLong_FromLong(42); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "42"}, {NULL, NULL, 0, NULL}};
    static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny", NULL, -1, methods};
    PyMODINIT_FUNC PyInit_tiny(void) { return PyModule_Create(&tiny); }
""")

# One process's build: prints "built" if this process compiled, then the module's answer.
BUILD = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from vramancer.kernels.cpu import build_folder as b
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    folder, source = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        path = b.ensure_built(folder, "tiny", [source], ["-O0"], wait_seconds=float(sys.argv[3]),
                              on_build=lambda: print("built", flush=True))
    except b.BuildFailed as exc:
        print(f"refused: {exc}")
        sys.exit(3)
    print("answer", b.import_module(path, "tiny").answer())
""")


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    return tmp_path / "kernels" / "key0123", source


def start(folder: Path, source: Path, wait_seconds: float = 120) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen([sys.executable, "-c", BUILD, str(folder), str(source), str(wait_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=180)
    return process.returncode, output


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" if Path(f"/proc/{pid}").exists() else True


def test_kill_9_during_a_build_leaves_nothing_used_and_the_next_run_builds(tiny):
    folder, source = tiny
    first = start(folder, source)
    deadline = time.monotonic() + 60
    compiler = None
    while time.monotonic() < deadline and compiler is None:
        pid_files = list(folder.parent.glob(f".{folder.name}.building-*/compiler.pid"))
        if pid_files and pid_files[0].read_text():
            compiler = int(pid_files[0].read_text())
        time.sleep(0.02)
    assert compiler is not None, "the build never started"
    first.kill()  # kill -9, mid-compile
    first.wait()
    deadline = time.monotonic() + 15
    while alive(compiler) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(compiler), "the compiler outlived the build it was started for"
    assert not folder.exists()  # only a complete folder is ever named <key>

    status, output = finish(start(folder, source))
    assert status == 0, output
    assert "built" in output and "answer 42" in output
    assert not list(folder.parent.glob(".*.building-*")), "the interrupted build was not cleaned up"
    assert json.loads((folder / "complete.json").read_text())["module"] == "tiny"


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny):
    folder, source = tiny
    folder.parent.mkdir(parents=True)
    (folder.parent / f"{folder.name}.lock").write_text("99999999")  # as a killed build leaves it
    (folder.parent / f".{folder.name}.building-99999999").mkdir()
    folder.mkdir()  # an older layout's folder, never completed
    (folder / "tiny.so").write_bytes(b"\x7fELF half")
    status, output = finish(start(folder, source, wait_seconds=5))
    assert status == 0, output
    assert "answer 42" in output
    assert not (folder.parent / f".{folder.name}.building-99999999").exists()


def test_a_live_holder_is_waited_for_up_to_a_deadline(tiny):
    folder, source = tiny
    folder.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(folder.parent / (folder.name + '.lock'))!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("holding", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        status, output = finish(start(folder, source, wait_seconds=1))
    finally:
        holder.kill()
        holder.wait()
    assert status == 3, output
    assert f"refused: process {holder.pid} has been building the kernels" in output


def test_two_first_runs_at_once_compile_once(tiny):
    folder, source = tiny
    runs = [start(folder, source) for _ in range(2)]
    results = [finish(run) for run in runs]
    assert all(status == 0 and "answer 42" in output for status, output in results), results
    assert sum(output.count("built") for _, output in results) == 1, results


@pytest.fixture(scope="module")
def built_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """One complete build, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("built")
    source = root / "tiny.cpp"
    source.write_text(TINY)
    status, output = finish(start(root / "kernels" / "key0123", source))
    assert status == 0, output
    return root / "kernels" / "key0123", source


@pytest.mark.parametrize("damage", ["truncated", "rewritten", "no manifest"])
def test_a_damaged_module_is_refused_before_it_is_mapped(built_tiny, tmp_path, damage):
    folder = tmp_path / "kernels" / built_tiny[0].name
    shutil.copytree(built_tiny[0], folder)
    source = built_tiny[1]
    module = folder / "tiny.so"
    data = module.read_bytes()
    if damage == "truncated":
        module.write_bytes(data[: len(data) // 2])
    elif damage == "rewritten":
        module.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        (folder / "complete.json").unlink()
    status, output = finish(start(folder, source))
    if damage == "no manifest":  # an incomplete folder: rebuilt, then used
        assert status == 0 and "built" in output and "answer 42" in output, output
        return
    assert status == 3, output  # a signal would be negative: SIGBUS is -7
    line = output.strip().splitlines()[-1]
    words = "hold" if damage == "truncated" else "were changed after they were built"
    assert line.startswith("refused: the compiled kernels") and words in line, output
    assert line.endswith("they were removed and the next run compiles them again"), line
    status, output = finish(start(folder, source))  # the next run
    assert status == 0 and "built" in output and "answer 42" in output, output


def test_the_real_kernels_fall_back_with_one_sentence_when_damaged(tmp_path):
    """The product path: kernels() over a damaged folder gives None and one warning."""
    from vramancer.kernels.cpu import build as cpu_build

    script = textwrap.dedent("""
        import logging, torch
        from vramancer.kernels.cpu import build as b
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        b.installed_module = lambda: None  # the package's own build (make setup) would be taken first
        folder = b.build_dir()
        folder.mkdir(parents=True)
        (folder / "vramancer_quant_linear.so").write_bytes(b"\\x7fELF" + bytes(100))
        (folder / "complete.json").write_text('{"module": "vramancer_quant_linear", "bytes": 5000, "sha256": "0"}')
        print("module", b.kernels())
    """)
    env = dict(os.environ, VRM_KERNEL_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("VRM_CPU_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "module None" in done.stdout
    if not cpu_build.cpu_supports_kernels():
        return
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("our CPU kernels are unavailable (the compiled kernels") and "torch's kernels run" in lines[0]


def test_kernels_compiled_into_the_package_are_used_only_for_their_torch(tmp_path):
    """What `pip install` compiled (setup.py) is loaded where its key file names this torch and
    Python; a key of another build sends kernels() to the kernel folder instead."""
    from vramancer.kernels.cpu import build as cpu_build

    if cpu_build.kernels() is None:
        pytest.skip(f"kernels unavailable: {cpu_build.unavailable_reason()}")
    # A module built for this torch: the one the install compiled, else the kernel folder's.
    installed_now = cpu_build.installed_module()
    built = Path(installed_now.__file__) if installed_now is not None else cpu_build.build_dir() / "vramancer_quant_linear.so"
    if not built.is_file():
        pytest.skip("no compiled module of these sources to copy (neither installed nor in the kernel folder)")
    import sysconfig

    package = tmp_path / "package"
    package.mkdir()
    installed = package / f"vramancer_quant_linear{sysconfig.get_config_var('EXT_SUFFIX')}"
    shutil.copy(built, installed)
    script = textwrap.dedent(f"""
        import json, sys, torch
        import vramancer.kernels.cpu as package
        from vramancer.kernels.cpu import build as b
        package.__path__.insert(0, {str(package)!r})  # found before a module the checkout itself holds
        key = b.build_key(torch.__version__) if sys.argv[1] == "ours" else "0123456789abcdef"
        stamp = {{"key": key, "bytes": {installed.stat().st_size}}}
        open({str(package / 'vramancer_quant_linear.key')!r}, "w").write(json.dumps(stamp))
        module = b.installed_module()
        print("installed", None if module is None else module.__file__)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for which, expected in (("ours", str(installed)), ("another torch's", "None")):
        done = subprocess.run([sys.executable, "-c", script, which.split("'")[0]], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"installed {expected}", (which, done.stdout)
