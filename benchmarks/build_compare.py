"""Built templates side by side (issue 21): Dice of validation subjects segmented through each, the group's
centrality to it and its sharpness, all with the same registration (AtlasMorph network + refinement).

    python benchmarks/build_compare.py --work runs/build --json docs/benchmarks/build_compare.json

Arms (`--arms`, default: every one found in --work, plus cond-subject and cond-group-N for each group size N):
  cond-subject    the default of `segment`: each validation subject's own age/sex conditional template
  cond-group-N    the conditional template of the mean attributes of the first N training subjects
  ours-N-itK      runs/build/ours-N-itK/ (benchmarks/build_benchmark.py): template + template_probs
  ants-P-N-itK    runs/build/ants-P-N/itK/template.nii.gz + labels-itK/template_probs.nii.gz (build_ants.py)
Every arm is used the same way, as `segment --template T --template-labels PROBS` does (load_template,
then register_subject + labels_to_native): only the template differs. Validation brains: T1 inside
the subject's DLMUSE seg > 0, as the other benchmarks.

Measures: mean Dice over the 34 structures per validation subject (cached per arm, template content and
subject in WORK/eval/ARM/SUBJECT.json, so an interrupted run goes on); centrality: the arm's own group
(the N training subjects it was built from) registered to it, the deformable subject -> template field
inside the template's brain: `spread_mm` = mean over voxels of the mean length, `bias_mm` = mean over
voxels of the length of the group's mean displacement (0 for a perfectly central template), and the
affine's mean scale (det^(1/3)); sharpness: inference.build.sharpness of the template after the same
intensity normalisation for all.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common

VOXEL_MM = 2.0  # the model grid's


@dataclass
class Arm:
    """A template to compare: its name, files (None for conditional templates), and the group it came from."""

    name: str
    t1: Path | None = None
    labels: Path | None = None
    group: int | None = None  # the first `group` training subjects (None: cond-subject, no group)

    def key(self, model_sha: str) -> str:
        """What the cached results depend on: the template's files (or the model, for conditional ones)."""
        if self.t1 is None:
            return f"{self.name}:{model_sha}"
        return f"{common.file_sha256(self.t1)[:16]}:{common.file_sha256(self.labels)[:16]}"


def resolve(name: str, work: Path) -> Arm:
    """The arm of a name (module docstring); SystemExit when its files are missing."""
    if name == "cond-subject":
        return Arm(name)
    if m := re.fullmatch(r"cond-group-(\d+)", name):
        return Arm(name, group=int(m[1]))
    if m := re.fullmatch(r"ours-(\d+)-it(\d+)", name):
        arm = Arm(name, work / name / "template.nii.gz", work / name / "template_probs.nii.gz", int(m[1]))
    elif m := re.fullmatch(r"ants-(\w+)-(\d+)-it(\d+)", name):
        folder = work / f"ants-{m[1]}-{m[2]}"
        arm = Arm(name, folder / f"it{m[3]}" / "template.nii.gz", folder / f"labels-it{m[3]}" / "template_probs.nii.gz",
                  int(m[2]))
    else:
        raise SystemExit(f"unknown arm {name!r} (cond-subject, cond-group-N, ours-N-itK, ants-P-N-itK)")
    for p in (arm.t1, arm.labels):
        if not p.is_file():
            raise SystemExit(f"arm {name}: {p} is missing (build it first)")
    return arm


def found_arms(work: Path) -> list[str]:
    """Every finished arm in `work`, the conditional ones first (cond-group-N for each group size found)."""
    built = sorted(p.parent.name for p in work.glob("ours-*-it*/template_probs.nii.gz"))
    built += sorted(f"{p.parent.parent.name}-it{p.parent.name[len('labels-it'):]}"
                    for p in work.glob("ants-*/labels-it*/template_probs.nii.gz"))
    sizes = sorted({resolve(b, work).group for b in built})
    return ["cond-subject", *[f"cond-group-{n}" for n in sizes], *built]


# ------------------------------------------------------------------------------------------ measures
class Context:
    """The model, the data rows and the loaded templates, shared by every measure."""

    def __init__(self, data: Path, threads: int, refine: int):
        from atlasmorph_cli.model.shipped import load

        self.path, self.model = load(None, threads)
        self.model_sha = common.file_sha256(self.path)[:16]
        self.refine = refine
        split = json.loads(common.SHIPPED_SPLIT.read_text())
        rows = common.ixi_rows(data)
        self.train = common.pick_subjects(rows, split["train"], None)
        self.validation = common.pick_subjects(rows, split["validation"], None)
        self._templates: dict[str, object] = {}

    def template(self, arm: Arm, row: dict | None = None):
        """The arm's template (model grid): read from its files, or the conditional template."""
        from atlasmorph_cli.inference.template import encode_attributes, load_template, make_template

        if arm.name == "cond-subject":
            vec = encode_attributes(self.model, {"age": row["age"], "sex": row["sex"]})[0]
            return make_template(self.model, vec)
        if arm.name not in self._templates:
            if arm.t1 is None:
                vectors = [encode_attributes(self.model, {"age": r["age"], "sex": r["sex"]})[0]
                           for r in self.train[:arm.group]]
                import torch

                self._templates[arm.name] = make_template(self.model, torch.stack(vectors).mean(0))
            else:
                t, warnings = load_template(arm.t1, arm.labels, self.model.config.model_grid)
                for w in warnings:
                    print(f"{arm.name}: {w}", file=sys.stderr)
                self._templates[arm.name] = t
        return self._templates[arm.name]

    def register(self, arm: Arm, row: dict):
        """A subject (brain = T1 inside seg > 0) registered to the arm's template; also its true labels."""
        from atlasmorph_cli.inference.registration import register_subject
        from atlasmorph_cli.io.volumes import Volume
        from segmentation_methods import load_subject

        brain, mask, truth = load_subject({"t1": row["t1"], "seg": row["seg"]})
        reg = register_subject(self.model, brain, None, Volume(mask.astype(np.float32), brain.affine),
                               refine=self.refine, template=self.template(arm, row))
        return reg, truth


def dice_of(ctx: Context, arm: Arm, row: dict, cache: Path) -> float:
    """Mean Dice of one validation subject segmented through the arm's template (cached)."""
    from atlasmorph_cli import labels
    from segmentation_methods import score

    path = cache / "eval" / arm.name / f"{row['subject']}.json"
    key = arm.key(ctx.model_sha)
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("key") == key and rec.get("refine") == ctx.refine:
            return rec["dice"]
    t0 = time.perf_counter()
    reg, truth = ctx.register(arm, row)
    rec = score(labels.to_index(reg.labels_to_native()[0], "freesurfer"), truth)
    rec.update({"key": key, "refine": ctx.refine, "seconds": time.perf_counter() - t0})
    common.write_json(path, rec)
    return rec["dice"]


def centrality(ctx: Context, arm: Arm, cache: Path) -> dict | None:
    """The arm's own group registered to it: spread, bias (mm) and mean affine scale (cached per arm)."""
    if arm.group is None:
        return None
    path = cache / "central" / f"{arm.name}.json"
    key = arm.key(ctx.model_sha)
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("key") == key and rec.get("refine") == ctx.refine:
            return rec
    t0 = time.perf_counter()
    template = ctx.template(arm)
    brain = template.probs[0] < 0.5
    total, lengths, scales = None, None, []
    for row in ctx.train[:arm.group]:
        reg, _ = ctx.register(arm, row)
        u = reg.subject_to_template_field.double().numpy()
        total = u if total is None else total + u
        n = np.sqrt((u ** 2).sum(0))
        lengths = n if lengths is None else lengths + n
        scales.append(float(np.cbrt(abs(np.linalg.det(reg.world[:3, :3])))))
    k = arm.group
    rec = {"key": key, "refine": ctx.refine, "subjects": k,
           "spread_mm": float((lengths / k)[brain].mean() * VOXEL_MM),
           "bias_mm": float(np.sqrt(((total / k) ** 2).sum(0))[brain].mean() * VOXEL_MM),
           "affine_scale_mean": float(np.mean(scales)), "seconds": time.perf_counter() - t0}
    common.write_json(path, rec)
    return rec


def template_sharpness(ctx: Context, arm: Arm, row: dict | None = None) -> float:
    """Mean intensity gradient in the template's brain, per mm, after the same normalisation for all."""
    from atlasmorph_cli.geometry.intensity import normalize
    from atlasmorph_cli.inference.build import sharpness

    t = ctx.template(arm, row)
    brain = t.probs[0] < 0.5
    return sharpness(normalize(t.t1, brain) * brain, brain, VOXEL_MM)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_data_option(ap)
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "build")
    ap.add_argument("--arms", default=None, help="comma list (default: every arm found in --work)")
    ap.add_argument("--n-val", type=int, default=None, help="first N validation subjects (default: all 23)")
    ap.add_argument("--no-centrality", action="store_true", help="skip registering each arm's group to it")
    ap.add_argument("--refine", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here (e.g. docs/benchmarks/)")
    args = ap.parse_args(argv)
    data = common.data_folder(args.data)
    names = args.arms.split(",") if args.arms else found_arms(args.work)
    arms = [resolve(n, args.work) for n in names]
    ctx = Context(data, args.threads, args.refine)
    val = ctx.validation[:args.n_val] if args.n_val else ctx.validation

    dice: dict[str, list[float]] = {a.name: [] for a in arms}
    for i, row in enumerate(val):
        for a in arms:
            dice[a.name].append(dice_of(ctx, a, row, args.work))
        print(f"{i + 1}/{len(val)} {row['subject']}: " + " ".join(f"{k} {v[-1]:.3f}" for k, v in dice.items()),
              file=sys.stderr)
    summary = {"validation_subjects": [r["subject"] for r in val], "refine": args.refine, "arms": {}}
    for a in arms:
        d = np.asarray(dice[a.name])
        summary["arms"][a.name] = {
            "template": str(a.t1) if a.t1 else None, "labels": str(a.labels) if a.labels else None,
            "dice_mean": float(d.mean()), "dice_std": float(d.std()), "dice": d.tolist(),
            "sharpness": float(np.mean([template_sharpness(ctx, a, r) for r in val])) if a.name == "cond-subject"
            else template_sharpness(ctx, a),
            "centrality": None if args.no_centrality else centrality(ctx, a, args.work),
        }
    best = max((n for n in summary["arms"] if n.startswith("ants-")), default=None,
               key=lambda n: summary["arms"][n]["dice_mean"])
    if best is not None:
        summary["best_ants"] = best
        for n, rec in summary["arms"].items():
            diff = np.asarray(rec["dice"]) - np.asarray(summary["arms"][best]["dice"])
            rec["vs_best_ants"] = {"mean_difference": float(diff.mean()), "wins": int((diff > 0).sum()),
                                   "of": int(diff.size)}
    summary.update({"machine": common.describe_machine(with_torch=True),
                    "command": common.command_line("build_compare.py", argv)})
    common.write_json(args.work / "build_compare.json", summary)
    if args.json is not None:
        common.write_json(args.json, summary)
    print("| arm | Dice | sharpness | spread mm | bias mm | affine scale | vs best ANTs |")
    print("|---|---|---|---|---|---|---|")
    for n, rec in summary["arms"].items():
        c = rec["centrality"] or {}
        vs = rec.get("vs_best_ants")
        print(f"| {n} | {rec['dice_mean']:.4f} ± {rec['dice_std']:.4f} | {rec['sharpness']:.4f} | "
              f"{c.get('spread_mm', float('nan')):.2f} | {c.get('bias_mm', float('nan')):.2f} | "
              f"{c.get('affine_scale_mean', float('nan')):.3f} | "
              + (f"{vs['mean_difference']:+.4f} ({vs['wins']}/{vs['of']})" if vs else "") + " |")


if __name__ == "__main__":
    main()
