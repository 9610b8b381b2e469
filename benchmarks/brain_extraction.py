"""Built-in brain extraction on whole-head IXI scans: mask Dice, segmentation Dice, time per subject.

For each validation subject of the shipped model (docs/benchmarks/atlasmorph-ixi-2mm-v1_split.json),
from its raw whole-head T1 (no mask):

* brain mask: what `atlasmorph segment` extracts (brain_extraction.resolve_brain, deepbet) against
  the DLMUSE label union (seg > 0); Dice and the extraction's wall time;
* segmentation: the 34-structure Dice of `segment` run on the whole-head T1 (brain extracted) and of
  the same subject with its own mask (seg > 0 as --mask), same model, same refinement;
* end to end, in this process (model loaded once, as in batch mode): load the T1, extract, register,
  labels to native, per subject; plus, with --cli N, N fresh `atlasmorph segment` processes on
  whole-head scans (Python start, imports, model load, everything).

    OMP_NUM_THREADS=1 python benchmarks/brain_extraction.py --threads 1 --cli 3 \\
        --json docs/benchmarks/brain_extraction.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import common  # noqa: E402
from atlasmorph_cli.inference.brain_extraction import resolve_brain  # noqa: E402
from atlasmorph_cli.io.volumes import Volume, load_volume  # noqa: E402
from atlasmorph_cli.labels import to_index  # noqa: E402
from atlasmorph_cli.training.metrics import mean_dice  # noqa: E402
from atlasmorph_cli.inference.registration import register_subject  # noqa: E402
from atlasmorph_cli.inference.template import encode_attributes  # noqa: E402
from atlasmorph_cli.model.shipped import load  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks."""
    return float(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=common.SHIPPED_SPLIT)
    ap.add_argument("--n", type=int, default=None, help="first N validation subjects only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cli", type=int, default=0, help="also time N fresh `atlasmorph segment` processes")
    ap.add_argument("--json", type=Path, default=None)
    common.add_data_option(ap)
    args = ap.parse_args()

    subjects = common.validation_rows(common.data_folder(args.data), args.split, args.n)
    _, model = load(None, args.threads)
    results = []
    for r in subjects:
        sid = r["subject"]
        t_start = time.perf_counter()
        subj = load_volume(r["t1"])
        t0 = time.perf_counter()
        brain = resolve_brain(subj)
        t_extract = time.perf_counter() - t0
        vec, _ = encode_attributes(model, {"age": r["age"], "sex": r["sex"]})
        reg = register_subject(model, subj, vec, brain.as_volume(subj))
        lab, _ = reg.labels_to_native()
        t_total = time.perf_counter() - t_start
        seg = np.asarray(load_volume(r["seg"]).data).astype(np.int32)
        truth = to_index(seg)
        d_whole = mean_dice(to_index(lab, "freesurfer"), truth)
        own = Volume((seg > 0).astype(np.float32), subj.affine, subj.header)
        lab_own, _ = register_subject(model, subj, vec, own).labels_to_native()
        d_own = mean_dice(to_index(lab_own, "freesurfer"), truth)
        res = dict(subject=sid, age=float(r["age"]), sex=r["sex"], source=brain.source,
                   mask_dice=dice(brain.mask, seg > 0), extract_s=t_extract, end_to_end_s=t_total,
                   seg_dice_wholehead=d_whole, seg_dice_own_mask=d_own)
        results.append(res)
        print(json.dumps(res), flush=True)

    def stats(key):
        v = [x[key] for x in results]
        return dict(mean=statistics.mean(v), min=min(v), max=max(v), median=statistics.median(v))

    diff = [x["seg_dice_wholehead"] - x["seg_dice_own_mask"] for x in results]
    summary = dict(
        n=len(results), threads=args.threads,
        mask_dice=stats("mask_dice"), extract_s=stats("extract_s"), end_to_end_s=stats("end_to_end_s"),
        seg_dice_wholehead=stats("seg_dice_wholehead"), seg_dice_own_mask=stats("seg_dice_own_mask"),
        seg_dice_difference=dict(mean=statistics.mean(diff), min=min(diff), max=max(diff)),
    )
    if args.cli:
        walls = []
        with tempfile.TemporaryDirectory() as tmp:
            for r in subjects[: args.cli]:
                cmd = [sys.executable, "-m", "atlasmorph_cli", "segment", r["t1"], "--age",
                       r["age"], "--sex", r["sex"], "-o", f"{tmp}/seg.nii.gz", "--threads", str(args.threads)]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                walls.append(time.perf_counter() - t0)
        summary["cli_wall_s"] = dict(runs=walls, mean=statistics.mean(walls))
    print(json.dumps(summary, indent=1))
    if args.json:
        common.write_json(args.json, dict(summary=summary, subjects=results))


if __name__ == "__main__":
    main()
