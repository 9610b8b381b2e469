"""Diagnostic (issue 14): which part of the conditional template pays off in segmentation, its shape or its labels?

A v2 template is base o exp(w(a)) + r(a): an attribute-dependent deformation w of the learned base and an
attribute-dependent residual r (T1 and label logits). For IXI validation subjects this scores four templates
built from the subject's own attributes (a) and the population average (avg), each used as `atlasmorph
segment --template` would use it (same registration, default refinement, labels carried to the subject):

  matched    w(a),   r(a)      what the tool uses
  average    w(avg), r(avg)    the population-average template
  shape      w(a),   r(avg)    the matched shape with the average labels and intensities
  residual   w(avg), r(a)      the average shape with the matched labels and intensities

Mean Dice over the 34 structures (segmentation_methods.score), per age group.

    python benchmarks/template_parts.py --min-age 60 --threads 2 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ARMS = {"matched": ("a", "a"), "average": ("avg", "avg"), "shape": ("a", "avg"), "residual": ("avg", "a")}


def hybrid_template(model, shape_attrs, residual_attrs):
    """The template base o exp(w(shape_attrs)) + r(residual_attrs) (inference.template.Template)."""
    import torch

    from atlasmorph_cli.inference.template import Template
    from atlasmorph_cli.model.layers import integrate_velocity, resize_field, warp
    from atlasmorph_cli.model.networks import TemplateNet, upsample2

    net = model.template_net
    with torch.no_grad():
        _, vel = net.branches(shape_attrs)
        residual, _ = net.branches(residual_attrs)
        out = net.base
        if vel is not None:
            out = warp(out, resize_field(integrate_velocity(vel, net.int_steps), 2.0))
        if residual is not None:
            out = out + upsample2(residual)
        t1, logits = TemplateNet.split(out)
        probs = torch.softmax(logits, 1)
    return Template(t1[0, 0].clamp(0, 1).numpy(), probs[0].numpy(), model.config.model_grid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_options(ap)
    ap.add_argument("--min-age", type=float, default=0.0, help="only validation subjects at least this old")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the per-subject results here")
    common.add_data_option(ap)
    args = ap.parse_args(argv)

    import torch

    from atlasmorph_cli import labels
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.io.volumes import Volume
    from atlasmorph_cli.model.model_file import load_model
    from segmentation_methods import load_subject, score

    torch.set_num_threads(args.threads)
    model_path = common.model_file(args.model)
    rows = [r for r in common.validation_rows(common.data_folder(args.data), args.split)
            if float(r["age"]) >= args.min_age]
    model = load_model(model_path)
    avg, _ = encode_attributes(model, None)
    results: dict = {}
    for row in rows:
        brain, mask, truth = load_subject({"t1": row["t1"], "seg": row["seg"]})
        mask_vol = Volume(mask.astype(np.float32), brain.affine)
        own, _ = encode_attributes(model, {"age": row["age"], "sex": row["sex"]})
        pick = {"a": own, "avg": avg}
        rec = {"age": float(row["age"]), "sex": row["sex"]}
        for arm, (shape_of, residual_of) in ARMS.items():
            tmpl = hybrid_template(model, pick[shape_of], pick[residual_of])
            seg, _ = register_subject(model, brain, None, mask_vol, template=tmpl).labels_to_native()
            rec[arm] = score(labels.to_index(seg, "freesurfer"), truth)["dice"]
        results[row["subject"]] = rec
        print(f"{row['subject']}  {rec['age']:5.1f} " + "  ".join(f"{a} {rec[a]:.4f}" for a in ARMS), flush=True)
    print(f"\nmean Dice over {len(results)} subjects: "
          + "  ".join(f"{a} {np.mean([r[a] for r in results.values()]):.4f}" for a in ARMS))
    if args.json:
        args.json.write_text(json.dumps({"model": str(model_path), "min_age": args.min_age, "results": results},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
