"""Diagnostic (issue 14): how much can an age-specific label map gain at all, whatever network produces it?

For each validation subject (default: aged 60 and over) this builds, on the subject's matched template T1,
probabilistic label maps from the TRAINING subjects themselves: each training subject (model space, from the
training cache) is registered to that T1 by the model's registration network, its labels are carried into
the template's frame, and the label maps are averaged

  emp-all      over all training subjects (a classical population atlas on this T1)
  emp-age      weighted by a Gaussian in age around the subject's age (sigma --sigma years)
  emp-age-sex  the same, same sex only

and then segments the subject with each (the template's T1 unchanged, so registration is the same up to the
refinement) as `atlasmorph segment --template` would, beside the model's own matched and average templates.
emp-age minus emp-all bounds what age-specific labels can add on this grid and registration; the model's
matched minus average is what v2 gets of it.

    python benchmarks/empirical_atlas.py --cache runs/cache --min-age 60 --threads 2 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ARMS = ("matched", "average", "emp-all", "emp-age", "emp-age-sex")


def carried_labels(model, t1, labels, template_t1):
    """One subject's one-hot labels (X, Y, Z) carried into a template's frame (C, X, Y, Z): the subject's
    model-space T1 (X, Y, Z) is registered to template_t1 (1, 1, X, Y, Z) and pulled back by the inverse warp."""
    import torch
    import torch.nn.functional as F

    from atlasmorph_cli.model.layers import warp

    onehot = F.one_hot(torch.as_tensor(labels).long(), model.template_net.n_classes).permute(3, 0, 1, 2)[None].float()
    with torch.no_grad():
        inv = model.predict_warps(torch.as_tensor(t1, dtype=torch.float32)[None, None], template_t1)["inv"]
        return warp(onehot, inv)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_options(ap, cache=True)
    ap.add_argument("--min-age", type=float, default=60.0, help="only validation subjects at least this old")
    ap.add_argument("--sigma", type=float, default=7.0, help="age kernel of emp-age, in years")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the per-subject results here")
    common.add_data_option(ap)
    args = ap.parse_args(argv)

    import torch

    from atlasmorph_cli import labels
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import Template, encode_attributes, make_template
    from atlasmorph_cli.io.volumes import Volume
    from atlasmorph_cli.model.model_file import load_model
    from segmentation_methods import load_subject, score

    torch.set_num_threads(args.threads)
    model_path = common.model_file(args.model)
    data = common.data_folder(args.data)
    split = json.loads(args.split.read_text())
    train_rows = common.pick_subjects(common.ixi_rows(data), split["train"], None)
    train_t1, train_lab = common.load_cached(args.cache, [r["subject"] for r in train_rows])
    rows = [r for r in common.validation_rows(data, args.split) if float(r["age"]) >= args.min_age]
    model = load_model(model_path)
    avg, _ = encode_attributes(model, None)
    train_age = np.array([float(r["age"]) for r in train_rows])
    train_sex = np.array([r["sex"] for r in train_rows])
    results: dict = {}
    for row in rows:
        brain, mask, truth = load_subject({"t1": row["t1"], "seg": row["seg"]})
        mask_vol = Volume(mask.astype(np.float32), brain.affine)
        own, _ = encode_attributes(model, {"age": row["age"], "sex": row["sex"]})
        matched = make_template(model, own)
        w_age = np.exp(-0.5 * ((train_age - float(row["age"])) / args.sigma) ** 2)
        weights = {"emp-all": np.ones_like(w_age), "emp-age": w_age, "emp-age-sex": w_age * (train_sex == row["sex"])}
        sums = {k: 0.0 for k in weights}
        t1_t = torch.from_numpy(matched.t1)[None, None]
        for i in range(len(train_rows)):
            carried = carried_labels(model, train_t1[i], train_lab[i], t1_t)
            for k, w in weights.items():
                if w[i] > 0:
                    sums[k] = sums[k] + float(w[i]) * carried
        templates = {"matched": matched, "average": make_template(model, avg)}
        for k, w in weights.items():
            p = (sums[k] / float(w.sum())).clamp_min(1e-4)
            templates[k] = Template(matched.t1, (p / p.sum(0, keepdim=True)).numpy(), matched.grid)
        rec = {"age": float(row["age"]), "sex": row["sex"],
               "effective_n": {k: float(w.sum() ** 2 / (w ** 2).sum()) for k, w in weights.items()}}
        world = None  # the empirical arms keep the matched template's affine: only the labels differ
        for arm in ARMS:
            reg = register_subject(model, brain, None, mask_vol, template=templates[arm],
                                   world=world if arm.startswith("emp") else None)
            world = reg.world if arm == "matched" else world
            seg, _ = reg.labels_to_native()
            rec[arm] = score(labels.to_index(seg, "freesurfer"), truth)["dice"]
        results[row["subject"]] = rec
        print(f"{row['subject']}  {rec['age']:5.1f} {rec['sex']} " + "  ".join(f"{a} {rec[a]:.4f}" for a in ARMS), flush=True)
    print(f"\nmean Dice over {len(results)} subjects: "
          + "  ".join(f"{a} {np.mean([r[a] for r in results.values()]):.4f}" for a in ARMS))
    if args.json:
        common.write_json(args.json, {"model": str(model_path), "min_age": args.min_age, "sigma": args.sigma,
                                      "command": common.command_line("empirical_atlas.py", argv),
                                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
