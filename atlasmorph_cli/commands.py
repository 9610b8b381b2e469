"""What each subcommand does between parsing and writing: check inputs, run the pipeline, write outputs.

Outputs are only written when asked for, and only after all computation succeeded; they are written
as hidden temporary files and renamed into place together at the end (io.all_or_nothing), so a
failure, even while writing, never leaves a partial set behind.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import AtlasMorphError
from .io import Volume, all_or_nothing, atomic_path, check_output_dir, load_volume, save_volume, suffix_of
from .labels import STRUCTURES
from .pipeline import REFINE_STEPS, encode_attributes, load, make_template, register
from .space import MODEL_GRID, resample
from .warpio import WARP_FORMATS, save_displacement, save_itk_affine

Warn = Callable[[list[str]], None]
MNI_XFORM = 4  # NIfTI xform code "MNI152" for outputs on the model grid


def attribute_values(age: float | None, sex: str | None, extra: list[str] | None) -> dict[str, object] | None:
    """Collect --age, --sex and --attr NAME=VALUE into one dict (None when nothing was given)."""
    values: dict[str, object] = {}
    if age is not None:
        values["age"] = age
    if sex is not None:
        values["sex"] = sex
    for item in extra or []:
        if "=" not in item:
            raise AtlasMorphError(f"--attr expects NAME=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        values[k.strip()] = v.strip()
    return values or None


def _check_outputs(paths: list[Path | None]) -> list[Path]:
    """Validate output paths up front (suffix, existing writable folder) so no work is wasted."""
    out = [p for p in paths if p is not None]
    if len(set(str(p.resolve()) for p in out)) != len(out):
        raise AtlasMorphError("two outputs were given the same path")
    for p in out:
        if p.suffix.lower() not in (".csv", ".txt", ".png", ".tfm"):
            suffix_of(p)
        check_output_dir(p)
    return out


def training_reference(reference: Path | None, init: Path | None) -> np.ndarray:
    """The affine target for cohort preparation, on the model grid (see `atlasmorph train --help`)."""
    if reference is not None:
        ref = load_volume(reference)
        from .intensity import normalize

        grid = resample(ref.data, ref.affine, MODEL_GRID)
        return normalize(grid, grid > 0)
    if init is not None:
        _, model = load(init)
        t = make_template(model, encode_attributes(model, None)[0])
        return t.t1 * (t.probs[0] < 0.5)
    from .datadir import find_data_dir
    from .reference import mni_reference

    data = find_data_dir()
    if data is None:
        raise AtlasMorphError("no affine reference: pass --reference (a brain T1 in MNI space) or --init MODEL, "
                              "or set ATLASMORPH_DATA to a folder holding mni152/")
    return mni_reference(data)[0]


# ----------------------------------------------------------------------------------------- template
def parse_ages(age: str | None) -> list[float] | None:
    """'70' -> [70]; '20:80:10' -> [20, 30, ..., 80] (stop included); None -> None."""
    if age is None:
        return None
    try:
        parts = [float(p) for p in age.split(":")]
    except ValueError:
        raise AtlasMorphError(f"--age must be a number or START:STOP:STEP, got '{age}'") from None
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise AtlasMorphError(f"--age range must be START:STOP:STEP with STEP > 0, got '{age}'")
    return list(np.arange(parts[0], parts[1] + parts[2] / 2, parts[2]))


def _with_age(path: Path, age: float) -> Path:
    suffix = suffix_of(path)
    return path.with_name(f"{path.name[: -len(suffix)]}_age-{age:g}{suffix}")


def run_template(output, age, sex, attr, labels, probs, png, model_path, threads, warn: Warn) -> None:
    _check_outputs([output, labels, probs, png])
    ages = parse_ages(age)
    _, model = load(model_path, threads)
    series = ages if ages and len(ages) > 1 else None
    templates = []
    for a in ages or [None]:
        values = attribute_values(a, sex, attr)
        vec, warnings = encode_attributes(model, values)
        warn(warnings)
        templates.append((a, make_template(model, vec)))
    g = MODEL_GRID if not templates else templates[0][1].grid
    writes: list[tuple[Path, np.ndarray, object]] = []
    for a, t in templates:
        name = (lambda p: _with_age(p, a)) if series else (lambda p: p)
        writes.append((name(output), t.t1.astype(np.float32), None))
        if labels:
            writes.append((name(labels), t.labels, np.int32))
        if probs:
            writes.append((name(probs), np.moveaxis(t.probs, 0, -1).astype(np.float32), None))
    with all_or_nothing():
        for path, data, dtype in writes:
            save_volume(data, g.affine, path, dtype=dtype, xform_code=MNI_XFORM)
        if png:
            from .report import template_montage

            template_montage(templates, png, sex)


# ----------------------------------------------------------------------------------------- register
def _load_inputs(image: Path, mask: Path | None) -> tuple[Volume, Volume | None]:
    return load_volume(image), (load_volume(mask) if mask else None)


def run_register(image, attrs, mask, moved, template_out, trans, inverse, affine_out, labels, jacobian,
                 warp_format, model_path, threads, warn: Warn, refine: int = REFINE_STEPS) -> None:
    if warp_format not in WARP_FORMATS:
        raise AtlasMorphError(f"--warp-format must be one of {', '.join(WARP_FORMATS)}, got '{warp_format}'")
    outs = _check_outputs([moved, template_out, trans, inverse, affine_out, labels, jacobian])
    if not outs:
        raise AtlasMorphError("no output requested: give at least one of -o, -O, -t, -T, --affine, --labels, --jacobian")
    subj, m = _load_inputs(image, mask)
    _, model = load(model_path, threads)
    vec, warnings = encode_attributes(model, attrs)
    warn(warnings)
    if attrs is None:
        warn(["no attributes given: using the population-average template"])
    reg = register(model, subj, vec, m, refine=refine)
    writes = register_writes(reg, warp_format, moved, template_out, trans, inverse, affine_out, labels, jacobian)
    with all_or_nothing():
        for w in writes:
            w()


def register_writes(reg, warp_format, moved=None, template_out=None, trans=None, inverse=None, affine_out=None,
                    labels=None, jacobian=None) -> list[Callable[[], object]]:
    """Compute the requested register outputs now; return the calls that write them (run them together)."""
    subj = reg.subject
    g = reg.grid
    # compute everything first, then write: a failure leaves nothing behind
    writes: list[Callable[[], object]] = []
    if moved:
        writes.append(lambda d=reg.subject_to_template(subj.data): save_volume(d, g.affine, moved, xform_code=MNI_XFORM))
    if template_out:
        writes.append(lambda d=reg.to_native(reg.template.t1): save_volume(d, subj.affine, template_out, header=subj.header))
    if trans:
        writes.append(lambda d=reg.warp_subject_to_template_mm(): save_displacement(d, g.affine, trans, warp_format))
    if inverse:
        writes.append(lambda d=reg.warp_template_to_subject_mm(): save_displacement(d, subj.affine, inverse, warp_format))
    if affine_out:
        writes.append(lambda: save_itk_affine(reg.world, affine_out))
    if labels:
        writes.append(lambda d=reg.labels_to_native()[0]: save_volume(d, subj.affine, labels, header=subj.header, dtype=np.int32))
    if jacobian:
        writes.append(lambda d=reg.log_jacobian(): save_volume(d, g.affine, jacobian, dtype=np.float32, xform_code=MNI_XFORM))
    return writes


# ----------------------------------------------------------------------------------------- segment
def write_volumes(path: Path, rows: list[tuple[str, np.ndarray]], voxel_mm3: list[float]) -> None:
    """Structure volumes (mm3) as CSV, one row per subject, in the 34-structure order."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "total_brain", *[s.name for s in STRUCTURES]])
        for (sid, sums), vox in zip(rows, voxel_mm3):
            v = sums[1:] * vox
            w.writerow([sid, f"{v.sum():.1f}", *[f"{x:.1f}" for x in v]])


def run_segment(image, attrs, mask, output, probs, vol, model_path, threads, warn: Warn,
                refine: int = REFINE_STEPS) -> None:
    _check_outputs([output, probs, vol])
    subj, m = _load_inputs(image, mask)
    _, model = load(model_path, threads)
    vec, warnings = encode_attributes(model, attrs)
    warn(warnings)
    if attrs is None:
        warn(["no attributes given: using the population-average template"])
    reg = register(model, subj, vec, m, refine=refine)
    seg, sums = reg.labels_to_native()
    p = np.moveaxis(reg.probs_to_native(), 0, -1) if probs else None
    with all_or_nothing():
        save_volume(seg, subj.affine, output, header=subj.header, dtype=np.int32)
        if p is not None:
            save_volume(p, subj.affine, probs, dtype=np.float32)
        if vol:
            sid = Path(image).name
            write_volumes(vol, [(sid, sums)], [float(np.prod(subj.zooms))])

