"""`atlasmorph build` on IXI training subjects, timed (issue 21): the AtlasMorph arm of the build comparison.

    python benchmarks/build_benchmark.py --n-train 10 --iterations 3 --work runs/build     # -> runs/build/ours-10-it3/

The group is the first --n-train training subjects of the shipped model's split (by id, with age, sex
and seg), the same as benchmarks/build_ants.py takes. Both get the same brains: each subject's T1 with
its DLMUSE seg > 0 as the brain mask (mask files written into the work folder; no deepbet), and the
subjects' segmentations are averaged into the template's labels. A finished build (its report) is not
run again. Timing: the whole command (`seconds`: model load, reading and masking the subjects, every
iteration, writing) and per iteration (registrations + averaging, what build_ants.py times for ANTs); `cpu_seconds` is the whole
command's CPU time, which on one thread stays comparable when other jobs share the machine (build_ants.py
records each registration's too).
Segmentation through the templates, centrality and sharpness: benchmarks/build_compare.py.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

import common


def write_cohort(rows: list[dict], folder: Path) -> Path:
    """A cohort CSV of the rows with their seg > 0 brain masks (written once) as the mask column."""
    import nibabel as nib

    from atlasmorph_cli.io.volumes import save_volume

    masks = folder / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    cohort = folder / "cohort.csv"
    with open(cohort, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "t1", "mask", "seg", "age", "sex"])
        for r in rows:
            m = masks / f"{r['subject']}_mask.nii.gz"
            if not m.is_file():
                seg = nib.load(r["seg"])
                save_volume((np.asarray(seg.dataobj) > 0).astype(np.uint8), seg.affine, m, dtype=np.uint8)
            w.writerow([r["subject"], r["t1"], m, r["seg"], r["age"], r["sex"]])
    return cohort


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_data_option(ap)
    ap.add_argument("--n-train", type=int, default=10, help="training subjects to build from")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--refine", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (ANTs runs on 1 ITK thread)")
    ap.add_argument("--hires", action="store_true", help="also write the template at the inputs' resolution")
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "build")
    args = ap.parse_args(argv)
    from atlasmorph_cli.cli.build import BuildRequest, run_build

    data = common.data_folder(args.data)
    split = common.json.loads(common.SHIPPED_SPLIT.read_text())
    rows = common.pick_subjects(common.ixi_rows(data), split["train"], args.n_train)
    out = args.work / f"ours-{len(rows)}-it{args.iterations}"
    if (out / "build_benchmark.json").is_file():
        print(f"{out}: done already", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    cohort = write_cohort(rows, out)
    t0, c0 = time.perf_counter(), time.process_time()
    report = run_build(BuildRequest(cohort, out / "template.nii.gz", labels=out / "template_labels.nii.gz",
                                    probs=out / "template_probs.nii.gz", iterations=args.iterations,
                                    report=out / "report.json", refine=args.refine, threads=args.threads, quiet=True,
                                    hires=out / "template_hires.nii.gz" if args.hires else None),
                       lambda m: [print("warning:", x, file=sys.stderr) for x in m])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_it = [it["seconds"] for it in report["iterations"]]
    result = {
        "subjects": [r["subject"] for r in rows], "iterations": args.iterations, "refine": args.refine,
        "threads": args.threads, "seconds": wall, "cpu_seconds": cpu, "iteration_seconds": per_it,
        "build_seconds_per_iteration_count": list(np.cumsum(per_it)),
        "report": report, "load_end": os.getloadavg()[0],
        "machine": common.describe_machine(with_torch=True), "versions": common.versions(),
        "command": common.command_line("build_benchmark.py", argv),
    }
    common.write_json(out / "build_benchmark.json", result)
    print(f"{out.name}: {wall:.0f} s in all ({cpu:.0f} s CPU), iterations {', '.join(f'{s:.0f}' for s in per_it)} s")


if __name__ == "__main__":
    main()
