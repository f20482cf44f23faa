"""How long a refusal of a bad value takes, in a fresh process as a user meets it.

    python -m benchmarks.bad_input [--target 3.0]

Each case runs `python -m vramancer …` once and is timed from start to exit: imports, the
parse, the check, the sentence. The target (3 s each) holds when a wrong value is refused
before torch and the model are touched. Records the run (benchmarks/results/bad_input.json and
its table in docs/benchmarks.md), then exits 1 if any case misses the target or does not exit 2
with one line on stderr: a check as much as a benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.common import Result, cli, compare, missed

CASES: list[tuple[list[str], dict[str, str]]] = [
    (["generate", "--prompt", "hi", "--temperature", "nan"], {}),
    (["generate", "--prompt", "hi", "--top-p", "nan"], {}),
    (["generate", "--prompt", "hi", "--repetition-penalty", "inf"], {}),
    (["generate", "--prompt", "hi", "--seed", str(2**64)], {}),
    (["generate", "--raw", "--prompt", ""], {}),
    (["plan", "--threads", "99999"], {}),
    (["plan", "--context", str(10**15)], {}),
    (["plan"], {"VRM_CONTEXT": "abc"}),
    (["plan"], {"VRM_THREADS": "x"}),
    (["node"], {"VRM_NODE_PORT": "abc"}),
    (["plan", "--devices", "sim:99999999999x1GiB"], {}),
    (["plan", "--devices", "sim:0x1GiB"], {}),
    (["node", "--devices", "sim:1GiB", "--token-file", "/dev/zero", "--no-advertise"], {}),
    (["generate", "--prompt", "hi", "--temperature", "1e-300"], {}),
    (["plan", "--context", "\u0662"], {}),
    (["plan", "--devices", "sim:1GiB", "--devices", "sim:2GiB"], {}),
    (["plan", "--devices", "cpu,discover"], {"VRM_DISCOVER_SECONDS": "999999"}),
    (["plan"], {"VRM_CACHE_DIR": "/tmp/" + "c" * 300}),
]


def run(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    full_env.update(env)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vramancer", *args], capture_output=True, text=True, env=full_env,
                          timeout=120)
    return time.perf_counter() - started, done.returncode, done.stderr.strip()


def shown(args: list[str], env: dict[str, str]) -> str:
    """The case as a user would type it; a very long value by its length alone."""
    def short(value: str) -> str:
        return '""' if not value else value if len(value) <= 32 else f"<{len(value)} characters>"
    words = [f"{k}={short(v)}" for k, v in env.items()] + ["vramancer"] + [short(a) for a in args]
    return "`" + " ".join(words) + "`"


def bench(target: float = 3.0) -> Result:
    result = Result("bad_input", "Refusing a bad value: a fresh `python -m vramancer` process, start to exit",
                    {"cases": len(CASES), "target": f"exit 2, one line on stderr, under {target:g} s each"},
                    {"seconds": ("seconds", 2), "exit": ("exit status", 0), "lines": ("lines on stderr", 0)})
    good = 0
    for case_args, env in CASES:
        name = shown(case_args, env)
        seconds, status, stderr = run(case_args, env)
        lines = len(stderr.splitlines())
        result.add({name: [{"seconds": seconds, "exit": status, "lines": lines}]})
        if status == 2 and lines == 1:
            good += 1
        else:
            said = " / ".join(stderr[-300:].splitlines()) or "nothing on stderr"
            result.notes.append(f"{name} exited {status} with: {said}")
    slowest = max(result.contenders.values(), key=lambda m: m["seconds"]["median"])["seconds"]["median"]
    result.comparisons.append(compare("slowest refusal, s (absolute)", slowest, at_most=target))
    result.comparisons.append(compare("cases that exit 2 with one line on stderr, share (absolute)",
                                      good / len(CASES), at_least=1.0))
    return result


if __name__ == "__main__":
    result = cli(bench, __doc__, [("--target", float, 3.0, {"help": "seconds each refusal may take (default 3)"})])
    sys.exit(1 if missed(result) else 0)
