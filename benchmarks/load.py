"""Start-up: time from process start to the first token, and the process's peak RSS.

Each run is a fresh process: plain transformers loading the GGUF (`benchmarks/plain_load.py`)
vs `vramancer generate --json` on a 2-way simulated split, first with an empty cache (first
start: it reads the GGUF and fills the cache) and then with the cache filled (every later
start). Every VRAMancer run shares the compiled CPU kernels already built here (`make setup`
builds them once, 2-3 minutes, before any start), so a first start is the first load of the
model, not the first build of the kernels. Both are asked for one new token, and both print their JSON as soon as they have it;
the time is from just before the process is spawned to the first byte it writes to stdout.
Peak RSS is the child's own high-water mark since exec (VmHWM, read as its answer arrives):
ru_maxrss would count the benchmark's own pages, which the child shares between fork and exec.

    python -m benchmarks.load [--rounds 5]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PROMPT, Result, alternate, cli, say

DEVICES = "sim:2x1GiB"
PLAIN = "plain transformers, GGUF"
FIRST = "VRAMancer, first start (empty cache)"
LATER = "VRAMancer, later start (cache filled)"


def run_child(argv: list[str], env: dict) -> dict:
    """Spawn, time the first byte of stdout, and read the child's peak RSS."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env)
        first = proc.stdout.read(1)
        first_byte = time.perf_counter() - start
        peak = _peak_rss(proc.pid)  # the answer is out: the peak is behind us, the process still alive
        rest = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not first:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(argv[:3])} … failed ({proc.returncode}): {stderr.read().decode()[-2000:]}")
    if peak is None:  # no /proc: ru_maxrss, which on Linux would also count the parent's pages at fork
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = json.loads(first + rest)
    return {"ttft_from_start_s": first_byte, "peak_rss_mib": peak / 2**20, "in_process_ttft_s": out["ttft_s"],
            "first_token": out["token_ids"][0]}


def _peak_rss(pid: int) -> int | None:
    """VmHWM: the high-water mark of the process's memory since its exec, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def vramancer_argv() -> list[str]:
    script = Path(sys.executable).with_name("vramancer")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "vramancer"]
    return head + ["generate", "--json", "--devices", DEVICES, "--max-new-tokens", "1", "--prompt", PROMPT,
                   "--weights", "native"]


def bench(rounds: int = 5) -> Result:
    from vramancer.config.paths import CACHE_ENV
    from vramancer.kernels.cpu import build as cpu_kernels
    from vramancer.model.source import bundled_model_path

    result = Result(
        "load", "Start-up: process start → first token, and peak RSS (fresh process per run)",
        {"rounds": rounds, "VRAMancer devices": DEVICES, "new tokens": 1},
        {"ttft_from_start_s": ("start → first token, s", 2), "peak_rss_mib": ("peak RSS, MiB", 0),
         "in_process_ttft_s": ("of which the first token itself, s", 3)},
    )
    path = bundled_model_path()
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    if cpu_kernels.kernels() is not None:  # built now if they were not: not on any start's clock
        env[cpu_kernels.KERNEL_DIR_ENV] = str(cpu_kernels.build_dir().parent)
    plain_argv = [sys.executable, str(Path(__file__).with_name("plain_load.py")), str(path.parent), path.name, PROMPT]
    scratch = Path(tempfile.mkdtemp(prefix="vramancer-bench-load-"))
    filled = scratch / "filled"
    first_tokens: dict[str, set[int]] = {}

    def plain():
        return keep(PLAIN, run_child(plain_argv, env))

    def first_start():
        empty = Path(tempfile.mkdtemp(prefix="empty-", dir=scratch))
        try:
            return keep(FIRST, run_child(vramancer_argv(), dict(env, **{CACHE_ENV: str(empty)})))
        finally:
            shutil.rmtree(empty, ignore_errors=True)

    def later_start():
        return keep(LATER, run_child(vramancer_argv(), dict(env, **{CACHE_ENV: str(filled)})))

    def keep(name: str, sample: dict) -> dict:
        first_tokens.setdefault(name, set()).add(sample.pop("first_token"))
        return sample

    try:
        say("load: filling a cache for the later starts")
        run_child(vramancer_argv(), dict(env, **{CACHE_ENV: str(filled)}))
        result.add(alternate({PLAIN: plain, FIRST: first_start, LATER: later_start}, rounds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name in (FIRST, LATER):
        short = name.split(" (")[0]
        result.ratio(f"{short}: start → first token ÷ plain", name, PLAIN, "ttft_from_start_s", False,
                     at_most=0.5 if name == LATER else 1.0)
        result.ratio(f"{short}: peak RSS ÷ plain", name, PLAIN, "peak_rss_mib", False, at_most=1.2)
    agree = len(set().union(*first_tokens.values())) == 1
    result.settings["same first token"] = "yes" if agree else f"NO: {first_tokens}"
    return result


if __name__ == "__main__":
    cli(bench, __doc__, [("--rounds", int, 5)])
