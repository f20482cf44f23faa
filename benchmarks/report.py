"""The benchmark tables of docs/benchmarks.md, generated from the recorded runs.

    python -m benchmarks.report          # rewrite the generated tables from benchmarks/results/*.json

A benchmark run (`python -m benchmarks.NAME`, or `make bench` for all of them) records its
result in benchmarks/results/NAME.json: what was measured, when, on what machine, by which
command. That file is kept in git, so its history is the benchmark's history. Each recorded
benchmark has one block in docs/benchmarks.md, between two markers, written from that file
and from nothing else; tests/unit/test_docs.py checks that every block matches its file.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import Result, machine, machine_line

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- generated from benchmarks/results/{name}.json by python -m benchmarks.report -->"
END = "<!-- end of {name} -->"


def record(result: Result, command: str, info: dict | None = None, folder: Path = RESULTS) -> Path:
    """Keep `result` as the benchmark's latest recorded run; returns the file. `folder`: where a
    run on another machine leaves it (the GPU check's $OUT), to be copied into RESULTS."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.name}.json"
    data = {"name": result.name, "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command, "machine": info or machine(), "result": result.to_json()}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def render(data: dict) -> str:
    """One recorded run as the doc shows it: when, where, how to reproduce, the tables."""
    result = Result.from_json(data["result"])
    return "\n".join([f"Measured {data['measured']} on {machine_line(data['machine'])}; "
                      f"reproduce with `{data['command']}`.", "", result.markdown()])


def block(name: str, body: str) -> str:
    return f"{BEGIN.format(name=name)}\n{body}\n{END.format(name=name)}"


def recorded() -> dict[str, dict]:
    """Every recorded run, by benchmark name."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))
            if not path.name.startswith(("bench-", "latest", "gpu-"))}  # whole runs' reports, not records


def updated(doc: str, runs: dict[str, dict]) -> str:
    """`doc` with each run's block rewritten. A benchmark with no block yet keeps its section's
    heading and first paragraph (what it measures), and the block replaces the rest (tables of
    earlier runs, written by hand: they stay in git's history); one with no section gets one at
    the end."""
    for name, data in runs.items():
        fresh = block(name, render(data))
        pattern = re.compile(re.escape(BEGIN.format(name=name)) + r".*?" + re.escape(END.format(name=name)), re.DOTALL)
        # The section's first paragraph, then the rest up to the next section (a section last in
        # the file may end right after its paragraph).
        section = re.compile(rf"(^## {re.escape(name)}\n\n(?:.+\n)+)(?:\n|\Z)(?:(?!^## ).*\n?)*", re.MULTILINE)
        if pattern.search(doc):
            doc = pattern.sub(lambda _: fresh, doc)
        elif section.search(doc):
            doc = section.sub(lambda found: f"{found.group(1)}\n{fresh}\n\n", doc, count=1)
        else:
            doc = doc.rstrip("\n") + f"\n\n## {name}\n\n{fresh}\n"
    return doc.rstrip("\n") + "\n"


def write_doc() -> Path:
    DOC.write_text(updated(DOC.read_text(), recorded()))
    return DOC


if __name__ == "__main__":
    print(f"rewrote the generated tables of {write_doc().relative_to(ROOT)}", file=sys.stderr)
