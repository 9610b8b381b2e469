"""Figures of a model's conditional templates: a montage across age x sex, and structure volumes vs age.

    python benchmarks/template_figures.py [--model runs/v1/model.safetensors] --out docs/benchmarks

writes into --out:
  template_montage.png   axial, coronal and sagittal mid-slices of the template T1 for ages 20..80
                         (columns) and each sex (row groups), all on one grey scale
  template_volumes.png   lateral ventricles, hippocampus and cerebral cortex (left + right) of the template
                         against age, F and M (lines; volume = sum of the template's probabilities x voxel
                         volume), over the IXI subjects' own volumes measured from their DLMUSE label maps
                         (points)
  template_volumes.json  the numbers behind template_volumes.png

The templates live in MNI space (every subject is affinely aligned to it before the deformable part), so
by default (--space mni) each subject's native volume is divided by the determinant of its affine map to
the MNI152 brain (atlasmorph_cli.geometry.affine.fit_affine, as training prepares subjects; read from a training
cache with --cache when there), i.e. both are head-size normalised volumes in MNI mm3. --space native
plots the subjects' native volumes as measured, without that correction.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from atlasmorph_cli import labels  # noqa: E402
from atlasmorph_cli.errors import AtlasMorphError  # noqa: E402
from atlasmorph_cli.inference.template import Template, encode_attributes, make_template  # noqa: E402
from atlasmorph_cli.model.shipped import load  # noqa: E402

# (title, FreeSurfer ids summed): left + right
STRUCTURE_GROUPS = (
    ("Lateral ventricles", (4, 43)),
    ("Hippocampus", (17, 53)),
    ("Cerebral cortex", (3, 42)),
)
SEX_COLOURS = {"F": "tab:red", "M": "tab:blue", None: "tab:gray"}


def parse_ages(text: str) -> list[float]:
    """'20:80:10' -> [20, 30, ..., 80]; '70' -> [70]."""
    parts = [float(p) for p in text.split(":")]
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise SystemExit(f"ages must be A or START:STOP:STEP, got '{text}'")
    return list(np.arange(parts[0], parts[1] + parts[2] / 2, parts[2]))


def sexes_of(model) -> list[str | None]:
    """The model's sex categories (e.g. F, M), or [None] when it has no sex attribute."""
    for s in model.config.encoder.specs:
        if s.name == "sex" and s.kind == "categorical":
            return list(s.categories)
    return [None]


def template_for(model, age: float | None, sex: str | None) -> Template:
    """The template for (age, sex); attributes the model does not take are ignored (mean for the others)."""
    names = model.config.encoder.names
    if not names:
        return make_template(model, encode_attributes(model, None)[0])
    values: dict[str, object] = {}
    for spec in model.config.encoder.specs:
        if spec.name == "age" and age is not None:
            values["age"] = age
        elif spec.name == "sex" and sex is not None:
            values["sex"] = sex
        elif spec.kind == "numeric":
            values[spec.name] = spec.mean
        else:
            raise SystemExit(f"the model takes '{spec.name}'; this script only knows age and sex")
    vec, _ = encode_attributes(model, values)
    return make_template(model, vec)


def template_volumes(t: Template) -> tuple[dict[str, float], dict[str, float]]:
    """mm3 of each structure group: sum of the template's probabilities x voxel volume (plotted), and the
    volume of its hard (argmax) label map (recorded: the sum also counts small probabilities far away)."""
    voxel = abs(float(np.linalg.det(t.grid.affine[:3, :3])))
    index = {s.fs_id: i + 1 for i, s in enumerate(labels.STRUCTURES)}
    soft = {name: float(sum(t.probs[index[i]].sum(dtype=np.float64) for i in ids) * voxel)
            for name, ids in STRUCTURE_GROUPS}
    return soft, label_volumes(t.probs.argmax(0), voxel)


def label_volumes(index: np.ndarray, voxel_mm3: float) -> dict[str, float]:
    """mm3 of each structure group in a class-index map (0..34)."""
    counts = np.bincount(np.asarray(index, dtype=np.int64).ravel(), minlength=labels.N_CLASSES)
    pos = {s.fs_id: i + 1 for i, s in enumerate(labels.STRUCTURES)}
    return {name: float(sum(counts[pos[i]] for i in ids) * voxel_mm3) for name, ids in STRUCTURE_GROUPS}


def montage(model, ages: list[float], path: Path) -> Path:
    """Rows: axial, coronal, sagittal slices for each sex; columns: ages."""
    plt = common.pyplot()
    sexes = sexes_of(model)
    has_age = "age" in model.config.encoder.names
    ages = ages if has_age else [None]
    views = ("axial", "coronal", "sagittal")
    fig, axes = plt.subplots(3 * len(sexes), len(ages), figsize=(1.9 * len(ages) + 0.6, 2.0 * 3 * len(sexes)),
                             squeeze=False)
    for g, sex in enumerate(sexes):
        for col, age in enumerate(ages):
            v = template_for(model, age, sex).t1
            cx, cy, cz = (s // 2 for s in v.shape)
            # the same slices as atlasmorph_cli.inference.report.template_montage (RAS model grid)
            slices = (v[:, :, cz + 4].T, v[:, cy + 6, :].T, v[cx + 6, :, :].T)
            for k, img in enumerate(slices):
                ax = axes[3 * g + k, col]
                ax.imshow(img, cmap="gray", origin="lower", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_visible(False)
                if col == 0:
                    ax.set_ylabel(f"{sex}, {views[k]}" if sex else views[k], fontsize=9)
            if g == 0:
                axes[0, col].set_title(("template" if not model.config.encoder.names else "average age")
                                       if age is None else f"age {age:g}", fontsize=10)
    kind = "conditional templates" if model.config.encoder.names else "unconditional template"
    fig.suptitle(f"{model.config.name}:\n{kind}" if len(ages) < 3 else f"{model.config.name}: {kind}", fontsize=10)
    return common.save_figure(fig, path)


def subject_volumes(data_dir: Path, n: int | None, space: str, cache: Path | None, threads: int) -> list[dict]:
    """Each IXI subject's structure-group volumes from its own label map (MNI mm3 or native mm3)."""
    from atlasmorph_cli.geometry.affine import fit_affine
    from atlasmorph_cli.geometry.intensity import normalize
    from atlasmorph_cli.io.volumes import load_volume
    from atlasmorph_cli.training.reference import mni_reference
    from atlasmorph_cli.geometry.space import MODEL_GRID

    rows = common.with_attributes([r for r in common.ixi_rows(data_dir) if r.get("seg")], n)
    ref = mni_reference(data_dir)[0] if space == "mni" else None
    out = []
    t0 = time.perf_counter()
    for k, r in enumerate(rows):
        seg = load_volume(r["seg"])
        vol = label_volumes(labels.to_index(seg.data, "muse"), float(np.prod(seg.zooms)))
        det, how = 1.0, "native"
        if space == "mni":
            world = None
            npz = cache / f"{r['subject']}.npz" if cache else None
            if npz is not None and npz.is_file():
                with np.load(npz) as z:
                    world = z["world"] if "world" in z.files else None
                how = "cache" if world is not None else how
            if world is None:
                t1 = load_volume(r["t1"])
                m = seg.data > 0
                world = fit_affine(normalize(t1.data, m), t1.affine, ref, MODEL_GRID, threads=threads)
                how = "fit_affine"
            det = abs(float(np.linalg.det(np.asarray(world)[:3, :3])))  # subject mm3 per MNI mm3
        out.append({"subject": r["subject"], "age": float(r["age"]), "sex": r.get("sex") or None,
                    "affine_det": det, "affine_from": how, "volumes_mm3": {k2: v / det for k2, v in vol.items()}})
        if (k + 1) % 10 == 0 or k + 1 == len(rows):
            print(f"  subjects {k + 1}/{len(rows)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def volume_curves(model, ages: list[float]) -> dict:
    """Per sex ('all' without one): the template's structure-group volumes at each age (soft and hard)."""
    curves = {}
    for sex in sexes_of(model):
        pts = []
        for a in ages:
            soft, hard = template_volumes(template_for(model, a, sex))
            pts.append({"age": float(a), **soft, "hard_label_mm3": hard})
        curves[sex or "all"] = pts
    return curves


def volume_panels(subjects: list[dict], curves: list[tuple[str, str, str, list[dict]]], unit: str, path: Path,
                  marks: tuple | None = None) -> Path:
    """One panel per structure group: the subjects' volumes over age (points, coloured by sex) and curves,
    each (legend label, line style, colour, [{"age": A, <group name>: mm3, ...}]); dotted lines at `marks`."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(STRUCTURE_GROUPS), figsize=(5.1 * len(STRUCTURE_GROUPS), 4.3))
    for ax, (name, _) in zip(axes, STRUCTURE_GROUPS):
        for sex in sorted({s["sex"] for s in subjects}, key=str):
            pts = [s for s in subjects if s["sex"] == sex]
            ax.scatter([s["age"] for s in pts], [s["volumes_mm3"][name] / 1000 for s in pts], s=10, alpha=0.4,
                       color=SEX_COLOURS.get(sex, "tab:gray"), label=f"IXI {sex} (n={len(pts)})")
        for label, style, colour, pts in curves:
            ax.plot([p["age"] for p in pts], [p[name] / 1000 for p in pts], lw=2.3, ls=style, color=colour, label=label)
        for x in marks or ():
            ax.axvline(x, color="k", lw=0.6, ls=":")
        ax.set_title(f"{name} (left + right)", fontsize=10)
        ax.set_xlabel("age (years)")
        ax.set_ylabel(f"volume (cm³), {unit}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6 if len(curves) > 4 else 7)
    return common.save_figure(fig, path)


def sex_colour(sex: str | None) -> str:
    """The colour of a sex category; 'all' (a model without sex) or an unknown category: grey."""
    return SEX_COLOURS.get(sex, SEX_COLOURS[None])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="output folder (default docs/benchmarks)")
    common.add_data_option(ap)
    ap.add_argument("--ages", default="20:80:10", help="montage ages START:STOP:STEP (default 20:80:10)")
    ap.add_argument("--curve-ages", default="20:82:2", help="ages of the volume curves (default 20:82:2)")
    ap.add_argument("--space", choices=("mni", "native"), default="mni",
                    help="subjects' volumes in MNI mm3 (affine-normalised, default) or as measured natively")
    ap.add_argument("--cache", type=Path, default=None,
                    help="training cache folder (OUT/cache of `atlasmorph train`): reuse its affine maps")
    ap.add_argument("--max-subjects", type=int, default=None, help="at most this many IXI subjects (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args(argv)

    try:
        model_path, model = load(args.model, args.threads)
    except AtlasMorphError as exc:
        print(exc, file=sys.stderr)
        return 2
    data_dir = common.data_folder(args.data)
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"model {model_path}: attributes {', '.join(model.config.encoder.names) or 'none'}", flush=True)
    with torch.no_grad():
        p1 = montage(model, parse_ages(args.ages), args.out / "template_montage.png")
        print(f"wrote {p1}", flush=True)
        curve_ages = parse_ages(args.curve_ages)
        curves = volume_curves(model, curve_ages)
    train_range = None
    for s in model.config.encoder.specs:
        if s.name == "age" and s.kind == "numeric":
            train_range = (s.min, s.max)
    print(f"measuring IXI subjects' volumes ({args.space} space) ...", flush=True)
    subjects = subject_volumes(data_dir, args.max_subjects, args.space, args.cache, args.threads)
    unit = "MNI-space mm³ (native / affine det)" if args.space == "mni" else "native mm³"
    p2 = volume_panels(subjects, [(f"template {sex}", "-", sex_colour(sex), pts) for sex, pts in curves.items()],
                       unit, args.out / "template_volumes.png", train_range)
    record = {
        "command": common.command_line("template_figures.py", argv),
        "model": str(model_path),
        "space": args.space,
        "structures": {name: [labels.NAMES[i] for i in ids] for name, ids in STRUCTURE_GROUPS},
        "training_age_range": train_range,
        "template_mm3": curves,
        "subjects": subjects,
    }
    common.write_json(args.out / "template_volumes.json", record)
    print(f"wrote {p2} and {args.out / 'template_volumes.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
