"""Write docs/bad-inputs.md, the catalogue of bad inputs: what each gets, and the test that shows it.

    .venv/bin/python tests/bad_input_catalogue.py           # rewrite the file
    .venv/bin/python tests/bad_input_catalogue.py --check   # exit 1 if the file is out of date

Every test that feeds a bad input carries `@pytest.mark.bad_input(kind="...", gets="...")`: kind is the
bad input in the user's words, gets what the user then gets. The table is made from those marks, as
pytest collects them (a mark on a test, on one of its parameters, or on a whole parametrized test), so
it lists only what a test shows; tests/test_bad_input_catalogue.py fails while it is stale.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-inputs.md"
HEADER = """# Bad inputs, and what each gets

Every row is shown by the test named beside it: a clear `LlmlabError` from the Python API, an `error: ...`
line and exit code 2 from the `llmlab` command, never a traceback, a hang or a made-up result.
Generated from the tests' `bad_input(kind, gets)` marks by `python tests/bad_input_catalogue.py`;
`tests/test_bad_input_catalogue.py` fails when this file is out of date. {n_kinds} kinds.

| Bad input | What the user gets | Shown by |
|---|---|---|
"""


class MarkCollector:
    """A pytest plugin: after collection, each item's bad_input mark as (kind, gets, test name)."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def pytest_collection_finish(self, session):
        for item in session.items:
            mark = item.get_closest_marker("bad_input")
            if mark is None:
                continue
            if mark.args or set(mark.kwargs) != {"kind", "gets"}:
                raise pytest.UsageError(f"{item.nodeid}: write the mark as bad_input(kind=..., gets=...)")
            # a mark on one parameter names that case; one on the whole test names the test
            own = mark in getattr(getattr(item, "callspec", None), "marks", ())
            self.rows.append((mark.kwargs["kind"], mark.kwargs["gets"], item.nodeid if own else item.nodeid.split("[")[0]))


def marked_files() -> list[str]:
    """The test files that mention the mark: only they are collected (importing all would take long)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "bad_input" in p.read_text(encoding="utf-8"))


def catalogue() -> str:
    collector, report = MarkCollector(), io.StringIO()
    with contextlib.redirect_stdout(report):      # pytest's list of the tests: shown only if collecting fails
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                            *marked_files()], plugins=[collector])
    if code != pytest.ExitCode.OK:
        sys.exit(f"{report.getvalue()}\ncollecting the tests failed (pytest exit code {code}): fix that first")
    tests: dict[tuple[str, str], list[str]] = {}
    for kind, gets, test in collector.rows:
        names = tests.setdefault((kind, gets), [])
        if test not in names:
            names.append(test)
    rows = [f"| {cell(kind)} | {cell(gets)} | {'<br>'.join(f'`{t}`' for t in names)} |"
            for (kind, gets), names in tests.items()]
    return HEADER.format(n_kinds=len(rows)) + "\n".join(rows) + "\n"


def cell(text: str) -> str:
    """Text safe in a Markdown table cell: a | would end the cell, a < could open an HTML tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def main() -> int:
    text = catalogue()
    if "--check" in sys.argv[1:]:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC.relative_to(ROOT)} is out of date: run  python tests/bad_input_catalogue.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}: {text.count(chr(10)) - HEADER.count(chr(10))} kinds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
