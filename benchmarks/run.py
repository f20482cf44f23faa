"""`make bench`: every benchmark, one JSON file and one markdown table.

    python -m benchmarks.run [--only decode,load,transfer,dashboard,batching,serve,offload,scale,gguf_start] [--rounds N]

Each benchmark runs in a fresh process of its own. Writes benchmarks/results/bench-<UTC
time>.json and .md, and copies them to latest.json and latest.md; prints the markdown on
stdout (progress goes to stderr). About 8 minutes on two cores, 10 more for `scale`, and 2 for `gguf_start` (once llama.cpp's tools
are built; its first run also makes its GGUF). Results are only as quiet as
the machine: re-run if other work shared the CPU (the min–max ranges show it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import Result, machine, machine_line, say

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = ("decode", "quantized", "load", "transfer", "dashboard", "batching", "serve", "offload", "scale",
              "gguf_start")
COMMAND = "make bench"


def run_one(name: str, rounds: int | None) -> Result:
    """One benchmark in a fresh process: no model, heap or allocator state left by another
    benchmark skews its times, its memory or its idle CPU."""
    args = []
    if rounds:
        args = {"decode": ["--rounds", rounds], "quantized": ["--rounds", rounds], "load": ["--rounds", rounds],
                "transfer": ["--rounds", max(rounds, 5) * 3], "dashboard": ["--presses", max(rounds * 10, 50)],
                "batching": ["--rounds", rounds], "serve": ["--rounds", rounds], "offload": ["--rounds", rounds],
                "scale": [], "gguf_start": ["--rounds", rounds]}[name]
    with tempfile.TemporaryDirectory(prefix="vramancer-bench-") as scratch:
        out = Path(scratch) / "result.json"
        argv = [sys.executable, "-m", f"benchmarks.{name}", *map(str, args), "--result", str(out)]
        done = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"benchmarks.{name} exited with status {done.returncode}")
        return Result.from_json(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run VRAMancer's benchmarks.")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per benchmark (default: each benchmark's own: 5 or more, 2 for serve)")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    info = machine()
    started = datetime.now(timezone.utc)
    report = {"machine": info, "command": COMMAND if args.only == ",".join(BENCHMARKS) and not args.rounds
              else "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": started.isoformat(timespec="seconds"), "benchmarks": {}, "failed": {}}
    results = []
    for name in chosen:
        say(f"== {name}")
        start = time.perf_counter()
        try:
            result = run_one(name, args.rounds)
        except RuntimeError as exc:  # one broken benchmark should not hide the others' numbers
            say(f"{name}: {exc}")
            report["failed"][name] = str(exc)
            continue
        result.settings["wall time"] = f"{time.perf_counter() - start:.0f} s"
        report["benchmarks"][name] = result.to_json()
        results.append(result)
    report["duration_s"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)

    from benchmarks.report import record, write_doc  # each run kept (history in git), the doc's tables follow

    for result in results:
        rounds = f" --rounds {args.rounds}" if args.rounds else ""
        record(result, f"python -m benchmarks.run --only {result.name}{rounds}", info)
    write_doc()
    markdown = render(report, results)
    RESULTS.mkdir(exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path, md_path = RESULTS / f"bench-{stamp}.json", RESULTS / f"bench-{stamp}.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(markdown + "\n")
    shutil.copyfile(json_path, RESULTS / "latest.json")
    shutil.copyfile(md_path, RESULTS / "latest.md")
    print(markdown)
    say(f"wrote {json_path.relative_to(Path.cwd()) if json_path.is_relative_to(Path.cwd()) else json_path} and .md (also latest.*)")
    return 1 if report["failed"] else 0


def render(report: dict, results: list) -> str:
    lines = [f"Measured {report['started']} on {machine_line(report['machine'])}.",
             f"Reproduce: `{report['command']}` (about {report['duration_s'] / 60:.0f} min). "
             "Cells: median (min–max) over the rounds; contenders alternate A B A B after a warm-up.", ""]
    for result in results:
        lines += [result.markdown(), ""]
    for name, why in report["failed"].items():
        lines += [f"### {name}: failed", "", f"`{why}`", ""]
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    sys.exit(main())
