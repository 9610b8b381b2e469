"""Instance optimisation at test time: Dice and seconds against the number of refinement steps.

For the validation (or --subjects train) subjects of a model (as in segmentation_benchmark.py: T1 skull-stripped with the
subject's own DLMUSE mask, scored against its own labels in the native grid), runs `inference.registration.register_subject`
with `refine` = each of --steps and each --lr, and prints mean Dice and wall seconds per setting.

    python benchmarks/refine_sweep.py --split docs/benchmarks/atlasmorph-ixi-2mm-v1_split.json \\
        --steps 0,10,20,40 --lr 0.05,0.1 --json docs/benchmarks/refine_sweep.json
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import common  # noqa: E402
from segmentation_methods import load_subject, score  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    ap.add_argument("--split", type=Path, default=None, help="split.json with the validation subjects")
    common.add_data_option(ap)
    ap.add_argument("--subjects", choices=("validation", "train"), default="validation",
                    help="which side of the split to run on (choose the settings on train, report on validation)")
    ap.add_argument("--n", type=int, default=None, help="at most this many subjects (the first by id)")
    ap.add_argument("--steps", default="0,10,20,40", help="comma list of refinement step counts")
    ap.add_argument("--lr", default="0.05", help="comma list of Adam learning rates (half-resolution voxels)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from atlasmorph_cli import labels
    from atlasmorph_cli.inference.refine_defaults import REFINE_LR
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.model.shipped import load
    from atlasmorph_cli.io.volumes import Volume

    torch.set_num_threads(args.threads)
    data_dir = common.data_folder(args.data)
    model_path, model = load(args.model, args.threads)
    split, source = common.split_ids(args.split, model_path)
    rows = common.pick_subjects(common.ixi_rows(data_dir), split.get(args.subjects, []), args.n)
    steps = [int(s) for s in args.steps.split(",")]
    lrs = [float(s) for s in args.lr.split(",")]
    settings = [(0, 0.0)] * (0 in steps) + [(s, lr) for s in steps if s for lr in lrs]

    per = {f"{s}@{lr:g}": {"dice": [], "seconds": []} for s, lr in settings}
    for r in rows:
        brain, mask, truth = load_subject(r)
        mask_vol = Volume(mask.astype(np.float32), brain.affine)
        vec, _ = encode_attributes(model, {"age": float(r["age"]), "sex": r["sex"]})
        line = [f"{r['subject']:<16} {float(r['age']):5.1f}"]
        for s, lr in settings:
            t0 = time.perf_counter()
            reg = register_subject(model, brain, vec, mask_vol, refine=s, refine_lr=lr or REFINE_LR)
            seg, _ = reg.labels_to_native()
            wall = time.perf_counter() - t0
            d = score(labels.to_index(seg, "freesurfer"), truth)["dice"]
            per[f"{s}@{lr:g}"]["dice"].append(d)
            per[f"{s}@{lr:g}"]["seconds"].append(wall)
            line.append(f"{s}@{lr:g} {d:.4f} {wall:5.1f}s")
        print("  ".join(line), flush=True)

    summary = {k: {"dice_mean": float(np.mean(v["dice"])), "dice_std": float(np.std(v["dice"])),
                   "seconds_mean": float(np.mean(v["seconds"])),
                   "better_than_0": int(sum(a > b for a, b in zip(v["dice"], per["0@0"]["dice"])))
                   if "0@0" in per else None}
               for k, v in per.items()}
    print()
    for k, v in summary.items():
        print(f"refine {k:>10}: Dice {v['dice_mean']:.4f} ± {v['dice_std']:.4f}  {v['seconds_mean']:.1f} s"
              + (f"  higher than no refinement on {v['better_than_0']}/{len(rows)}" if v["better_than_0"] is not None else ""))
    if args.json:
        out = {"command": common.command_line("refine_sweep.py", argv),
               "machine": common.describe_machine(), "threads": args.threads, "load_average_at_end": list(os.getloadavg()),
               "model": str(model_path), "split": source, "split_side": args.subjects,
               "subjects": [r["subject"] for r in rows],
               "summary": summary, "per_subject": per}
        common.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
