"""Does the template age like the cohort? Template volume trajectories and sharpness of one or more models.

    python benchmarks/conditioning.py --model models/atlasmorph-ixi-2mm-v1.safetensors --model runs/v2/model.safetensors \
        --subjects docs/benchmarks/template_volumes.json --out docs/benchmarks/conditioning

For each model and sex: the template's lateral ventricle, hippocampus and cortex volumes (sum of its
probabilities, MNI mm3) from age 20 to 82, the ratio 75 / 25, and the template's sharpness (mean gradient
magnitude of the T1 inside the brain at ages 25, 50, 75). The cohort's own trend is the linear fit over
age of the IXI subjects' volumes from their DLMUSE label maps, divided by the determinant of their affine
map to MNI (head-size normalised, as benchmarks/template_figures.py measures them; `--subjects` reuses a
template_volumes.json that script wrote, else they are measured, `--cache` reusing a training cache's
affine maps). Targets (issue 14): ventricles 75/25 >= 2.4, cortex within 0.04 of the cohort's ratio,
hippocampus not growing. Writes conditioning.json, conditioning.md and trajectories.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from atlasmorph_cli.inference.build import sharpness  # noqa: E402
from atlasmorph_cli.model.shipped import load  # noqa: E402
from template_figures import (  # noqa: E402
    STRUCTURE_GROUPS, parse_ages, sex_colour, sexes_of, subject_volumes, template_for, template_volumes, volume_panels,
)

YOUNG, OLD = 25.0, 75.0
TARGET_VENTRICLE_RATIO = 2.4
CORTEX_TOLERANCE = 0.04


def cohort_fit(subjects: list[dict]) -> dict:
    """Linear fit of each structure group's volume over age; its value at 25 and 75 and their ratio."""
    ages = np.array([s["age"] for s in subjects], dtype=float)
    out = {}
    for name, _ in STRUCTURE_GROUPS:
        vols = np.array([s["volumes_mm3"][name] for s in subjects], dtype=float)
        slope, icpt = np.polyfit(ages, vols, 1)
        young, old = icpt + slope * YOUNG, icpt + slope * OLD
        out[name] = {"slope_mm3_per_year": float(slope), "at_25": float(young), "at_75": float(old),
                     "ratio_75_25": float(old / young)}
    return out


def model_record(model, curve_ages: list[float]) -> dict:
    """Curves, 75/25 ratios and sharpness of one model's templates, per sex."""
    rec: dict = {"name": model.config.name, "attributes": model.config.encoder.names, "sexes": {}}
    for sex in sexes_of(model):
        curve = []
        for a in curve_ages:
            soft, _ = template_volumes(template_for(model, a, sex))
            curve.append({"age": float(a), **soft})
        young, young_hard = template_volumes(template_for(model, YOUNG, sex))
        old, old_hard = template_volumes(template_for(model, OLD, sex))
        sharp = {}
        for a in (YOUNG, 50.0, OLD):
            t = template_for(model, a, sex)
            sharp[f"{a:g}"] = sharpness(t.t1, t.probs[0] < 0.5, 1.0)  # per model voxel, as reported since v1
        rec["sexes"][sex or "all"] = {
            "curve": curve, "at_25": young, "at_75": old,
            "ratio_75_25": {k: old[k] / young[k] for k in young}, "sharpness": sharp,
            # the same from the argmax label maps: a template cannot meet the targets by blurring its probabilities
            "ratio_75_25_argmax": {k: old_hard[k] / young_hard[k] for k in young_hard},
        }
    return rec


def verdict(rec: dict, cohort: dict) -> dict:
    """Issue 14's three trajectory targets, per sex."""
    out = {}
    for sex, r in rec["sexes"].items():
        ratio = r["ratio_75_25"]
        out[sex] = {
            "ventricles_ratio_ge_2.4": ratio["Lateral ventricles"] >= TARGET_VENTRICLE_RATIO,
            "cortex_within_0.04": abs(ratio["Cerebral cortex"] - cohort["Cerebral cortex"]["ratio_75_25"])
            <= CORTEX_TOLERANCE,
            "hippocampus_not_growing": ratio["Hippocampus"] <= 1.0,
        }
    return out


def figure(records: list[dict], subjects: list[dict], path: Path) -> Path:
    """The cohort's volumes over age and every model's template curves (one line style per model)."""
    styles = ["--", "-", ":", "-."]
    curves = [(f"{rec['name']} {sex}", styles[k % len(styles)], sex_colour(sex), r["curve"])
              for k, rec in enumerate(records) for sex, r in rec["sexes"].items()]
    return volume_panels(subjects, curves, "MNI space", path)


def markdown(records: list[dict], cohort: dict, command: str) -> str:
    names = [n for n, _ in STRUCTURE_GROUPS]
    lines = [f"Produced by `{command}`.", "",
             "| model | sex | " + " | ".join(f"{n} 75/25" for n in names) + " | sharpness 25 / 50 / 75 |",
             "|---|---|" + "---|" * len(names) + "---|",
             "| IXI cohort (linear fit) | all | " + " | ".join(f"{cohort[n]['ratio_75_25']:.2f}" for n in names)
             + " | |"]
    for rec in records:
        for sex, r in rec["sexes"].items():
            s = r["sharpness"]
            lines.append(f"| {rec['name']} | {sex} | "
                         + " | ".join(f"{r['ratio_75_25'][n]:.2f}" for n in names)
                         + f" | {s['25']:.4f} / {s['50']:.4f} / {s['75']:.4f} |")
    lines += ["", "The same ratios from the templates' argmax label maps:", "",
              "| model | sex | " + " | ".join(f"{n} 75/25" for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for rec in records:
        for sex, r in rec["sexes"].items():
            lines.append(f"| {rec['name']} | {sex} | "
                         + " | ".join(f"{r['ratio_75_25_argmax'][n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help="model file (repeatable; default: the shipped model)")
    ap.add_argument("--subjects", type=Path, default=None,
                    help="a template_volumes.json of template_figures.py: reuse its subjects' volumes")
    ap.add_argument("--cache", type=Path, default=None, help="training cache (affine maps) when measuring subjects")
    common.add_data_option(ap)
    ap.add_argument("--curve-ages", default="20:82:2", help="ages of the curves (default 20:82:2)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/conditioning"), help="output folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    command = common.command_line("conditioning.py", argv)

    if args.subjects is not None:
        subjects = json.loads(args.subjects.read_text())["subjects"]
    else:
        subjects = subject_volumes(common.data_folder(args.data), None, "mni", args.cache, args.threads)
    cohort = cohort_fit(subjects)
    records = []
    with torch.no_grad():
        for path in args.model or [None]:
            p, model = load(path, args.threads)
            rec = model_record(model, parse_ages(args.curve_ages))
            rec["path"] = str(p)
            rec["targets"] = verdict(rec, cohort)
            records.append(rec)
            print(f"{p}: " + "; ".join(
                f"{sex}: " + ", ".join(f"{n.split()[-1]} x{r['ratio_75_25'][n]:.2f}" for n, _ in STRUCTURE_GROUPS)
                for sex, r in rec["sexes"].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(records, subjects, args.out / "trajectories.png")
    common.write_json(args.out / "conditioning.json",
                      {"command": command, "cohort_fit": cohort, "n_subjects": len(subjects), "models": records})
    (args.out / "conditioning.md").write_text(markdown(records, cohort, command))
    print(markdown(records, cohort, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
