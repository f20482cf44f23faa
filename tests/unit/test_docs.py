"""The documents and the code cite only what the repository has, and nothing of one machine.

Read as text: README.md, CHANGELOG.md, everything under docs/, and the package's sources
(Python, C++, styles). A relative link in a markdown file must lead to a file or folder of
the repository (from the linking file's folder), and an anchor to a heading there. A name
that looks like a file of the repository (`planning/placement.py`, `DESIGN.md`,
`kernels/few_rows.cpp`) must name one: from the repository root, from the citing file's
folder or a folder above it, or from `vramancer/`; a bare file name may be any file of that
name. Folders git ignores (results, build outputs) and templates (`<time>`, `*`) are not
looked for. An absolute path under a user's home or a scratch folder exists on one machine
only and is refused anywhere; so are dated runs in the package's comments (their figures
belong in docs/benchmarks.md). README.md stays a page for users: at most 150 lines, and it
links every page under docs/.

Nothing here imports torch: `python -m pytest tests/unit/test_docs.py` takes a second.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 150

DOCUMENTS = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE_SUFFIXES = {".py", ".cpp", ".h", ".tcss"}
CODE = sorted(p for p in (ROOT / "vramancer").rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts)
# The rest of what a clone holds and runs: no path of one machine there either (this file names
# some, to show the check catches them).
TOOLING = [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "setup.py",
           *sorted(p for folder in ("benchmarks", "tests", ".ci") for p in (ROOT / folder).rglob("*")
                   if p.is_file() and p.suffix in {".py", ".sh", ""} and "__pycache__" not in p.parts
                   and "results" not in p.parts and p != Path(__file__).resolve())]

# Folders that are not part of the repository's files (git ignores them, or they are made by
# running something); a path under one of them is an output, not a citation.
NOT_OURS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist", ".whl", "results"}
# Names that look like files but are the names of projects.
NOT_FILES = {"llama.cpp", "config.toml"}  # a project, and the user's own config file (not ours)

EXTENSIONS = "py|md|cpp|h|sh|txt|toml|tcss|cfg|ini"
# A path-like name: optional folders, then a file name with one of our extensions. It may
# not start inside a longer token (a URL, a dotted module name, an #include <...>).
FILE_NAME = re.compile(rf"(?<![\w.:/<>@~$%*-])((?:[\w.-]+/)*[\w-][\w.-]*\.(?:{EXTENSIONS}))(?![\w/-])")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Absolute paths that exist on one machine: a user's home, a scratch or work folder.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:root|home|Users|work|tmp)/|\b[A-Za-z]:\\Users\\")
# In the tooling, scratch paths under /tmp are made on the spot (or are meant not to exist).
MACHINE_HOME = re.compile(r"(?<![\w.~-])/(?:root|home|Users|work)/|\b[A-Za-z]:\\Users\\")
# A dated run: an ISO date, or a time of day in UTC.
DATED_RUN = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b|\b[0-2]?\d:[0-5]\d(?:[-–][0-2]?\d:[0-5]\d)? ?UTC\b")


def repository_files() -> tuple[set[Path], set[str]]:
    """Every file and folder of the working tree outside NOT_OURS, and their names."""
    paths: set[Path] = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [s for s in subfolders if s not in NOT_OURS and not s.endswith(".egg-info")]
        here = Path(folder)
        paths.add(here)
        paths.update(here / name for name in files)
    return paths, {p.name for p in paths}


PATHS, NAMES = repository_files()


def lines(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        yield number, line


def where(path: Path, number: int) -> str:
    return f"{path.relative_to(ROOT)}:{number}"


def cited_file_exists(name: str, citing: Path) -> bool:
    if name in NOT_FILES:
        return True
    if "/" not in name:
        return name in NAMES
    if any(part in NOT_OURS for part in Path(name).parts):
        return True
    bases = [ROOT, ROOT / "vramancer", *[p for p in citing.parents if ROOT in (p, *p.parents)]]
    return any((base / name).resolve() in PATHS for base in bases)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    found = set()
    for _, line in lines(path):
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def test_cited_files_exist():
    missing = []
    for path in DOCUMENTS + CODE:
        for number, line in lines(path):
            for name in FILE_NAME.findall(line):
                if not cited_file_exists(name, path):
                    missing.append(f"{where(path, number)}: {name}")
    assert not missing, "files cited that the repository lacks:\n" + "\n".join(missing)


def test_relative_links_lead_somewhere():
    broken = []
    for path in DOCUMENTS:
        for number, line in lines(path):
            for target in MARKDOWN_LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # a URL, or a place in this same page
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve()
                if linked not in PATHS:
                    broken.append(f"{where(path, number)}: {target} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{where(path, number)}: {target} (no such heading)")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_no_path_of_one_machine():
    found = [f"{where(path, number)}: {line.strip()}"
             for paths, pattern in ((DOCUMENTS + CODE, MACHINE_PATH), (TOOLING, MACHINE_HOME))
             for path in paths for number, line in lines(path) if pattern.search(line)]
    assert not found, "absolute paths that exist on one machine only:\n" + "\n".join(found)


def test_no_dated_runs_in_the_package():
    found = [f"{where(path, number)}: {line.strip()}"
             for path in CODE for number, line in lines(path) if DATED_RUN.search(line)]
    assert not found, ("dated runs in the package (keep the reasoning; measured figures go to "
                       "docs/benchmarks.md with their date):\n" + "\n".join(found))


def test_readme_is_a_page_for_users():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines; move detail into docs/ (at most {README_MAX_LINES})."


def test_readme_links_every_page_of_the_docs():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for _, line in lines(README) for target in MARKDOWN_LINK.findall(line)}
    orphans = [str(p.relative_to(ROOT)) for p in DOCUMENTS[2:] if p.resolve() not in linked]
    assert not orphans, "pages under docs/ that README.md does not link: " + ", ".join(orphans)


def test_the_checks_catch_what_they_are_for():
    """The patterns themselves: a missing file, a machine's path and a dated run are found."""
    assert FILE_NAME.findall("as DESIGN.md says (see planning/placement.py, `kernels/few_rows.cpp`)") == [
        "DESIGN.md", "planning/placement.py", "kernels/few_rows.cpp"]
    assert not cited_file_exists("DESIGN.md", README)
    assert cited_file_exists("planning/placement.py", ROOT / "vramancer" / "app" / "app.py")
    assert not FILE_NAME.findall("https://example.org/x/README.md torch.utils.cpp_extension #include <torch/extension.h>")
    for text in ("/work/llama-venv/bin/python", "cd /root/x", "/home/me/model", "/tmp/vramancer-site",
                 r"C:\Users\me"):
        assert MACHINE_PATH.search(text), text
    for text in ("https://example.org/home/", "~/.cache/vramancer", "sim:2x1GiB,node:127.0.0.1:7070/sim0"):
        assert not MACHINE_PATH.search(text), text
    for text in ("measured 2026-11-27", "at 12:17 UTC", "(20:49-20:57 UTC)"):
        assert DATED_RUN.search(text), text
    assert not DATED_RUN.search("127.0.0.1:7070, 2 cores, 10:1 ratio")


def test_each_recorded_benchmark_run_is_the_table_the_doc_shows():
    """docs/benchmarks.md shows each benchmarks/results/<name>.json as generated from it: a
    table edited by hand, or a result recorded without the doc regenerated, fails here."""
    from benchmarks.report import DOC, block, recorded, render

    doc = DOC.read_text()
    for name, data in recorded().items():
        assert block(name, render(data)) in doc, f"regenerate with `python -m benchmarks.report` ({name})"


def test_a_recorded_run_replaces_the_tables_written_by_hand_and_keeps_what_the_benchmark_measures():
    from benchmarks.common import Result
    from benchmarks.report import block, render, updated

    result = Result("decode", "Decode", {"rounds": 3}, {"tok_s": ("tok/s", 1)},
                    {"plain": {"tok_s": {"median": 17.5, "min": 17.0, "max": 18.0, "n": 3, "samples": [17.0, 17.5, 18.0]}}})
    data = {"name": "decode", "measured": "2026-12-07 22:50 UTC", "command": "python -m benchmarks.decode",
            "machine": {"cpu": "A CPU", "cores": 2, "memory_gib": 23.0, "gpus": [], "os": "Linux", "python": "3.11",
                        "torch": "2.13.0", "transformers": "5.25.0"}, "result": result.to_json()}
    doc = "# Benchmarks\n\n## decode\n\nWhat it measures.\nSecond line.\n\nAn old table.\n\n| a | b |\n\n## load\n\nLoads.\n"
    once = updated(doc, {"decode": data})
    assert once.startswith("# Benchmarks\n\n## decode\n\nWhat it measures.\nSecond line.\n\n" + block("decode", render(data)))
    assert "An old table" not in once and once.endswith("## load\n\nLoads.\n")
    assert "| plain | 17.5 (17.0–18.0) |" in once and "Measured 2026-12-07 22:50 UTC on A CPU" in once
    assert updated(once, {"decode": data}) == once, "regenerating changes nothing"
    assert updated(doc, {"new": dict(data, name="new")}).endswith(block("new", render(dict(data, name="new"))) + "\n")
    # A section last in the file, its paragraph ending the file, gets its table under that
    # paragraph, not a second section of the same name.
    last = updated("# Benchmarks\n\n## decode\n\nWhat it measures.\n", {"decode": data})
    assert last == "# Benchmarks\n\n## decode\n\nWhat it measures.\n\n" + block("decode", render(data)) + "\n"


def test_only_records_make_tables_not_whole_runs_reports(tmp_path, monkeypatch):
    """A whole run's report (`make bench`'s bench-*/latest.*, the GPU check's gpu-*) lies in the
    results folder beside the records but is not one: the doc gets no table for it."""
    import json

    from benchmarks import report

    for name in ("bench-20261208T000000Z", "latest", "gpu-20261208T000000Z", "gpu-latest"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"machine": {}, "benchmarks": {}}))
    (tmp_path / "gpu.json").write_text(json.dumps({"name": "gpu"}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert list(report.recorded()) == ["gpu"]
