"""What each subcommand does between parsing and writing: check inputs, run the pipeline, write outputs.

Outputs are only written when asked for, after the registration succeeded; they are written as
hidden temporary files and renamed into place together at the end (io.all_or_nothing), so a
failure, even while writing, never leaves a partial set behind. Large outputs are computed one at a
time as they are written (register's outputs, segment's probabilities frame by frame, template's
ages), so memory holds one of them, not all.
"""
from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from ..inference.brain_extraction import Brain, resolve_brain
from ..inference.quality import CSV_COLUMNS, Quality, QualityError, assess
from ..inference.quality import write_json as write_quality
from ..errors import AtlasMorphError
from .safety import outputs_not_inputs
from ..io.stream import save_native_probs
from ..io.volumes import Volume, all_or_nothing, atomic_path, check_output_dir, load_volume, save_volume, suffix_of
from ..labels import STRUCTURES
from ..inference.registration import REFINE_STEPS, encode_attributes, load, make_template, register
from ..geometry.space import MODEL_GRID, resample
from ..warpio import WARP_FORMATS, save_displacement, save_itk_affine

Warn = Callable[[list[str]], None]
MAX_AGES = 1000  # templates one `template --age START:STOP:STEP` may write (each is written, then freed)
MONTAGE_AGES = 25  # columns of a --png montage at most (evenly spaced over the ages, first and last included)
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
        k, v = (x.strip() for x in item.split("=", 1))
        if k in values:  # --attr age=75 with --age 40, or the same name twice: no silent winner
            first = (f"--{k} {values[k]}" if (k == "age" and age is not None) or (k == "sex" and sex is not None)
                     else f"--attr {k}={values[k]}")
            raise AtlasMorphError(f"{k} is given twice ({first} and --attr {k}={v}); give it once")
        values[k] = v
    return values or None


def _check_outputs(paths: list[Path | None]) -> list[Path]:
    """Validate output paths up front (suffix, existing writable folder) so no work is wasted."""
    out = [p for p in paths if p is not None]
    if len(set(str(p.resolve()) for p in out)) != len(out):
        raise AtlasMorphError("two outputs were given the same path")
    for p in out:
        if p.suffix.lower() not in (".csv", ".txt", ".png", ".tfm", ".json"):
            suffix_of(p)
        check_output_dir(p)
    return out


def training_reference(reference: Path | None, init: Path | None) -> np.ndarray:
    """The affine target for cohort preparation, on the model grid (see `atlasmorph train --help`)."""
    if reference is not None:
        ref = load_volume(reference)
        from ..geometry.intensity import normalize

        grid = resample(ref.data, ref.affine, MODEL_GRID)
        return normalize(grid, grid > 0)
    if init is not None:
        _, model = load(init)
        t = make_template(model, encode_attributes(model, None)[0])
        return t.t1 * (t.probs[0] < 0.5)
    from ..io.datadir import find_data_dir
    from ..training.reference import mni_reference

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
    if not all(np.isfinite(parts)):
        raise AtlasMorphError(f"--age must be finite numbers, got '{age}'")
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise AtlasMorphError(f"--age range must be START:STOP:STEP with STEP > 0, got '{age}'")
    n = int(np.floor((parts[1] - parts[0]) / parts[2] + 0.5)) + 1  # counted before anything is allocated
    if n > MAX_AGES:
        raise AtlasMorphError(f"--age {age} asks for {n} templates; at most {MAX_AGES} per command "
                              "(use a larger STEP)")
    return [float(a) for a in np.arange(parts[0], parts[1] + parts[2] / 2, parts[2])]


def _with_age(path: Path, age: float) -> Path:
    suffix = suffix_of(path)
    return path.with_name(f"{path.name[: -len(suffix)]}_age-{age:g}{suffix}")


def montage_ages(ages: list) -> list:
    """The ages a --png montage shows: all of them, or MONTAGE_AGES evenly spaced (first and last included)."""
    if len(ages) <= MONTAGE_AGES:
        return list(ages)
    return [ages[i] for i in sorted({int(round(j)) for j in np.linspace(0, len(ages) - 1, MONTAGE_AGES)})]


@outputs_not_inputs
def run_template(output, age, sex, attr, labels, probs, png, model_path, threads, warn: Warn) -> None:
    _check_outputs([output, labels, probs, png])
    ages = parse_ages(age)
    _, model = load(model_path, threads)
    series = ages if ages and len(ages) > 1 else None
    vectors = []
    for a in ages or [None]:  # every age's attributes are checked before anything is computed
        vec, warnings = encode_attributes(model, attribute_values(a, sex, attr))
        warn(warnings)
        vectors.append((a, vec))
    shown = montage_ages([a for a, _ in vectors]) if png else []
    kept = []
    # one template at a time: computed, written (to temporary files, renamed together at the end), freed;
    # memory does not grow with the number of ages
    with all_or_nothing():
        for a, vec in vectors:
            t = make_template(model, vec)
            name = (lambda p: _with_age(p, a)) if series else (lambda p: p)
            save_volume(t.t1.astype(np.float32), t.grid.affine, name(output), xform_code=MNI_XFORM)
            if labels:
                save_volume(t.labels, t.grid.affine, name(labels), dtype=np.int32, xform_code=MNI_XFORM)
            if probs:
                save_volume(np.moveaxis(t.probs, 0, -1), t.grid.affine, name(probs), dtype=np.float32,
                            xform_code=MNI_XFORM)
            if a in shown:
                kept.append((a, SimpleNamespace(t1=t.t1)))
            del t
        if png:
            from ..inference.report import template_montage

            template_montage(kept, png, sex)


# ----------------------------------------------------------------------------------------- register
def _load_inputs(image: Path, mask: Path | None) -> tuple[Volume, Volume | None]:
    return load_volume(image), (load_volume(mask) if mask else None)


def check_quality(reg, brain: Brain, name: str, warn: Warn) -> Quality:
    """The subject's quality (quality.py); one warning line naming it and the reasons when it is flagged."""
    q = assess(reg, brain.mask, name, brain.source)
    if q.flagged:
        warn([q.warning()])
    return q


def strict_exit(strict: bool, qualities: list[Quality]) -> None:
    """With --strict, a flagged subject makes the command fail (exit code 3) after its outputs are written."""
    bad = [q for q in qualities if q.flagged]
    if strict and bad:
        names = ", ".join(q.subject for q in bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise QualityError(f"--strict: {len(bad)} of {len(qualities)} subject(s) failed the quality check ({names}); "
                           "their outputs were written")


def attributes_text(attrs: dict | None) -> str:
    """'age 70, sex F' for a QC picture's title ('population-average template' without attributes)."""
    if not attrs:
        return "population-average template"
    return ", ".join(f"{k} {v}" for k, v in attrs.items() if v is not None)


def qc_write(reg, brain: Brain, q: Quality, path: Path, attrs: dict | None,
             labels: np.ndarray | None = None) -> Callable[[], object]:
    """The call that draws and writes a subject's QC picture (qc.py); labels: its segmentation, if computed."""
    from ..inference.qc import qc_figure

    def write():
        lab = labels if labels is not None else reg.labels_to_native()[0]
        return qc_figure(reg.subject, brain.mask, lab, q, path, attributes_text(attrs))

    return write


def brain_writes(subj: Volume, brain: Brain, brain_mask_out: Path | None = None,
                 brain_out: Path | None = None) -> list[Callable[[], object]]:
    """Writers of the brain mask (uint8) and the skull-stripped image, both on the input's grid."""
    writes: list[Callable[[], object]] = []
    if brain_mask_out:
        writes.append(lambda: save_volume(brain.mask, subj.affine, brain_mask_out, header=subj.header, dtype=np.uint8))
    if brain_out:
        writes.append(lambda: save_volume(np.where(brain.mask, subj.data, 0).astype(np.float32), subj.affine,
                                          brain_out, header=subj.header, dtype=np.float32))
    return writes


@outputs_not_inputs
def run_register(image, attrs, mask, moved, template_out, trans, inverse, affine_out, labels, jacobian,
                 warp_format, model_path, threads, warn: Warn, refine: int = REFINE_STEPS, *,
                 skullstripped: bool = False, brain_mask_out: Path | None = None,
                 brain_out: Path | None = None, quality_out: Path | None = None, strict: bool = False,
                 qc_out: Path | None = None) -> None:
    if warp_format not in WARP_FORMATS:
        raise AtlasMorphError(f"--warp-format must be one of {', '.join(WARP_FORMATS)}, got '{warp_format}'")
    outs = _check_outputs([moved, template_out, trans, inverse, affine_out, labels, jacobian, brain_mask_out, brain_out,
                           quality_out, qc_out])
    if not outs:
        raise AtlasMorphError("no output requested: give at least one of -o, -O, -t, -T, --affine, --labels, "
                              "--jacobian, --brain-mask, --brain, --quality, --qc")
    subj, m = _load_inputs(image, mask)
    brain = resolve_brain(subj, m, skullstripped)
    warn(brain.warnings)
    _, model = load(model_path, threads)
    vec, warnings = encode_attributes(model, attrs)
    warn(warnings)
    if attrs is None:
        warn(["no attributes given: using the population-average template"])
    reg = register(model, subj, vec, brain.as_volume(subj), refine=refine)
    q = check_quality(reg, brain, Path(image).name, warn)
    writes = register_writes(reg, warp_format, moved, template_out, trans, inverse, affine_out, labels, jacobian)
    writes += brain_writes(subj, brain, brain_mask_out, brain_out)
    if quality_out:
        writes.append(lambda: write_quality(quality_out, [q]))
    if qc_out:
        writes.append(qc_write(reg, brain, q, qc_out, attrs))
    with all_or_nothing():
        for w in writes:
            w()
    strict_exit(strict, [q])


def register_writes(reg, warp_format, moved=None, template_out=None, trans=None, inverse=None, affine_out=None,
                    labels=None, jacobian=None) -> list[Callable[[], object]]:
    """The calls that compute and write each requested register output; run them inside all_or_nothing().

    Each output is computed when its call runs and freed once written, so memory holds one output at a
    time, not all of them (a 1 mm image with every output: 1.7 GB before); the writes go to temporary
    files renamed together at the end of the block, so a failure still leaves nothing behind.
    """
    subj = reg.subject
    g = reg.grid
    writes: list[Callable[[], object]] = []
    if moved:
        writes.append(lambda: save_volume(reg.subject_to_template(subj.data), g.affine, moved, xform_code=MNI_XFORM))
    if template_out:
        writes.append(lambda: save_volume(reg.to_native(reg.template.t1), subj.affine, template_out, header=subj.header))
    if trans:
        writes.append(lambda: save_displacement(reg.warp_subject_to_template_mm(), g.affine, trans, warp_format))
    if inverse:
        writes.append(lambda: save_displacement(reg.warp_template_to_subject_mm(), subj.affine, inverse, warp_format))
    if affine_out:
        writes.append(lambda: save_itk_affine(reg.world, affine_out))
    if labels:
        writes.append(lambda: save_volume(reg.labels_to_native()[0], subj.affine, labels, header=subj.header,
                                          dtype=np.int32))
    if jacobian:
        writes.append(lambda: save_volume(reg.log_jacobian(), g.affine, jacobian, dtype=np.float32, xform_code=MNI_XFORM))
    return writes


# ----------------------------------------------------------------------------------------- segment
VOLUME_HEADER = ["subject", "total_brain", *[s.name for s in STRUCTURES], *CSV_COLUMNS]


def volume_cells(sums: np.ndarray, voxel_mm3: float, quality: Quality | None = None) -> list[str]:
    """A volumes-table row after the subject column: total, the 34 structures (mm3), the quality columns."""
    v = sums[1:] * voxel_mm3
    return [f"{v.sum():.1f}", *[f"{x:.1f}" for x in v], *(quality.csv_cells() if quality else [""] * len(CSV_COLUMNS))]


def write_volumes(path: Path, rows: list[tuple[str, np.ndarray]], voxel_mm3: list[float]) -> None:
    """Structure volumes (mm3) as CSV, one row per subject, in the 34-structure order, then the subject's
    quality (qc_score, qc_flagged 0/1, qc_reasons). A row given as a list of cells is written as it is."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(VOLUME_HEADER)
        for (sid, sums), vox in zip(rows, voxel_mm3):
            if isinstance(sums, list):  # cells made already, or a row of an earlier run's table (--skip-existing)
                w.writerow([sid, *sums, *[""] * (len(VOLUME_HEADER) - 1 - len(sums))])
                continue
            w.writerow([sid, *volume_cells(sums, vox)])


@outputs_not_inputs
def run_segment(image, attrs, mask, output, probs, vol, model_path, threads, warn: Warn,
                refine: int = REFINE_STEPS, *, skullstripped: bool = False, brain_mask_out: Path | None = None,
                brain_out: Path | None = None, quality_out: Path | None = None, strict: bool = False,
                qc_out: Path | None = None) -> None:
    _check_outputs([output, probs, vol, brain_mask_out, brain_out, quality_out, qc_out])
    subj, m = _load_inputs(image, mask)
    brain = resolve_brain(subj, m, skullstripped)
    warn(brain.warnings)
    _, model = load(model_path, threads)
    vec, warnings = encode_attributes(model, attrs)
    warn(warnings)
    if attrs is None:
        warn(["no attributes given: using the population-average template"])
    reg = register(model, subj, vec, brain.as_volume(subj), refine=refine)
    q = check_quality(reg, brain, Path(image).name, warn)
    seg, sums = reg.labels_to_native()
    writes = brain_writes(subj, brain, brain_mask_out, brain_out)
    if quality_out:
        writes.append(lambda: write_quality(quality_out, [q]))
    if qc_out:
        writes.append(qc_write(reg, brain, q, qc_out, attrs, seg))
    with all_or_nothing():
        save_volume(seg, subj.affine, output, header=subj.header, dtype=np.int32)
        for w in writes:
            w()
        if probs:  # frame by frame (stream.py): the 35 native frames are never held together
            save_native_probs(reg, probs)
        if vol:
            sid = Path(image).name
            write_volumes(vol, [(sid, volume_cells(sums, float(np.prod(subj.zooms)), q))], [1.0])
    strict_exit(strict, [q])

