"""`atlasmorph build` on IXI training subjects: time, centrality, sharpness, and Dice of validation subjects
segmented through the built template against the conditional templates (issue 21).

    python benchmarks/build_benchmark.py --n-train 10 --n-val 10 --iterations 3 --out benchmarks/results/build

Every template is used the same way (AtlasMorph network + refinement, only the template differs):
``cond-subject`` is the default of `segment` (each subject's own age/sex), ``cond-group`` the conditional
template of the group's mean attributes (where build starts), ``built`` the template build wrote.
The validation brains are brain-extracted with their own DLMUSE map (seg > 0), as the other benchmarks do.
The ANTs builds of the issue (ants.build_template, SyN-CC) are not run by this script.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

import common


def dice34(pred_fs: np.ndarray, seg_muse: np.ndarray) -> float:
    """Mean Dice over the 34 structures present in the reference."""
    from atlasmorph_cli.labels import N_CLASSES, to_index

    a, b = to_index(pred_fs, "freesurfer"), to_index(seg_muse)
    return float(np.mean([2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c))
                          for c in range(1, N_CLASSES) if np.any(b == c)]))


def segment_through(model, template, row: dict, refine: int) -> float:
    """Dice of one validation subject segmented through `template` (None: its own conditional template)."""
    import nibabel as nib

    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.io.volumes import Volume

    img = nib.load(row["t1"])
    seg = np.asarray(nib.load(row["seg"]).dataobj)
    data = np.asarray(img.dataobj, dtype=np.float32) * (seg > 0)
    subj = Volume(data, img.affine, img.header)
    vec = None if template is not None else encode_attributes(model, {"age": row["age"], "sex": row["sex"]})[0]
    reg = register_subject(model, subj, vec, None, refine=refine, template=template)
    return dice34(reg.labels_to_native()[0], seg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_data_option(ap)
    ap.add_argument("--n-train", type=int, default=10, help="training subjects to build from")
    ap.add_argument("--n-val", type=int, default=10, help="validation subjects to segment")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--refine", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=common.ROOT / "benchmarks" / "results" / "build")
    args = ap.parse_args(argv)
    from atlasmorph_cli.cli.build import BuildRequest, _group_vector, run_build
    from atlasmorph_cli.cli.batch import read_batch_input
    from atlasmorph_cli.inference.build import sharpness
    from atlasmorph_cli.inference.template import load_template, make_template
    from atlasmorph_cli.model.shipped import load

    data = common.data_folder(args.data)
    split = common.json.loads(common.SHIPPED_SPLIT.read_text())
    rows = common.ixi_rows(data)
    train = common.pick_subjects(rows, split["train"], args.n_train)
    val = common.pick_subjects(rows, split["validation"], args.n_val)
    args.out.mkdir(parents=True, exist_ok=True)
    cohort = args.out / f"train{len(train)}.csv"
    with open(cohort, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "t1", "seg", "age", "sex"])
        for r in train:
            w.writerow([r["subject"], r["t1"], r["seg"], r["age"], r["sex"]])
    tpl, lab = args.out / "template.nii.gz", args.out / "template_labels.nii.gz"
    t0 = time.perf_counter()
    report = run_build(BuildRequest(cohort, tpl, labels=lab, iterations=args.iterations, report=args.out / "report.json",
                                    refine=args.refine, threads=args.threads, quiet=True),
                       lambda m: [print("warning:", x, file=sys.stderr) for x in m])
    build_s = time.perf_counter() - t0

    _, model = load(None, args.threads)
    built, _ = load_template(tpl, lab, model.config.model_grid)
    group = make_template(model, _group_vector(model, read_batch_input(cohort), None, lambda m: None)[0])
    vox = 2.0
    templates = {"cond-subject": None, "cond-group": group, "built": built}
    dice = {k: [] for k in templates}
    for r in val:
        for name, t in templates.items():
            dice[name].append(segment_through(model, t, r, args.refine))
        print(r["subject"], {k: round(v[-1], 4) for k, v in dice.items()}, file=sys.stderr)
    result = {
        "build": {"subjects": len(train), "iterations": args.iterations, "refine": args.refine,
                  "seconds": build_s, "report": report},
        "sharpness": {"cond-group": sharpness(group.t1, group.probs[0] < 0.5, vox),
                      "built": sharpness(built.t1, built.probs[0] < 0.5, vox)},
        "dice_validation": {k: {"mean": float(np.mean(v)), "per_subject": v} for k, v in dice.items()},
        "validation_subjects": [r["subject"] for r in val],
        "machine": common.describe_machine(with_torch=True),
        "command": common.command_line("build_benchmark.py", argv),
    }
    common.write_json(args.out / "build_benchmark.json", result)
    print(common.json.dumps({k: result[k] for k in ("sharpness",)}, indent=1))
    print({k: round(v["mean"], 4) for k, v in result["dice_validation"].items()}, f"build {build_s:.0f} s")


if __name__ == "__main__":
    main()
