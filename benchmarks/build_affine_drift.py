"""How far each subject's affine would move if `atlasmorph build` refitted it to the built template (issue 21).

    python benchmarks/build_affine_drift.py --work runs/build/ours-10-it3

build fits each subject's affine once, to the starting template, and keeps it. This fits it again to
the built template (same fit, same brains: T1 inside seg > 0) and reports the distance between the
two affine maps over the built template's brain points (mean and maximum, mm). Well under a voxel
means the refit would change little that the deformable part does not absorb.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

import common


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="a build_benchmark.py folder (ours-N-itK)")
    args = ap.parse_args(argv)
    import torch

    from atlasmorph_cli.geometry.affine import fit_affine
    from atlasmorph_cli.geometry.space import grid_coords
    from atlasmorph_cli.inference.registration import subject_brain
    from atlasmorph_cli.inference.template import encode_attributes, load_template, make_template
    from atlasmorph_cli.io.volumes import load_volume
    from atlasmorph_cli.model.shipped import load

    _, model = load(None, 1)
    with open(args.work / "cohort.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    vec = torch.stack([encode_attributes(model, {"age": r["age"], "sex": r["sex"]})[0] for r in rows]).mean(0)
    start = make_template(model, vec)  # build's starting point: the group's mean attributes
    built, _ = load_template(args.work / "template.nii.gz", args.work / "template_probs.nii.gz",
                             model.config.model_grid)
    brain = (built.probs[0] < 0.5).ravel()
    pts = grid_coords(built.grid.affine, built.grid.shape, torch.float64)[0].reshape(3, -1).numpy()[:, brain]
    pts = np.vstack([pts, np.ones(pts.shape[1])])
    out = {}
    for r in rows:
        subj = load_volume(r["t1"])
        _, b = subject_brain(subj, load_volume(r["mask"]))
        first = fit_affine(b, subj.affine, start.t1 * (start.probs[0] < 0.5), start.grid)
        refit = fit_affine(b, subj.affine, built.t1 * (built.probs[0] < 0.5), built.grid)
        d = np.linalg.norm((first @ pts - refit @ pts)[:3], axis=0)
        out[r["subject"]] = {"mean_mm": float(d.mean()), "max_mm": float(d.max())}
        print(r["subject"], f"mean {d.mean():.3f} mm, max {d.max():.3f} mm")
    summary = {"subjects": out, "mean_mm": float(np.mean([v["mean_mm"] for v in out.values()])),
               "max_mm": float(np.max([v["max_mm"] for v in out.values()])),
               "command": common.command_line("build_affine_drift.py", argv)}
    common.write_json(args.work / "affine_drift.json", summary)
    print(json.dumps({k: summary[k] for k in ("mean_mm", "max_mm")}))


if __name__ == "__main__":
    main()
