"""Where does the Dice drop on FreeSurfer-conformed inputs come from: the segmentation, or scoring on 1 mm?

For the first N validation subjects (the same files ood_benchmark.py writes to WORKDIR/subjects), AtlasMorph
(`--refine 0` by default) segments the clean 2 mm brain and its conformed versions (conform, conform-float).
Each conformed result is scored three ways:

  dice_1mm          against the truth carried to the 1 mm grid by nearest neighbour (what ood_benchmark reports)
  dice_back_on_2mm  the 1 mm label map carried back to the subject's own 2 mm grid (nearest neighbour; the 2 mm
                    voxel centres are 1 mm voxel centres, so no ties) and scored against the original 2 mm truth
  agreement         Dice between it and the clean 2 mm result carried to the 1 mm grid (how much the
                    segmentation itself changed)

    python benchmarks/ood_grid_check.py --subjects 3 --threads 1 --workdir runs/ood [--refine 0]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import common  # noqa: E402
import ood_benchmark as ood  # noqa: E402
from atlasmorph_cli import labels  # noqa: E402
from segmentation_methods import score  # noqa: E402


def _dice(pred_fs: np.ndarray, truth_index: np.ndarray) -> float:
    """Mean Dice of a FreeSurfer-id label map against class-index truth."""
    return score(labels.to_index(pred_fs, "freesurfer"), truth_index)["dice"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("runs/ood"))
    ap.add_argument("--refine", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    args = ap.parse_args(argv)

    import torch

    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.model.shipped import load
    from atlasmorph_cli.io.volumes import Volume, load_volume
    from atlasmorph_cli.geometry.space import Grid, resample

    torch.set_num_threads(args.threads)
    data_dir = common.data_folder()
    _, model = load(None, args.threads)
    val = common.validation_rows(data_dir, common.SHIPPED_SPLIT, args.subjects)
    out = []
    for r in val:
        vec, _ = encode_attributes(model, {"age": float(r["age"]), "sex": r["sex"]})
        seg = {}
        for p in ("clean", "conform", "conform-float"):
            f = ood.make_case(r, p, args.workdir, data_dir, args.seed)
            t1, mask = load_volume(f["t1"]), load_volume(f["mask"]).data > 0
            brain = Volume(t1.data * mask, t1.affine, t1.header, t1.source)
            reg = register_subject(model, brain, vec, Volume(mask.astype(np.float32), t1.affine), refine=args.refine)
            seg[p] = (reg.labels_to_native()[0], labels.to_index(load_volume(f["seg"]).data, "freesurfer"), t1.affine,
                      tuple(t1.shape))
        clean_pred, clean_truth, clean_aff, clean_shape = seg["clean"]
        rec = {"subject": r["subject"], "clean_dice": _dice(clean_pred, clean_truth)}
        for p in ("conform", "conform-float"):
            pred, truth, aff, shape = seg[p]
            back = np.rint(resample(pred.astype(np.float32), aff, Grid(clean_shape, clean_aff), order=0)).astype(np.int32)
            up = np.rint(resample(clean_pred.astype(np.float32), clean_aff, Grid(shape, aff), order=0)).astype(np.int32)
            rec[p] = {"dice_1mm": _dice(pred, truth), "dice_back_on_2mm": _dice(back, clean_truth),
                      "agreement_with_clean": _dice(pred, labels.to_index(up, "freesurfer")),
                      "clean_upsampled_vs_1mm_truth": _dice(up, truth)}
        out.append(rec)
        print(json.dumps(rec), flush=True)
    keys = ("dice_1mm", "dice_back_on_2mm", "agreement_with_clean", "clean_upsampled_vs_1mm_truth")
    print(f"\nmean over {len(out)} subjects, --refine {args.refine}: clean {np.mean([o['clean_dice'] for o in out]):.4f}")
    for p in ("conform", "conform-float"):
        print(p, "  ".join(f"{k} {np.mean([o[p][k] for o in out]):.4f}" for k in keys))
    if args.json:
        common.write_json(args.json, {"command": common.command_line("ood_grid_check.py", argv),
                                      "refine": args.refine, "subjects": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
