"""Citations of the design document point at sections that exist, and none points outside the repository.

Code and docs cite `docs/design.md §N` (or `design.md §N`); each N must be a `## §N ...` heading of
docs/design.md. The old form that pointed at a design file outside the repository must be gone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SCANNED_SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml"}
SKIPPED_DIRS = {
    ".git",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".venv",
    "venv",
    "runs",
    "out",
    "wheelhouse",
    "bench_convert_work",
    "node_modules",
}
CITATION = re.compile(r"design\.md\s*§\s*(\d+)")
HEADING = re.compile(r"^## §(\d+) \S", re.MULTILINE)
# Built from parts so that this file does not match itself.
OLD_FORMS = ("DESIGN" + " section", "DESIGN.md" + " section")


def scanned_files() -> list[Path]:
    """Source, script, doc and config files of the repository (VCS, caches and build output left out)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        files += [Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix in SCANNED_SUFFIXES]
    return files


def design_sections() -> list[int]:
    return [int(n) for n in HEADING.findall(DESIGN.read_text(encoding="utf-8"))]


def test_design_sections_are_numbered_one_to_n():
    sections = design_sections()
    assert sections, f"{DESIGN} has no '## §N Title' headings"
    assert sections == list(range(1, len(sections) + 1)), f"section numbers out of order: {sections}"


def test_every_citation_names_an_existing_section():
    sections = set(design_sections())
    bad = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in CITATION.finditer(text):
            if int(match.group(1)) not in sections:
                line = text.count("\n", 0, match.start()) + 1
                bad.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0)}")
    assert not bad, f"citations of sections docs/design.md does not have ({sorted(sections)}):\n" + "\n".join(
        bad
    )


def test_no_citation_of_the_old_external_design_file():
    bad = []
    for path in scanned_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(form in line for form in OLD_FORMS):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "old design citations; cite `docs/design.md §N` instead:\n" + "\n".join(bad)


ROBUSTNESS = ROOT / "docs" / "robustness.md"
# In a row's last cell: `tests/FILE.py::test_name`, or `::test_name` for another test of the file named last
# (in this row or, for "same test, `::...`", the row above).
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?|`::(\w+)")


def robustness_references() -> list[tuple[int, str, str | None]]:
    """(line number, test file, test name or None) for every test a table row of robustness.md names."""
    found, file = [], None
    for number, line in enumerate(ROBUSTNESS.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        for named_file, name, same_file_name in TEST_REFERENCE.findall(line.rstrip(" |").rsplit("|", 1)[-1]):
            file = named_file or file
            assert file, f"docs/robustness.md:{number}: '::{same_file_name}' follows no tests/FILE.py"
            found.append((number, file, name or same_file_name or None))
    return found


def test_every_robustness_row_names_tests_that_exist():
    """A row that names a renamed or deleted test no longer says how the behaviour is checked."""
    references = robustness_references()
    assert len(references) > 30  # the parser still finds the table's tests
    missing = []
    for number, file, name in references:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"docs/robustness.md:{number}: {file} does not exist")
        elif name and not re.search(rf"^def {name}\(", path.read_text(encoding="utf-8"), re.MULTILINE):
            missing.append(f"docs/robustness.md:{number}: {file} has no test {name}")
    assert not missing, "\n".join(missing)
