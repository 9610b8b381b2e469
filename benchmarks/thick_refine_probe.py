"""Probe (issue 16): does the NCC refinement do better on thick-slice inputs when it compares the subject with a
template blurred the way the acquisition blurred the subject?

For the first N IXI validation subjects, the clean brain and its `thick6` version (ood_benchmark.py's
perturbation: 3 slices averaged along the axis nearest S-I, interpolated back) are segmented with the shipped
model as `atlasmorph segment --mask` does, with three image terms of the refinement:

  default   local NCC(subject, warped template), what the tool does
  blurT     local NCC(subject, B(warped template)), B the thick-slice blur along the model grid's S-I axis
            ([1, 2, 3, 2, 1] / 9: a 3-voxel box convolved with the linear interpolation between block centres)
  blurBoth  local NCC(B(subject), B(warped template))

The variants replace `inference.refine.get_image_loss` for the run (a probe, not a tool option). Mean Dice
over the 34 structures on the subject's grid (ood_benchmark.dice_on_grid). Files go under --workdir.

    python benchmarks/thick_refine_probe.py --subjects 3 --workdir runs/ood --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ood_benchmark as ob  # noqa: E402

VARIANTS = ("default", "blurT", "blurBoth")


def thick_blur(x, axis: int = 2):
    """The thick6 blur along `axis` of a (B, 1, X, Y, Z) tensor (edges replicated): the tool's acquisition blur
    of a 3-voxel slice (inference.acquisition), which it applies itself only where the header says so."""
    from atlasmorph_cli.inference.acquisition import acquisition_blur

    return acquisition_blur(x, tuple(3 if a == axis else 1 for a in range(3)))


def image_term(variant: str):
    """The refinement's image loss for a variant (refine calls it as loss(subject, warped template))."""
    from atlasmorph_cli.model.losses import local_ncc

    if variant == "blurT":
        return lambda subject, moved: local_ncc(subject, thick_blur(moved))
    if variant == "blurBoth":
        return lambda subject, moved: local_ncc(thick_blur(subject), thick_blur(moved))
    return local_ncc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=3, help="first N validation subjects by id (default 3)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/ood"), help="where the perturbed subjects go")
    common.add_model_options(ap)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the per-subject results here")
    common.add_data_option(ap)
    args = ap.parse_args(argv)

    import torch

    from atlasmorph_cli import labels
    from atlasmorph_cli.inference import refine
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.io.volumes import load_volume
    from atlasmorph_cli.model.model_file import load_model

    torch.set_num_threads(args.threads)
    data_dir = common.data_folder(args.data)
    model_path = common.model_file(args.model)
    subjects = common.validation_rows(data_dir, args.split, args.subjects)
    model = load_model(model_path)
    original = refine.get_image_loss
    results: dict = {}
    try:
        for row in subjects:
            vec, _ = encode_attributes(model, {"age": row["age"], "sex": row["sex"]})
            for pert in ("clean", "thick6"):
                files = ob.make_case(row, pert, args.workdir, data_dir, 0)
                image, mask, truth = (load_volume(files[k]) for k in ("t1", "mask", "seg"))
                for variant in VARIANTS:
                    refine.get_image_loss = lambda name, v=variant: image_term(v)
                    reg = register_subject(model, image, vec, mask)
                    pred = labels.to_index(reg.labels_to_native()[0], "freesurfer")
                    dice = ob.dice_on_grid(pred, image.affine, labels.to_index(truth.data, "freesurfer"), truth.affine)
                    results.setdefault(pert, {}).setdefault(variant, {})[row["subject"]] = dice
                    print(f"{row['subject']}  {pert:7s} {variant:9s} Dice {dice:.4f}", flush=True)
    finally:
        refine.get_image_loss = original
    print("\nmean Dice    " + "  ".join(f"{v:>9s}" for v in VARIANTS))
    for pert, by_variant in results.items():
        print(f"{pert:12s} " + "  ".join(f"{np.mean(list(by_variant[v].values())):9.4f}" for v in VARIANTS))
    if args.json:
        args.json.write_text(json.dumps({"model": str(model_path), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
