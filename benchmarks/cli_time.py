"""End-to-end wall time and peak memory of `atlasmorph segment` / `register` as a user runs them.

Each run is a fresh `atlasmorph` process (Python start, imports, model load and sha256 check, reading
the whole-head T1 and its mask, affine, networks, native-space resampling, writing outputs), on shared
IXI subjects with their DLMUSE mask (seg > 0) as `--mask` (the quality check then also compares it with
deepbet's extraction), or with --whole-head without a mask (the brain is extracted). Peak memory is the
child's max RSS.

    python benchmarks/cli_time.py --n 5 --json docs/benchmarks/cli_time.json
    python benchmarks/cli_time.py --n 3 --whole-head --json docs/benchmarks/cli_time_wholehead.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command in a fresh process; a failure stops the benchmark."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {err.read().strip()}")
    return wall, rusage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5, help="IXI subjects (first n with age, sorted by id)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--whole-head", action="store_true", help="no --mask: the tool extracts the brain itself")
    common.add_data_option(ap)
    args = ap.parse_args(argv)
    rows = common.with_attributes(common.ixi_rows(common.data_folder(args.data)), args.n)
    exe = shutil.which("atlasmorph") or sys.exit("atlasmorph is not installed")
    results = {"segment": [], "register": []}
    load = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            mask = [] if args.whole_head else ["--mask", r["seg"]]
            base = [r["t1"], *mask,
                    "--age", r["age"], "--sex", r["sex"], "--threads", str(args.threads)]
            seg = [exe, "segment", *base, "-o", f"{tmp}/seg.nii.gz", "--vol", f"{tmp}/vol.csv"]
            reg = [exe, "register", *base, "-o", f"{tmp}/moved.nii.gz", "-t", f"{tmp}/warp.nii.gz",
                   "--labels", f"{tmp}/labels.nii.gz"]
            for name, cmd in (("segment", seg), ("register", reg)):
                wall, mb = run(cmd)
                results[name].append({"subject": r["subject"], "seconds": wall, "peak_mb": mb})
                load.append(os.getloadavg()[0])
                print(f"{r['subject']} {name:8s} {wall:5.1f} s {mb:6.0f} MB  load {load[-1]:.2f}", flush=True)
    summary = {k: {"seconds_mean": statistics.mean(x["seconds"] for x in v),
                   "seconds_max": max(x["seconds"] for x in v),
                   "peak_mb_max": max(x["peak_mb"] for x in v)} for k, v in results.items()}
    out = {"command": common.command_line("cli_time.py", argv),
           "cpus": os.cpu_count(), "threads": args.threads, "load_average_1min_mean": statistics.mean(load),
           "summary": summary, "runs": results}
    print(json.dumps(summary, indent=1))
    if args.json:
        common.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
