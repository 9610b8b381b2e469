"""Run every bad-input case of tests/test_reliability.py through the CLI and write the table of the
one-line messages into docs/reliability.md (between the error-table markers), so the doc stays true.

    python benchmarks/error_table.py            # rewrite the table in docs/reliability.md
    python benchmarks/error_table.py --print    # print it instead

Inputs are synthetic (tests/synthetic.py); it runs in a few seconds on a CPU and needs no data.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import common  # noqa: E402

RELIABILITY = common.tests_module("test_reliability")  # the cases are the tests' own
CASES, case_folder, fill = RELIABILITY.CASES, RELIABILITY.case_folder, RELIABILITY.fill
make_inputs, run_inprocess = RELIABILITY.make_inputs, RELIABILITY.run_inprocess

ROOT = common.ROOT
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- error-table:start -->", "<!-- error-table:end -->"


def table() -> str:
    rows = ["| command | bad input | command line | exit | message (stderr, one line) |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp) / "inputs")
        for i, (command, what, argv, expect) in enumerate(CASES):
            cwd = case_folder(Path(tmp) / f"case{i}", inputs)
            line = fill(argv, cwd)
            code, err = run_inprocess(line, cwd)
            lines = err.strip().splitlines()
            left = [p for p in (cwd / "out").rglob("*") if p.is_file()]
            if code == 0 or len(lines) != 1 or expect not in lines[0] or left:
                raise SystemExit(f"case '{command}: {what}' misbehaves: exit {code}, stderr {err!r}, left {left}")
            shown = " ".join(a.replace(str(cwd / "readonly"), "readonly") for a in line)
            rows.append(f"| {command} | {what} | `atlasmorph {_cell(shown)}` | {code} | `{_cell(lines[0])}` |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the table instead of updating the doc")
    args = ap.parse_args()
    t = table()
    if args.print:
        print(t)
        return
    doc = DOC.read_text()
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{t}{END}{tail}")
    print(f"{len(CASES)} cases written to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
