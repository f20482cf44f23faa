"""How long a refusal of a bad value takes, in a fresh process as a user meets it.

    python -m benchmarks.bad_input [--target 3.0]

Each case runs `python -m vramancer …` once and is timed from start to exit: imports, the
parse, the check, the sentence. The target (3 s each) holds when a wrong value is refused
before torch and the model are touched. Prints a markdown table on stdout; exits 1 if any
case misses the target or does not exit 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the refusal of bad values in fresh processes.")
    parser.add_argument("--target", type=float, default=3.0, help="seconds each refusal may take (default 3)")
    args = parser.parse_args(argv)
    print("| case | seconds | exit | stderr |")
    print("|---|---:|---:|---|")
    failed = 0
    for case_args, env in CASES:
        seconds, status, stderr = run(case_args, env)
        shown = " ".join(f"{k}={v}" for k, v in env.items()) + " vramancer " + " ".join(case_args)
        good = status == 2 and len(stderr.splitlines()) == 1 and seconds < args.target
        failed += not good
        print(f"| `{shown.strip()[:70]}` | {seconds:.2f} | {status} | {stderr[:90]} |{'' if good else ' **missed**'}")
    print(f"\n{len(CASES) - failed} of {len(CASES)} refused in under {args.target:g} s with one line and exit 2.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
