"""Cost of finding the T1w images of a BIDS dataset: pybids against atlasmorph_cli.bids (docs/bids.md).

Builds a synthetic dataset (default 150 subjects, 2 sessions each: anat T1w + JSON, a BOLD run with
events, a DWI with bval/bvec; the images are empty files, which is all indexing reads), then times in
fresh interpreters (median of --repeat runs, seconds):

* the import of each library (`import bids` / `import atlasmorph_cli.bids`), minus bare start-up;
* the first query: build the index and list the T1w images (pybids: `BIDSLayout(root, validate=...)`
  then `layout.get(suffix='T1w', extension=[...])`; ours: `find_bids_inputs(root)`, attributes included).

    python benchmarks/bids_index.py [--subjects 150] [--pybids-python /path/to/venv/bin/python]

pybids is not a dependency: install it in a separate environment and pass its interpreter.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYBIDS_INDEX = """
import time, sys
t = time.perf_counter()
from bids import BIDSLayout
t1 = time.perf_counter()
layout = BIDSLayout(sys.argv[1], validate={validate})
files = layout.get(suffix="T1w", extension=[".nii", ".nii.gz"], datatype="anat", return_type="filename")
t2 = time.perf_counter()
print(t1 - t, t2 - t1, len(files))
"""
OURS_INDEX = """
import time, sys
t = time.perf_counter()
from atlasmorph_cli.bids import find_bids_inputs
t1 = time.perf_counter()
found = find_bids_inputs(sys.argv[1])
t2 = time.perf_counter()
print(t1 - t, t2 - t1, len(found))
"""


def make_dataset(root: Path, subjects: int, sessions: int = 2) -> None:
    """A raw BIDS dataset with empty image files and real side files (JSON, TSV, bval/bvec)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "synthetic", "BIDSVersion": "1.10.0"}))
    rows = ["participant_id\tage\tsex"]
    for i in range(1, subjects + 1):
        sub = f"sub-{i:03d}"
        rows.append(f"{sub}\t{20 + i % 60}\t{'MF'[i % 2]}")
        ses_rows = ["session_id\tage"]
        for j in range(1, sessions + 1):
            ses = f"ses-{j}"
            ses_rows.append(f"{ses}\t{20 + i % 60 + j}")
            base = root / sub / ses
            stem = f"{sub}_{ses}"
            for folder, names in {
                "anat": [f"{stem}_T1w.nii.gz", f"{stem}_T1w.json"],
                "func": [f"{stem}_task-rest_bold.nii.gz", f"{stem}_task-rest_bold.json",
                         f"{stem}_task-rest_events.tsv"],
                "dwi": [f"{stem}_dwi.nii.gz", f"{stem}_dwi.json", f"{stem}_dwi.bval", f"{stem}_dwi.bvec"],
            }.items():
                (base / folder).mkdir(parents=True, exist_ok=True)
                for name in names:
                    p = base / folder / name
                    p.write_text("{}" if name.endswith(".json") else "onset\tduration\n" if name.endswith(".tsv")
                                 else "")
        (root / sub / f"{sub}_sessions.tsv").write_text("\n".join(ses_rows) + "\n")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def timed(python: str, code: str, root: Path, repeat: int) -> tuple[float, float, float, int]:
    """(median start-up+import wall time, median import, median index+query, images found) of `code`."""
    walls, imports, queries, found = [], [], [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        out = subprocess.run([python, "-c", code, str(root)], capture_output=True, text=True, check=True).stdout
        walls.append(time.perf_counter() - t)
        a, b, n = out.split()
        imports.append(float(a))
        queries.append(float(b))
        found = int(n)
    return statistics.median(walls), statistics.median(imports), statistics.median(queries), found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=150)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pybids-python", default=sys.executable, help="an interpreter with pybids installed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        make_dataset(root, args.subjects, args.sessions)
        n_files = sum(1 for p in root.rglob("*") if p.is_file())
        print(f"dataset: {args.subjects} subjects x {args.sessions} sessions, {n_files} files")
        version = subprocess.run([args.pybids_python, "-c", "import bids; print(bids.__version__)"],
                                 capture_output=True, text=True).stdout.strip() or "not installed"
        print(f"pybids {version} ({args.pybids_python}); times are medians of {args.repeat} fresh interpreters")
        print(f"{'':38s} {'process':>8s} {'import':>8s} {'index+query':>12s} {'T1w found':>10s}")
        rows = [("atlasmorph_cli.bids.find_bids_inputs", sys.executable, OURS_INDEX)]
        if version != "not installed":
            rows += [("pybids BIDSLayout(validate=False)", args.pybids_python, PYBIDS_INDEX.format(validate=False)),
                     ("pybids BIDSLayout(validate=True)", args.pybids_python, PYBIDS_INDEX.format(validate=True))]
        for name, python, code in rows:
            wall, imp, query, found = timed(python, code, root, args.repeat)
            print(f"{name:38s} {wall:8.2f} {imp:8.2f} {query:12.3f} {found:10d}")


if __name__ == "__main__":
    main()
