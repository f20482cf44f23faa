"""Caches only save time: a cache folder that cannot be written is said once and the run goes
on with the same tokens; what a killed writer left behind is cleaned; a damaged piece that
cannot be replaced is said once, as a stuck cache, not rebuilt in silence."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vramancer.model import source as sources
from vramancer.model import weights_cache as cache

PROMPT = "Tell me about the sea."


def greedy_tokens(model_dir: str) -> list[int]:
    from vramancer.engine import Engine

    engine = Engine.load(model_dir, "sim:2x1GiB", context=256)
    try:
        return engine.generate(PROMPT, max_new_tokens=8).token_ids
    finally:
        engine.close()


def profile_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "vramancer.profiling.timing" and "cannot be written" in r.getMessage()]


@pytest.fixture
def fresh_profile_warnings(monkeypatch):
    """Each test starts with no profile-cache warning given yet in this process."""
    from vramancer.profiling import timing as profiler

    monkeypatch.setattr(profiler, "_CACHE_WARNED", set())


def test_a_cache_dir_that_is_a_file_warns_once_and_gives_the_same_tokens(tiny_model_dir, tmp_path, monkeypatch,
                                                                          caplog, fresh_profile_warnings):
    monkeypatch.setenv("VRM_CACHE_DIR", str(tmp_path / "usable"))
    expected = greedy_tokens(tiny_model_dir)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VRM_CACHE_DIR", str(blocker))
    caplog.set_level(logging.WARNING)
    assert greedy_tokens(tiny_model_dir) == expected  # every timing it could not keep: one word
    warnings = profile_warnings(caplog)
    assert len(warnings) == 1 and "Not a directory" in warnings[0], warnings


@pytest.mark.parametrize("where", ["under a file", "HOME is a file"])
def test_an_unwritable_cache_location_only_costs_time(where, tiny_model_dir, tmp_path, monkeypatch, caplog,
                                                      fresh_profile_warnings):
    """As root nothing is unwritable by permission; a path through a regular file is, for anyone."""
    from vramancer.config.options import LoadOptions
    from vramancer.engine.loader import prepare

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if where == "under a file":
        monkeypatch.setenv("VRM_CACHE_DIR", str(blocker / "cache"))
    else:
        monkeypatch.delenv("VRM_CACHE_DIR")
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setenv("HOME", str(blocker))
    caplog.set_level(logging.WARNING)
    prepared = prepare(LoadOptions(tiny_model_dir, "sim:2x1GiB", context=256))
    assert prepared.pricing.predict(prepared.plan("proportional").placement).tokens_per_s > 0
    assert len(profile_warnings(caplog)) == 1, caplog.text


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_folders_of_writers_that_died_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("VRM_CACHE_DIR", str(tmp_path))
    source = sources.resolve_model("default")
    entry = tmp_path / "gguf" / f"{Path(source.gguf_file).stem}-{cache.gguf_key(Path(source.location) / source.gguf_file)}"
    dead = entry / f".weights-float32-{_dead_pid()}-abc123"
    alive = entry / f".weights-bfloat16-{os.getpid()}-def456"  # a writer still at work
    old = entry / ".tokenizer-k9x2"  # an older name without a pid, untouched for two days
    for folder in (dead, alive, old):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    assert cache.gguf_cache_entry(source.gguf_path) == entry
    assert not dead.exists() and not old.exists()
    assert alive.exists()


@pytest.fixture
def small_file_limit():
    """Files may grow to 1 MiB only (as on a full disk): writing more fails with EFBIG."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))

    try:
        yield apply
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_damaged_piece_that_cannot_be_replaced_is_said_once_as_a_stuck_cache(tmp_path, caplog, monkeypatch,
                                                                               small_file_limit):
    monkeypatch.setattr(cache, "_WARNED", set())
    monkeypatch.setattr(cache, "_DAMAGED", set())
    entry = tmp_path / "entry"
    piece = "weights-float32"

    def write(folder: Path) -> None:
        (folder / cache.WEIGHTS_FILE).write_bytes(os.urandom(2 << 20))

    def read(folder: Path) -> bytes:
        return (folder / cache.WEIGHTS_FILE).read_bytes()

    assert cache.store(entry, piece, write)
    weights = entry / piece / cache.WEIGHTS_FILE
    with weights.open("r+b") as f:  # one flipped byte
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    caplog.set_level(logging.WARNING)
    small_file_limit()
    for _ in range(3):  # three loads, each finding the piece damaged or missing and rebuilding it
        assert cache.from_cache(entry, piece, read) is None
        assert not cache.store(entry, piece, write)
    stuck = [r.getMessage() for r in caplog.records if "the cache is stuck" in r.getMessage()]
    assert len(stuck) == 1, caplog.text
    assert piece in stuck[0] and "File too large" in stuck[0]
    assert not [p for p in entry.iterdir() if p.name.startswith(".")]  # no staging left behind


# --- values read back from the profile cache are checked like any input -------------------------


@pytest.mark.parametrize("bad", [None, "fast", float("nan"), float("inf"), -1.0, True, [0.1]],
                         ids=["null", "text", "NaN", "Infinity", "negative", "true", "a list"])
def test_a_cached_timing_that_is_no_duration_is_a_miss_said_once(bad, tmp_path, caplog, fresh_profile_warnings):
    from dataclasses import asdict

    from vramancer.planning.pricing import DeviceTimings
    from vramancer.profiling import timing as profiler

    good = DeviceTimings(1e-4, 1e-8, 2e-5, 1e-5, 3e-4, 1e-5, "host CPU")
    path = tmp_path / "timings.json"
    profiler.write_cached(path, good)
    assert profiler.read_cached(path) == good
    path.write_text(json.dumps({**asdict(good), "layer_decode_s": bad}))  # json writes NaN and Infinity as such
    caplog.set_level(logging.WARNING)
    assert profiler.read_cached(path) is None
    assert profiler.read_cached(path) is None
    said = [r.getMessage() for r in caplog.records if "ignoring the cached timings" in r.getMessage()]
    assert len(said) == 1 and "layer_decode_s" in said[0], said
    overhead = tmp_path / "step.json"
    overhead.write_text(json.dumps({"step_overhead_s": bad}))
    assert profiler._read_float(overhead) is None
    overhead.write_text(json.dumps({"step_overhead_s": 0.002}))
    assert profiler._read_float(overhead) == 0.002
    assert not list(tmp_path.glob(".*.tmp")), "a temporary of the cache write was left behind"


def test_timings_with_missing_or_unknown_fields_are_a_miss(tmp_path, fresh_profile_warnings):
    from vramancer.profiling import timing as profiler

    path = tmp_path / "timings.json"
    for text in ('{"layer_decode_s": 0.1}', "[1, 2]", "{not json", "[" * 100_000):
        path.write_text(text)
        assert profiler.read_cached(path) is None, text


# --- signals during a cache write: the temporary folder goes with them ----------------------------


STORE_UNDER_SIGNAL = """
import os, signal, sys, time
from pathlib import Path
from vramancer.cli.main import _Stopped, _stop_on_signals
from vramancer.model.weights_cache import store

entry, signum = Path(sys.argv[1]), getattr(signal, sys.argv[2])
_stop_on_signals()

def write(folder):
    (folder / "model.safetensors").write_bytes(b"\\0" * (1 << 20))
    os.kill(os.getpid(), signum)  # as `kill -TERM` from a shell would, mid-write
    time.sleep(30)

try:
    store(entry, "weights-float32-native", write)
except _Stopped as stop:
    print("stopped by", signal.Signals(stop.signum).name)
print("left:", sorted(p.name for p in entry.iterdir()))
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_a_cache_write_leaves_no_temporary(signum, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-c", STORE_UNDER_SIGNAL, str(tmp_path), signum], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"stopped by {signum}", "left: []"], done.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_generate_stopped_by_a_signal_says_one_line(signum, tiny_model_dir):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    process = subprocess.Popen([sys.executable, "-m", "vramancer", "generate", "--model", tiny_model_dir, "--devices",
                                "sim:2x1GiB", "--context", "4096", "--max-new-tokens", "4000", "--prompt", "hi"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.read(1), "no answer streamed"  # loaded and generating: stop it mid-answer
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("\r")]
    assert process.returncode == 128 + signum, err
    assert lines[-1:] == [f"vramancer: stopped by {signal.Signals(signum).name}."] and "Traceback" not in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any folder: mode 000 stops only other users")
def test_a_cache_folder_this_user_cannot_search_is_one_sentence(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), VRM_CACHE_DIR=str(locked / "cache"))
        done = subprocess.run([sys.executable, "-m", "vramancer", "plan", "--devices", "sim:2x1GiB"],
                              capture_output=True, text=True, timeout=120, env=env)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"vramancer: the cache folder {locked / 'cache'} cannot be used: Permission denied; change VRM_CACHE_DIR."]
