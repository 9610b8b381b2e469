"""Memory over a long batch: `atlasmorph segment COHORT.csv --out-dir DIR` in-process, RSS per subject.

Runs batch segmentation (model loaded once) over the first N shared IXI subjects that have age and
sex (whole-head T1, DLMUSE seg > 0 as the brain mask, the same as a cohort CSV with a `seg` column)
and, after each subject, reads /proc/self/status:

* ``rss_mb``: resident memory after the subject (VmRSS): flat over the batch = no leak;
* ``peak_mb``: the peak during that subject (VmHWM, reset before each subject by writing 5 to
  /proc/self/clear_refs, Linux >= 4.0). Subject 0's peak includes loading torch and the model.
  Where the reset is refused, ``peak_is_per_subject`` is false and the peak is the running maximum.

The summary gives the RSS slope (least squares, MB per subject, subjects after the first
``--warmup``) and the growth from the first post-warm-up subject to the last. Writes
docs/benchmarks/batch_memory.json (``--out``). Linux only.

    python benchmarks/batch_memory.py --model models/atlasmorph-ixi-2mm-v1.safetensors --n 50
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from atlasmorph_cli.cli.request import SubjectRequest
from atlasmorph_cli.cli.run import run_batch
from atlasmorph_cli.errors import AtlasMorphError
from common import proc_status_mb


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50, help="subjects (default 50)")
    p.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="subjects left out of the slope")
    common.add_data_option(p)
    p.add_argument("--out", type=Path, default=common.ROOT / "docs" / "benchmarks" / "batch_memory.json")
    p.add_argument("--keep", type=Path, default=None, help="keep the segmentations in this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args()


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def write_cohort(data: Path, n: int, path: Path) -> int:
    """A cohort CSV of the first n IXI subjects with age and sex (absolute paths); how many it holds."""
    rows = common.with_attributes(common.ixi_rows(data), n)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "t1", "seg", "age", "sex"])
        for r in rows:
            w.writerow([r["subject"], r["t1"], r["seg"], r["age"], r["sex"]])
    return len(rows)


def main() -> None:
    args = parse_args()
    if not Path("/proc/self/status").is_file():
        sys.exit("batch_memory: needs Linux /proc")
    data = common.data_folder(args.data)
    work = Path(tempfile.mkdtemp(prefix="batch_memory."))
    out_dir = args.keep or work / "out"
    n = write_cohort(data, args.n, work / "cohort.csv")

    records: list[dict] = []
    per_subject = reset_peak()
    clock = [time.perf_counter()]

    def on_subject(i, subject, error):
        now = time.perf_counter()
        records.append({"i": i, "subject": subject.id, "ok": error is None, "error": error,
                        "seconds": round(now - clock[0], 2), "rss_mb": round(proc_status_mb("VmRSS"), 1),
                        "peak_mb": round(proc_status_mb("VmHWM"), 1)})
        reset_peak()
        clock[0] = time.perf_counter()

    t0 = time.perf_counter()
    rss_start = proc_status_mb("VmRSS")
    failed = 0
    try:
        req = SubjectRequest("segment", work / "cohort.csv", out_dir=out_dir, model_path=args.model,
                             threads=args.threads)
        run_batch(req, on_subject=on_subject, quiet=args.quiet)
    except AtlasMorphError as exc:
        failed = sum(not r["ok"] for r in records)
        print(f"batch_memory: {exc}", file=sys.stderr)
        if not records:
            sys.exit(1)
    total = time.perf_counter() - t0

    rss = np.array([r["rss_mb"] for r in records])
    idx = np.arange(len(rss))
    tail = idx >= min(args.warmup, max(len(rss) - 2, 0))
    slope = float(np.polyfit(idx[tail], rss[tail], 1)[0]) if tail.sum() >= 2 else float("nan")
    peaks = [r["peak_mb"] for r in records[1:]] or [records[0]["peak_mb"]]
    result = {
        "what": "batch segment, in-process, model loaded once; RSS after each subject and peak during it",
        "subjects": n, "failed": failed, "threads": args.threads,
        "model": str(args.model) if args.model else "shipped",
        "machine": common.platform_record(),
        "total_seconds": round(total, 1),
        "rss_before_batch_mb": round(rss_start, 1),
        "peak_is_per_subject": per_subject,
        "summary": {
            "rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]),
            "rss_growth_after_warmup_mb": float(rss[tail][-1] - rss[tail][0]) if tail.any() else float("nan"),
            "rss_slope_mb_per_subject": round(slope, 3),
            "peak_max_mb_excluding_first": max(peaks), "peak_median_mb_excluding_first": float(np.median(peaks)),
            "seconds_per_subject_median": float(np.median([r["seconds"] for r in records])),
        },
        "per_subject": records,
    }
    common.write_json(args.out, result)
    s = result["summary"]
    print(f"{n} subjects ({failed} failed) in {total:.0f} s; RSS {s['rss_first_mb']:.0f} -> {s['rss_last_mb']:.0f} MB "
          f"(slope {s['rss_slope_mb_per_subject']:+.2f} MB/subject after {args.warmup}); per-subject peak max "
          f"{s['peak_max_mb_excluding_first']:.0f} MB; wrote {args.out}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
