"""Out-of-distribution segmentation benchmark (issue 16): IXI validation subjects under site and scanner changes.

The test set is made from what the project has. Every IXI validation subject (brain-extracted with its own
DLMUSE `seg > 0`, as segmentation_benchmark.py does) is written once per perturbation, deterministically
(the seed of each (subject, perturbation) is derived from --seed, the subject id and the perturbation):

  clean      the brain as is (2 mm, PSR, the IXI grid)
  bias40     times a smooth multiplicative bias field spanning [0.6, 1.4] inside the brain (low-order cosine
             series, at most 2 half-periods across the field of view per axis, random coefficients)
  gamma0.6   intensities x -> max * (x / max)^0.6 inside the brain (brighter grey matter, flatter contrast)
  gamma1.6   the same with exponent 1.6 (darker grey matter, stronger contrast)
  conform    FreeSurfer-style `mri_convert --conform` + T1 normalisation: 256^3, 1 mm, LIA, the input's centre
             kept at voxel (128, 128, 128) (trilinear), then scaled so that the median of cerebral white
             matter is 110, clipped to 0..255, uint8; mask and labels carried by nearest neighbour.
             Scored on the subject's original 2 mm grid: the 1 mm label map is carried back (nearest
             neighbour) and compared with the original labels, as for clean (scoring on 1 mm against labels
             upsampled by nearest neighbour costs every method ~0.04 Dice by itself; that figure is reported too)
  conform-float  (a control, not in the default set) the conformed grid with the clean float intensities:
             what the grid change alone costs, separate from the uint8 / white-matter scaling
  thick6     a 2 x 2 x 6 mm acquisition: 3 slices averaged along the voxel axis nearest to world S-I, then
             linearly interpolated back onto the 2 mm grid (labels unchanged)
  thick6grid the same acquisition stored on its own grid (2 x 2 x 6 mm: one voxel per block of 3 slices, the
             block's mean; mask: block mean > 0.5; labels on that grid: the block's middle slice), as a scanner
             writes it. Scored on the clean 2 mm grid like conform (the label map carried back by nearest
             neighbour, so its 6 mm slices cost Dice by themselves); the tool reads the slice thickness from
             the header and blurs the template to match in its refinement (inference.acquisition)
  mni152     one extra subject: FSL's MNI152 T1 inside its DLMUSE > 0 mask, with its DLMUSE labels, on the
             1 mm DLMUSE grid (182 x 218 x 182, LPS). The shared data hold the 2 mm T1 only; it is resampled
             (trilinear) onto that 1 mm grid. NB the ANTs methods use the same MNI152 brain as their atlas,
             so for them this is registration of an image to (an upsampled copy of) itself.

Ground truth: the subject's DLMUSE labels mapped to the 34 coarse structures (`atlasmorph_cli.labels`),
written with FreeSurfer ids. Files go to WORKDIR/subjects/<perturbation>/ (outside the repository).

Methods (each returns a label map on the perturbed image's own grid, scored with Dice over the 34 structures;
the AtlasMorph and ANTs code is segmentation_methods.py's, imported):

  atlasmorph          register_subject + labels_to_native with the subject's true age and sex and the default
                      test-time refinement (what `atlasmorph segment IMG --mask MASK --age A --sex S` does);
                      MNI152: the population-average template (no attributes)
  atlasmorph-refine0  the same with `--refine 0`
  atlasmorph-noblur   the default refinement against the sharp template even where the header gives thick voxels
                      (the tool's refinement before the acquisition blur; differs from atlasmorph only there)
  ants-affine         ants.registration(fixed=subject at 2 mm, moving=MNI152 2 mm brain, 'Affine'), labels pulled
                      from the MNI152 1 mm DLMUSE map ('genericLabel')
  ants-syn            the same with 'SyN' (antspyx default)

antspyx is optional (`pip install antspyx`, or the `bench` extra); without it the ANTs methods are skipped
and the report says so. (antspyx 0.6.3 pins numpy<2.4 and scipy<1.16; to keep a shared environment's versions,
`pip install --target DIR --no-deps antspyx==0.6.3 numpy==2.3.5 scipy==1.15.3` and run with PYTHONPATH=DIR.) Every (method, subject, perturbation) result is kept as JSON in --results, keyed by
content (model file, the perturbed image, mask and labels, the method and its settings) and stored in a
folder per model (segmentation_cache.py), so a stopped run continues, later runs add methods, subjects or
perturbations without redoing what is there, and another model's results never overwrite them.

    python benchmarks/ood_benchmark.py --subjects 3 --threads 1 --workdir runs/ood \\
        --results docs/benchmarks/ood-results [--methods ...] [--perturbations ...] [--model M]

writes WORKDIR/ood.json and WORKDIR/ood.md (or --out DIR).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see segmentation_benchmark.py

import numpy as np  # noqa: E402

import common  # noqa: E402
from atlasmorph_cli import labels  # noqa: E402
from atlasmorph_cli.inference.refine_defaults import REFINE_LOSS  # noqa: E402
from segmentation_cache import (  # noqa: E402
    content_sha256, refine_loss_entry, result_file, run_cached, save_result, task_key)
from segmentation_methods import prepare_mni  # noqa: E402

GENERATOR_VERSION = 2  # bump when a perturbation changes (the content keys change anyway)
DEFAULT_SPLIT = common.SHIPPED_SPLIT

PERTURBATIONS: dict[str, dict] = {
    "clean": {"kind": "clean"},
    "bias40": {"kind": "bias", "strength": 0.4, "n_freq": 2},
    "gamma0.6": {"kind": "gamma", "gamma": 0.6},
    "gamma1.6": {"kind": "gamma", "gamma": 1.6},
    "conform": {"kind": "conform", "size": 256, "voxel_mm": 1.0, "wm_value": 110.0},
    # control, not in the default set: the conformed grid with the clean float intensities (geometry only)
    "conform-float": {"kind": "conform", "size": 256, "voxel_mm": 1.0, "wm_value": None},
    "thick6": {"kind": "thick", "factor": 3},
    "thick6grid": {"kind": "thick_grid", "factor": 3},
    "mni152": {"kind": "mni152"},
}
DEFAULT_PERTURBATIONS = tuple(p for p in PERTURBATIONS if p != "conform-float")
PERTURBATION_LABEL = {
    "clean": "clean (2 mm, IXI)",
    "bias40": "bias field ±40 %",
    "gamma0.6": "gamma 0.6",
    "gamma1.6": "gamma 1.6",
    "conform": "FreeSurfer-conformed (1 mm, 256³, LIA, uint8, WM = 110)",
    "conform-float": "conformed grid only (1 mm, 256³, LIA; float, intensities as clean)",
    "thick6": "thick slices (2 × 2 × 6 mm, axial)",
    "thick6grid": "thick slices on their own 2 × 2 × 6 mm grid",
    "mni152": "MNI152 T1 as a subject (1 mm grid)",
}
METHODS = ("atlasmorph", "atlasmorph-refine0", "atlasmorph-noblur", "ants-affine", "ants-syn")
DEFAULT_METHODS = tuple(m for m in METHODS if m != "atlasmorph-noblur")
OURS = ("atlasmorph", "atlasmorph-refine0", "atlasmorph-noblur")
REGRIDDED = ("conform", "thick_grid")  # kinds whose results are also scored on the clean 2 mm grid
ANTS_TRANSFORMS = {"ants-affine": "Affine", "ants-syn": "SyN"}
METHOD_LABEL = {
    "atlasmorph": "AtlasMorph (default refinement)",
    "atlasmorph-refine0": "AtlasMorph `--refine 0`",
    "atlasmorph-noblur": "AtlasMorph, refinement without the acquisition blur",
    "ants-affine": "ANTs affine",
    "ants-syn": "ANTs SyN",
}
WITHIN = 0.01  # issue 16: Dice within 0.01 of clean on every perturbation


# ------------------------------------------------------------------------------------ perturbations
def seed_for(base: int, subject: str, perturbation: str) -> int:
    """A seed that depends only on (base seed, subject id, perturbation name), stable across Pythons."""
    h = hashlib.sha256(f"{base}:{subject}:{perturbation}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def smooth_bias_field(shape, strength: float = 0.4, seed: int = 0, n_freq: int = 2, mask=None) -> np.ndarray:
    """A smooth multiplicative field over `shape` with values in [1 - strength, 1 + strength], both reached
    inside `mask` (default: the whole volume; outside the mask the field is clipped to the same bounds).

    Sum of separable cosines cos(pi k x) (x in [0, 1] along each axis, k = 0..n_freq, not all 0) with
    normal coefficients that shrink with frequency, rescaled so that its range inside the mask is [-1, 1]."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(0.0, 1.0, int(n)) for n in shape]
    basis = [[np.cos(np.pi * k * a) for k in range(n_freq + 1)] for a in axes]
    f = np.zeros(tuple(int(n) for n in shape), dtype=np.float64)
    for kx in range(n_freq + 1):
        for ky in range(n_freq + 1):
            for kz in range(n_freq + 1):
                if kx == ky == kz == 0:
                    continue
                c = rng.normal() / (1.0 + kx * kx + ky * ky + kz * kz)
                f += c * basis[0][kx][:, None, None] * basis[1][ky][None, :, None] * basis[2][kz][None, None, :]
    inside = f if mask is None or not np.any(mask) else f[np.asarray(mask, dtype=bool)]
    lo, hi = inside.min(), inside.max()
    f = np.clip(2.0 * (f - lo) / (hi - lo) - 1.0, -1.0, 1.0) if hi > lo else np.zeros_like(f)
    return (1.0 + strength * f).astype(np.float32)


def gamma_change(data: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """x -> top * (x / top)^gamma inside the mask (top: the brain's maximum, negatives clipped to 0); 0 outside.
    Monotone non-decreasing in x; 0 and the maximum stay where they are."""
    d = np.asarray(data, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    top = float(d[m].max()) if m.any() else 0.0
    out = np.zeros_like(d)
    if top > 0:
        out[m] = top * np.clip(d[m] / top, 0.0, 1.0) ** gamma
    return out


LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # i -> Left, j -> Inferior, k -> Anterior


def conform_affine(affine: np.ndarray, shape, size: int = 256, voxel_mm: float = 1.0) -> np.ndarray:
    """FreeSurfer's conformed voxel-to-world affine: size^3 voxels of voxel_mm, LIA, with the world centre of
    the input (its voxel shape/2, FreeSurfer's c_ras) at voxel size/2."""
    c_ras = (np.asarray(affine, dtype=np.float64) @ np.r_[np.asarray(shape, dtype=np.float64) / 2.0, 1.0])[:3]
    out = np.eye(4)
    out[:3, :3] = LIA * voxel_mm
    out[:3, 3] = c_ras - out[:3, :3] @ np.full(3, size / 2.0)
    return out


WM_INDICES = tuple(i + 1 for i, s in enumerate(labels.STRUCTURES) if s.name.endswith("Cerebral-White-Matter"))


def conform(brain: np.ndarray, mask: np.ndarray, index: np.ndarray, affine: np.ndarray,
            size: int = 256, voxel_mm: float = 1.0, wm_value: float = 110.0):
    """(uint8 image, mask, index labels, affine) as `mri_convert --conform` + T1 normalisation would give:
    trilinear onto the conformed grid, nearest neighbour for mask and labels, then intensities scaled so
    that the median of the cerebral white matter (from the labels) is wm_value, clipped to 0..255, rounded."""
    from atlasmorph_cli.geometry.space import Grid, resample

    dst = conform_affine(affine, np.shape(brain), size, voxel_mm)
    grid = Grid((size, size, size), dst)
    img = resample(np.ascontiguousarray(brain, dtype=np.float32), affine, grid, order=1)
    m = resample(np.ascontiguousarray(mask, dtype=np.float32), affine, grid, order=0) > 0.5
    idx = np.rint(resample(np.ascontiguousarray(index, dtype=np.float32), affine, grid, order=0)).astype(np.uint8)
    if wm_value is None:  # the grid change alone (a control): float intensities as they were
        img[~m] = 0
        return img.astype(np.float32), m, idx, dst
    wm = np.isin(idx, WM_INDICES) & m
    ref = float(np.median(img[wm])) if wm.any() else float(np.percentile(img[m], 90)) if m.any() else 1.0
    img = np.clip(np.rint(img * (wm_value / max(ref, 1e-6))), 0, 255).astype(np.uint8)
    img[~m] = 0
    return img, m, idx, dst


def slice_axis(affine: np.ndarray) -> int:
    """The voxel axis whose direction is nearest to world S-I (axial slices are stacked along it)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(a[2]) / np.linalg.norm(a, axis=0)))


def block_means(data: np.ndarray, axis: int, starts, factor: int) -> np.ndarray:
    """The means of the blocks of `factor` slices along `axis` that begin at `starts` (a block running past the
    end is shorter), stacked along `axis`: what a thick-slice acquisition records."""
    n = data.shape[axis]
    return np.stack([data.take(np.arange(s, min(s + factor, n)), axis=axis).mean(axis=axis) for s in starts], axis=axis)


def thick_slices(data: np.ndarray, axis: int, factor: int = 3) -> np.ndarray:
    """A thick-slice acquisition on the same grid: blocks of `factor` slices along `axis` averaged (the last
    block may be shorter), then linearly interpolated back between the block centres (constant beyond)."""
    d = np.asarray(data, dtype=np.float32)
    n = d.shape[axis]
    starts = np.arange(0, n, factor)
    means = block_means(d, axis, starts, factor)
    centres = np.array([(s + min(s + factor, n) - 1) / 2.0 for s in starts])
    if len(starts) == 1:
        return np.repeat(means, n, axis=axis).astype(np.float32)
    pos = np.arange(n, dtype=np.float64)
    lo = np.clip(np.searchsorted(centres, pos, side="right") - 1, 0, len(centres) - 2)
    w = np.clip((pos - centres[lo]) / (centres[lo + 1] - centres[lo]), 0.0, 1.0)
    shape = [1] * d.ndim
    shape[axis] = n
    w = w.reshape(shape).astype(np.float32)
    return ((1.0 - w) * means.take(lo, axis=axis) + w * means.take(lo + 1, axis=axis)).astype(np.float32)


def thick_grid(brain: np.ndarray, mask: np.ndarray, index: np.ndarray, affine: np.ndarray, factor: int = 3):
    """(image, mask, index, affine) of a thick-slice acquisition on its own grid: along the axis nearest S-I,
    one voxel per block of `factor` slices (a trailing partial block is dropped) holding the block's mean,
    the mask where the block is mostly brain, the labels of the block's middle slice, and the affine of the
    block centres (voxel size x factor)."""
    axis = slice_axis(affine)
    n = np.shape(brain)[axis] // factor
    starts = np.arange(n) * factor
    m = block_means(np.asarray(mask, dtype=np.float32), axis, starts, factor) > 0.5
    image = block_means(np.asarray(brain, dtype=np.float32), axis, starts, factor) * m
    idx = np.take(np.asarray(index), starts + (factor - 1) // 2, axis=axis)
    step = np.eye(4)
    step[axis, axis] = factor
    step[axis, 3] = (factor - 1) / 2.0
    return image.astype(np.float32), m, idx, np.asarray(affine, dtype=np.float64) @ step


def perturb(brain, mask, index, affine, params: dict, seed: int):
    """(image, mask, index, affine) of one perturbation of a brain-extracted subject (not mni152)."""
    kind = params["kind"]
    mask = np.asarray(mask, dtype=bool)
    if kind == "clean":
        return np.asarray(brain, dtype=np.float32), mask, index, affine
    if kind == "bias":
        field = smooth_bias_field(np.shape(brain), params["strength"], seed, params.get("n_freq", 2), mask)
        return (np.asarray(brain, dtype=np.float32) * field) * mask, mask, index, affine
    if kind == "gamma":
        return gamma_change(brain, mask, params["gamma"]), mask, index, affine
    if kind == "conform":
        return conform(brain, mask, index, affine, params["size"], params["voxel_mm"], params["wm_value"])
    if kind == "thick":
        return thick_slices(brain, slice_axis(affine), params["factor"]) * mask, mask, index, affine
    if kind == "thick_grid":
        return thick_grid(brain, mask, index, affine, params["factor"])
    raise ValueError(f"unknown perturbation kind {kind!r}")


def dice_on_grid(pred_index, pred_affine, truth_index, truth_affine) -> float:
    """Mean Dice over the 34 structures of a class-index map carried (nearest neighbour, by world coordinates)
    onto the truth's grid: a conformed 1 mm result scored on the subject's original 2 mm grid, against the
    original truth instead of its nearest-neighbour upsampled copy."""
    from atlasmorph_cli.training import metrics
    from atlasmorph_cli.geometry.space import Grid, resample

    truth_index = np.asarray(truth_index)
    back = resample(np.ascontiguousarray(pred_index, dtype=np.float32), pred_affine,
                    Grid(tuple(truth_index.shape), np.asarray(truth_affine, dtype=np.float64)), order=0)
    return float(np.nanmean(metrics.dice_per_structure(np.rint(back).astype(np.int64), truth_index)))


# ------------------------------------------------------------------------------------ test-set files
def _save(path: Path, data, affine, dtype) -> None:
    from atlasmorph_cli.io.volumes import save_volume

    save_volume(np.asarray(data), affine, path, dtype=dtype)


def _files(folder: Path, subject: str) -> dict:
    return {"t1": folder / f"{subject}_T1.nii.gz", "mask": folder / f"{subject}_mask.nii.gz",
            "seg": folder / f"{subject}_labels34.nii.gz", "manifest": folder / f"{subject}.json"}


def write_case(folder: Path, subject: str, image, mask, index, affine, manifest: dict) -> dict:
    """Write image (uint8 if it is uint8, else float32), mask (uint8) and truth (FreeSurfer ids, int16)."""
    folder.mkdir(parents=True, exist_ok=True)
    f = _files(folder, subject)
    _save(f["t1"], image, affine, np.uint8 if np.asarray(image).dtype == np.uint8 else np.float32)
    _save(f["mask"], np.asarray(mask, dtype=np.uint8), affine, np.uint8)
    _save(f["seg"], labels.to_freesurfer(index), affine, np.int16)
    f["manifest"].write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return f


def make_case(subject: dict, name: str, workdir: Path, data_dir: Path, base_seed: int) -> dict:
    """The files of (subject, perturbation), generated unless already there with the same manifest."""
    params = PERTURBATIONS[name]
    folder = workdir / "subjects" / name
    sid = subject["subject"]
    seed = seed_for(base_seed, sid, name)
    manifest = {"generator_version": GENERATOR_VERSION, "perturbation": name, "params": params,
                "subject": sid, "seed": seed if params["kind"] == "bias" else None}
    f = _files(folder, sid)
    if all(p.is_file() for p in f.values()) and json.loads(f["manifest"].read_text()) == manifest:
        return f
    from atlasmorph_cli.io.volumes import load_volume

    if params["kind"] == "mni152":
        from atlasmorph_cli.training.reference import MNI_LABELS, MNI_T1
        from atlasmorph_cli.geometry.space import Grid, resample

        lab = load_volume(data_dir / MNI_LABELS)
        t1 = load_volume(data_dir / MNI_T1)
        grid = Grid(tuple(lab.shape), lab.affine)
        mask = lab.data > 0
        image = resample(t1.data, t1.affine, grid, order=1) * mask
        return write_case(folder, sid, image.astype(np.float32), mask, labels.to_index(lab.data, "muse"),
                          lab.affine, manifest)
    t1 = load_volume(subject["t1"])
    seg = load_volume(subject["seg"])
    mask = seg.data > 0
    index = labels.to_index(seg.data, "muse")
    image, m, idx, aff = perturb(t1.data * mask, mask, index, t1.affine, params, seed)
    return write_case(folder, sid, image, m, idx, aff, manifest)


MNI_SUBJECT = {"subject": "MNI152", "age": None, "sex": None}


# ------------------------------------------------------------------------------------ summary
def _mean(values) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def score(rec: dict) -> float | None:
    """The Dice a record counts with: on the subject's original grid when it was carried back there
    (conformed inputs, "dice_clean_grid"), else on the input's own grid ("dice")."""
    v = rec.get("dice_clean_grid")
    return v if v is not None else rec.get("dice")


def summarise(results: dict, methods: list[str], perturbations: list[str]) -> dict:
    """results[perturbation][subject][method] = record. Per perturbation and method: n, mean Dice (see
    score()), the drop from clean on the same subjects (mni152: against the mean clean Dice of all IXI
    subjects), and the checks of issue 16 for the AtlasMorph methods."""
    out: dict = {}
    clean = results.get("clean", {})
    for p in perturbations:
        rows = results.get(p, {})
        entry: dict = {}
        for m in methods:
            got = {s: score(r[m]) for s, r in rows.items() if score(r.get(m, {})) is not None}
            on_input = _mean(r[m]["dice"] for r in rows.values() if r.get(m, {}).get("dice") is not None)
            regridded = any(r.get(m, {}).get("dice_clean_grid") is not None for r in rows.values())
            mean = _mean(got.values())
            if p == "mni152" or p == "clean":
                ref = _mean(score(r[m]) for r in clean.values() if score(r.get(m, {})) is not None)
                drop = None if mean is None or ref is None else mean - ref
                paired = None
            else:
                both = [s for s in got if score(clean.get(s, {}).get(m, {})) is not None]
                drop = _mean(got[s] - score(clean[s][m]) for s in both) if both else None
                paired = len(both)
            per_structure = None  # mean change from clean per structure, on the input's grid, same subjects
            if p not in ("clean", "mni152"):
                pairs = [(r[m].get("dice_per_structure"), clean.get(x, {}).get(m, {}).get("dice_per_structure"))
                         for x, r in rows.items() if m in r]
                pairs = [(a, b) for a, b in pairs if a and b]
                if pairs:
                    per_structure = {n: _mean(a[n] - b[n] for a, b in pairs if a.get(n) is not None
                                              and b.get(n) is not None) for n in pairs[0][0]}
            failed = sorted(x for x, r in rows.items() if "error" in r.get(m, {}))
            entry[m] = {"n": len(got), "failed": failed, "dice": mean, "drop_from_clean": drop, "n_paired_with_clean": paired,
                        "structure_change_from_clean": per_structure,
                        "per_subject": got, "dice_on_input_grid": on_input,
                        "scored_on": "clean 2 mm grid" if regridded else "input grid"}
        for m in (x for x in methods if x in OURS):
            e = entry[m]
            if e["dice"] is None:
                continue
            checks = {"within_0.01_of_clean": None if e["drop_from_clean"] is None else e["drop_from_clean"] >= -WITHIN}
            for a in (x for x in methods if x in ANTS_TRANSFORMS):
                both = [s for s in e["per_subject"] if s in entry[a]["per_subject"]]
                if both:
                    ours = float(np.mean([e["per_subject"][s] for s in both]))
                    theirs = float(np.mean([entry[a]["per_subject"][s] for s in both]))
                    checks[f"ahead_of_{a}"] = ours > theirs
                    checks[f"margin_over_{a}"] = ours - theirs
            e["checks"] = checks
        if "atlasmorph" in entry and "atlasmorph-refine0" in entry:
            a, b = entry["atlasmorph"]["per_subject"], entry["atlasmorph-refine0"]["per_subject"]
            both = [s for s in a if s in b]
            if both:
                gain = float(np.mean([a[s] - b[s] for s in both]))
                entry["refinement"] = {"gain": gain, "lowers_mean_dice": gain < 0, "n": len(both),
                                       "lower_on": sum(a[s] < b[s] for s in both)}
        out[p] = entry
    return out


def _f(x, fmt=".3f", signed=False) -> str:
    if x is None:
        return "–"
    return f"{x:+{fmt}}" if signed else f"{x:{fmt}}"


def _yn(x) -> str:
    return "–" if x is None else ("yes" if x else "**no**")


def markdown(res: dict) -> str:
    methods, perts, s = res["methods"], res["perturbations"], res["summary"]
    lines = [
        "# Out-of-distribution segmentation (issue 16)",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Model: `{res['model']}` (sha256 {res['model_sha256'][:12]}…); subjects: {', '.join(res['subjects'])} "
        f"(first {len(res['subjects'])} IXI validation subjects by id, split `{res['split']}`); seed {res['seed']}; "
        f"threads {res['threads']}; machine: {res['machine']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) + ".",
        "",
        f"Refinement of the AtlasMorph (refined) method: {res.get('refine')} steps at lr {res.get('refine_lr')}, "
        f"image term `{res.get('refine_loss', 'model')}` (`--refine-loss`).",
        "",
        "## Mean Dice over the 34 structures (change from clean on the same subjects)",
        "",
        "| perturbation | n | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for p in perts:
        n = max((s[p][m]["n"] for m in methods), default=0)
        cells = [f"{_f(s[p][m]['dice'])} ({_f(s[p][m]['drop_from_clean'], signed=True)})"
                 if p != "clean" and s[p][m]["dice"] is not None else _f(s[p][m]["dice"]) for m in methods]
        cells = [c + (f" (n = {s[p][m]['n']})" if s[p][m]["n"] < n else "") for c, m in zip(cells, methods)]
        lines.append(f"| {PERTURBATION_LABEL[p]} | {n} | " + " | ".join(cells) + " |")
    failed = [f"{METHOD_LABEL[m]} on {p}: {', '.join(s[p][m]['failed'])}" for p in perts for m in methods
              if s[p][m].get("failed")]
    if failed:  # a mean over fewer subjects must not pass for the full one
        lines += ["", "**Failed runs, left out of the means above** (their errors are in the results folder): "
                  + "; ".join(failed) + "."]
    regrid = [p for p in perts if any(s[p][m].get("scored_on") == "clean 2 mm grid" for m in methods)]
    lines += ["", "MNI152: one image; its change is against the mean clean Dice of the IXI subjects."]
    if regrid:
        lines += ["", f"{', '.join(regrid)}: the label maps on the input's grid (1 mm conformed; 6 mm thick slices) are "
                  "carried back (nearest neighbour, world coordinates) onto the subject's original 2 mm grid and scored "
                  "against its original labels, like clean. On the input's grid itself, against the labels carried "
                  "there by nearest neighbour, they score:", "",
                  "| perturbation | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
        for p in regrid:
            lines.append(f"| {PERTURBATION_LABEL[p]} (Dice on its grid) | " + " | ".join(_f(s[p][m].get("dice_on_input_grid"))
                                                                          for m in methods) + " |")
    lines.append("")
    ours = [m for m in methods if m in OURS]
    ants = [m for m in methods if m in ANTS_TRANSFORMS]
    if ours:
        head = ["perturbation", "method", "within 0.01 of clean"] + [f"ahead of {METHOD_LABEL[a]} (margin)" for a in ants]
        lines += ["## Checks of issue 16", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in perts:
            for m in ours:
                c = s[p][m].get("checks")
                if not c:
                    continue
                cells = [f"{_yn(c.get(f'ahead_of_{a}'))} ({_f(c.get(f'margin_over_{a}'), signed=True)})" for a in ants]
                lines.append("| " + " | ".join([PERTURBATION_LABEL[p], METHOD_LABEL[m], _yn(c["within_0.01_of_clean"])] + cells)
                             + " |")
        if "atlasmorph" in ours and "atlasmorph-refine0" in ours:
            lines += ["", "## Does the test-time refinement lower mean Dice?", "",
                      "| perturbation | refined − `--refine 0` | lowers mean Dice | subjects where it lowers Dice |",
                      "|---|---|---|---|"]
            for p in perts:
                r = s[p].get("refinement")
                if r:
                    lines.append(f"| {PERTURBATION_LABEL[p]} | {r['gain']:+.4f} | {'**yes**' if r['lowers_mean_dice'] else 'no'} | "
                                 f"{r['lower_on']} of {r['n']} |")
    if ours:
        m0 = ours[0]
        rows_ = [(p, s[p][m0].get("structure_change_from_clean")) for p in perts]
        # conformed inputs are left out: on their 1 mm grid the per-structure figures hold the scoring artefact
        rows_ = [(p, d) for p, d in rows_ if d and s[p][m0].get("scored_on") != "clean 2 mm grid"]
        if rows_:
            lines += ["", f"## Largest per-structure changes from clean ({METHOD_LABEL[m0]})", "",
                      "| perturbation | the 5 structures that lose most (mean Dice change) |", "|---|---|"]
            for p, d in rows_:
                worst = sorted((v, n) for n, v in d.items() if v is not None)[:5]
                lines.append(f"| {PERTURBATION_LABEL[p]} | " + ", ".join(f"{n} {v:+.3f}" for v, n in worst) + " |")
    lines += ["", "## Per subject (Dice)", "", "| perturbation | subject | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for p in perts:
        subs = sorted({x for m in methods for x in s[p][m]["per_subject"]})
        for x in subs:
            lines.append(f"| {p} | {x} | " + " | ".join(_f(s[p][m]["per_subject"].get(x), ".4f") for m in methods) + " |")
    for n in res.get("notes") or []:
        lines += ["", n]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main
def _csv_list(text: str | None, allowed, default) -> list[str]:
    if not text:
        return list(default)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    ap.add_argument("--split", type=Path, default=DEFAULT_SPLIT, help=f"split.json (default {DEFAULT_SPLIT.name})")
    common.add_data_option(ap)
    ap.add_argument("--subjects", type=int, default=3, help="first N validation subjects by id (default 3; 0: all)")
    ap.add_argument("--methods", default=None, help=f"comma list from {','.join(METHODS)} (default: all but atlasmorph-noblur)")
    ap.add_argument("--perturbations", default=None,
                    help=f"comma list from {','.join(PERTURBATIONS)} (default: all but conform-float; clean is always added)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/ood"),
                    help="where the perturbed subjects go, outside the repository (default runs/ood)")
    ap.add_argument("--results", type=Path, default=None,
                    help="per-(method, perturbation, subject) result JSON, reused when the inputs match (default WORKDIR/results)")
    ap.add_argument("--out", type=Path, default=None, help="folder for ood.json and ood.md (default WORKDIR)")
    ap.add_argument("--seed", type=int, default=0, help="base seed of the random perturbations (default 0)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and ITK (default 2)")
    ap.add_argument("--refine", type=int, default=None, help="steps of the 'atlasmorph' method (default: the CLI's)")
    ap.add_argument("--refine-loss", default=REFINE_LOSS,
                    help=f"image term of that refinement: 'ncc' or 'model' (default: the CLI's, {REFINE_LOSS})")
    ap.add_argument("--cached-only", action="store_true", help="run nothing new: report what --results holds")
    args = ap.parse_args(argv)

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # inherited by the workers
    import torch

    from atlasmorph_cli.inference.refine_defaults import REFINE_LR, REFINE_STEPS

    torch.set_num_threads(args.threads)
    refine = REFINE_STEPS if args.refine is None else args.refine
    methods = _csv_list(args.methods, METHODS, DEFAULT_METHODS)
    perts = _csv_list(args.perturbations, tuple(PERTURBATIONS), DEFAULT_PERTURBATIONS)
    if "clean" not in perts:
        perts.insert(0, "clean")
    data_dir = common.data_folder(args.data)
    model_path = common.model_file(args.model)
    notes: list[str] = []
    if any(m in ANTS_TRANSFORMS for m in methods) and not args.cached_only:
        try:
            import ants  # noqa: F401  (optional; the workers import it themselves)
        except ImportError as exc:
            skipped = [m for m in methods if m in ANTS_TRANSFORMS]
            notes.append(f"**antspyx is not installed** ({exc}): {', '.join(skipped)} not run. "
                         "Install it with `pip install antspyx` (or `pip install '.[bench]'`).")
            print("ANTs methods skipped: antspyx is not installed (pip install antspyx, or pip install '.[bench]')",
                  file=sys.stderr)
            methods = [m for m in methods if m not in ANTS_TRANSFORMS]

    split, split_source = common.split_ids(args.split, model_path)
    val = common.pick_subjects(common.ixi_rows(data_dir), split.get("validation", []), args.subjects or None)
    workdir = args.workdir
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    results_dir = args.results or workdir / "results"
    mni_t1 = mni_labels = None
    if any(m in ANTS_TRANSFORMS for m in methods):
        mni_t1, mni_labels = prepare_mni(data_dir, workdir)

    cases = [(p, r) for p in perts for r in ([MNI_SUBJECT] if p == "mni152" else val)]
    print(f"{len(val)} validation subjects ({split_source}); perturbations {', '.join(perts)}; methods "
          f"{', '.join(methods)}", flush=True)
    files = {}
    for p, r in cases:
        t0 = time.perf_counter()
        files[(p, r["subject"])] = make_case(r, p, workdir, data_dir, args.seed)
        print(f"  test set {p:<9} {r['subject']:<16} ready ({time.perf_counter() - t0:.1f} s)", flush=True)

    def make_task(m: str, p: str, r: dict) -> dict:
        f = files[(p, r["subject"])]
        base = {"threads": args.threads, "scratch": str(scratch), "subject": r["subject"], "perturbation": p,
                "t1": str(f["t1"]), "seg": str(f["seg"]), "mask": str(f["mask"]), "seg_scheme": "freesurfer",
                "input_sha256": [content_sha256(f[k]) for k in ("t1", "mask", "seg")]}
        if m in OURS:
            conditional = r.get("age") is not None and r.get("sex") is not None
            steps = 0 if m == "atlasmorph-refine0" else refine
            return {**base, "kind": "ours", "method": m, "model": str(Path(model_path).resolve()),
                    "refine": steps, "refine_lr": REFINE_LR, "conditional": conditional,
                    "attrs": {"age": float(r["age"]), "sex": r["sex"]} if conditional else None,
                    **refine_loss_entry(args.refine_loss, steps),
                    **({"acquisition_blur": False} if m == "atlasmorph-noblur" else {})}
        return {**base, "kind": "ants", "method": m, "transform": ANTS_TRANSFORMS[m],
                "template": str(mni_t1), "template_labels": str(mni_labels)}

    def regridded(m: str, p: str, r: dict, task: dict, rec: dict, cache: Path, cached: bool) -> dict:
        """For an input on another grid (conformed, thick slices on their own grid): the result carried back to the
        clean 2 mm grid ("dice_clean_grid"),
        from the prediction the worker wrote (a cached result without it is run again)."""
        if PERTURBATIONS[p]["kind"] not in REGRIDDED or "error" in rec or rec.get("dice_clean_grid") is not None:
            return rec
        if args.cached_only:
            return rec
        pred = Path(task["pred_out"])
        if cached or not pred.is_file():
            rec, _ = run_cached(task, None)
            if "error" in rec:
                return rec
        from atlasmorph_cli.io.volumes import load_volume

        pv = load_volume(pred)
        cf = files[("clean", r["subject"])]
        truth = load_volume(cf["seg"])
        rec["dice_clean_grid"] = dice_on_grid(pv.data, pv.affine, labels.to_index(truth.data, "freesurfer"), truth.affine)
        rec.setdefault("key", task_key(task))
        save_result(cache, rec)
        return rec

    results: dict = {p: {} for p in perts}

    def report() -> dict:
        res = {
            "command": common.command_line("ood_benchmark.py", argv),
            "machine": common.describe_machine(), "versions": common.versions("torch", "numpy", "nibabel", "antspyx"),
            "threads": args.threads,
            "load_average_at_end": list(os.getloadavg()), "model": str(model_path),
            "model_sha256": common.file_sha256(model_path), "split": split_source, "seed": args.seed,
            "subjects": [r["subject"] for r in val], "methods": methods, "perturbations": perts,
            "perturbation_params": {p: PERTURBATIONS[p] for p in perts}, "refine": refine, "refine_lr": REFINE_LR,
            "refine_loss": args.refine_loss,
            "summary": summarise(results, methods, perts), "notes": notes,
            "results": results,
        }
        res = common.clean(res)
        out = args.out or workdir
        common.write_json(out / "ood.json", res)
        (out / "ood.md").write_text(markdown(res))
        return res

    for m in methods:  # one method over every case, then the next (the fast ones first)
        for p, r in cases:
            task = make_task(m, p, r)
            cache = result_file(results_dir, task, p)
            if PERTURBATIONS[p]["kind"] in REGRIDDED:
                task["pred_out"] = str(workdir / "predictions" / m / p / f"{r['subject']}.nii.gz")
            rec, cached = run_cached(task, cache, run=not args.cached_only)
            if rec is None:
                continue
            before = rec
            rec = regridded(m, p, r, task, rec, cache, cached)
            cached = cached and rec is before  # run again for the carried-back Dice: not cached
            rec.pop("key", None)
            results[p].setdefault(r["subject"], {})[m] = rec
            head = f"{m:<19} {p:<9} {r['subject']:<16}"
            if "error" in rec:
                print(f"{head} FAILED: {rec['error']}", file=sys.stderr, flush=True)
            else:
                print(f"{head} Dice {rec['dice']:.4f}  {rec['seconds']:6.1f} s  {rec['peak_mb']:5.0f} MB"
                      + (f"  (on the clean 2 mm grid {rec['dice_clean_grid']:.4f})" if rec.get("dice_clean_grid") else "")
                      + ("  (cached)" if cached else ""), flush=True)
        report()
    res = report()
    print()
    print(markdown(res).split("## Per subject")[0])
    print(f"wrote {(args.out or workdir) / 'ood.json'} and {(args.out or workdir) / 'ood.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
