"""Atlas-based segmentation of held-out IXI subjects: AtlasMorph's templates against ANTs SyNCC.

For the validation subjects of a trained model (the split.json `atlasmorph train` writes), every method
gets the same input, the subject's T1 skull-stripped with its own DLMUSE mask (seg > 0) in its native
grid, and returns a 34-structure label map on that grid, scored (Dice) against the subject's own
DLMUSE labels mapped to the 34 structures:

  atlasmorph           the conditional template for the subject's true age and sex
                       (pipeline.register + labels_to_native, what `atlasmorph segment` runs)
  atlasmorph-average   the same model, no attributes (population-average template)
  atlasmorph-baseline  an unconditional model (`atlasmorph train --attributes none`), --baseline
  ants-syncc-mni       ants.registration(fixed=subject brain at 2 mm, moving=MNI152 brain, 'SyNCC'),
                       then the MNI152 DLMUSE labels (1 mm) pulled into the native grid ('genericLabel')
  ants-syncc-built     as ants-syncc-mni, against a template built by ants.build_template from
                       --template-subjects training subjects (labels: majority vote), off by default

Also reported: folding (% of brain voxels with a non-positive Jacobian determinant of the deformable
part), wall seconds and peak memory (VmHWM) per subject with every (method, subject) run in a fresh
worker process, the mean displacement (mm) of the deformable part (centrality) and Dice by age group.

    python benchmarks/segmentation_benchmark.py --model runs/v1/model.safetensors --split runs/v1/split.json \\
        [--baseline runs/uncond/model.safetensors] [--methods ...,ants-syncc-built] --out docs/benchmarks

writes <out>/segmentation.json, <out>/segmentation.md and <out>/dice_boxplot.png. ANTs (antspyx, the
`bench` extra) is optional: without it only the AtlasMorph methods are reported. The AtlasMorph methods
run first on every subject, then the ANTs ones, one method at a time over the subjects (on the first
--ants-n subjects only, if given: SyNCC takes 10-20 min per subject on 2 cores). `--results DIR` (default WORK/results) keeps every finished
(method, subject) result and the built ANTs template; a result is reused whenever its inputs match (the
content of the model and template files, the subject, the method), so a run that was stopped, or one on
another machine with the same folder, continues where the last one stopped; `--cached-only` runs
nothing new and reports what the folder holds. Every ANTs method is compared with ours on the subjects
that method ran on (a side-by-side section each).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

# OpenMP worker threads that spin while idle make torch 10-20x slower whenever another process keeps a
# core busy (shared 2-core machine); must be set before torch is imported, here and in the workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasmorph_cli import labels, metrics  # noqa: E402  (numpy-only modules: workers stay torch-free)
from benchmarks.machine_info import describe  # noqa: E402

OURS = ("atlasmorph", "atlasmorph-average", "atlasmorph-baseline")
ANTS = ("ants-syncc-mni", "ants-syncc-built")
ALL_METHODS = OURS + ANTS
DEFAULT_METHODS = ("atlasmorph", "atlasmorph-average", "ants-syncc-mni")
AGE_GROUPS = (("<40", 0.0, 40.0), ("40-60", 40.0, 60.0), (">=60", 60.0, math.inf))
NAMES = [s.name for s in labels.STRUCTURES]
ANTS_TRANSFORM = "SyNCC"
ANTS_WORKING_MM = 2.0  # the model grid's voxel size: ANTs registers at the same resolution as ours
LABEL = {
    "atlasmorph": "AtlasMorph (age, sex)",
    "atlasmorph-average": "AtlasMorph, average template",
    "atlasmorph-baseline": "AtlasMorph, unconditional model",
    "ants-syncc-mni": "ANTs SyNCC to MNI152",
    "ants-syncc-built": "ANTs SyNCC to built template",
}
TICK = {"atlasmorph": "AtlasMorph (age, sex)", "atlasmorph-average": "AtlasMorph average",
        "atlasmorph-baseline": "AtlasMorph unconditional", "ants-syncc-mni": "ANTs SyNCC MNI152",
        "ants-syncc-built": "ANTs SyNCC built template"}


# ------------------------------------------------------------------------------------ pure helpers
def folding_percent(det: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Percentage of (masked) voxels whose Jacobian determinant is not positive."""
    d = np.asarray(det, dtype=np.float64)
    if mask is not None:
        d = d[np.asarray(mask, dtype=bool)]
    return float(100.0 * np.mean(d <= 0)) if d.size else float("nan")


def mean_magnitude(disp: np.ndarray, mask: np.ndarray | None = None, spacing=(1.0, 1.0, 1.0), axis: int = 0) -> float:
    """Mean Euclidean length of a displacement field (components along `axis`), scaled per component."""
    d = np.moveaxis(np.asarray(disp, dtype=np.float64), axis, 0)
    scale = np.asarray(spacing, dtype=np.float64).reshape((3,) + (1,) * (d.ndim - 1))
    mag = np.sqrt(((d * scale) ** 2).sum(0))
    if mask is not None:
        mag = mag[np.asarray(mask, dtype=bool)]
    return float(mag.mean()) if mag.size else float("nan")


def age_group(age: float) -> str:
    for name, lo, hi in AGE_GROUPS:
        if lo <= age < hi:
            return name
    return AGE_GROUPS[0][0] if age < AGE_GROUPS[0][1] else AGE_GROUPS[-1][0]


def stats(values) -> dict:
    """mean, std, min, max and n of the finite values (None entries and NaN ignored)."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    if not a.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}


def majority_vote(maps, n_classes: int = labels.N_CLASSES) -> np.ndarray:
    """Voxel-wise most frequent class of several index maps of one shape (ties: the lower index)."""
    maps = list(maps)
    votes = np.zeros((n_classes, *np.shape(maps[0])), dtype=np.uint16)
    for m in maps:
        m = np.asarray(m, dtype=np.int64)
        for c in np.unique(m):
            votes[c] += m == c
    return votes.argmax(0).astype(np.uint8)


def clean(obj):
    """JSON-safe copy: NaN/Inf -> None, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def vmhwm_mb() -> float:
    """Peak resident memory of this process (VmHWM), MB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def split_ids(split_path: Path | None, model_path: Path) -> tuple[dict, str]:
    """The train/validation subject lists: --split, else the model's configuration, else split.json beside it."""
    if split_path is not None:
        return json.loads(Path(split_path).read_text()), str(split_path)
    from atlasmorph_cli.model import read_config

    training = read_config(model_path).training or {}
    for key in ("split", "subjects"):
        if isinstance(training.get(key), dict) and "validation" in training[key]:
            return training[key], f"{model_path} (configuration: training.{key})"
    if "validation" in training and isinstance(training["validation"], list):
        return {"train": training.get("train", []), "validation": training["validation"]}, f"{model_path} (configuration)"
    beside = Path(model_path).with_name("split.json")
    if beside.is_file():
        return json.loads(beside.read_text()), str(beside)
    raise SystemExit(f"{model_path}: its configuration lists no subjects and there is no split.json beside it; "
                     "pass --split PATH (the split.json written by `atlasmorph train`)")


def pick_subjects(rows: list[dict], ids, n: int | None) -> list[dict]:
    """Rows of `ids` that have a label map, age and sex, sorted by subject id, at most n."""
    want = set(ids)
    out = sorted((r for r in rows if r["subject"] in want and r.get("seg") and r.get("age") and r.get("sex")),
                 key=lambda r: r["subject"])
    return out[:n] if n else out


# ------------------------------------------------------------------------------------ worker side
def _subject(task: dict):
    """(brain Volume, mask, truth class indices) of one subject: its T1 inside its own seg > 0.

    Optional task entries (used by ood_benchmark.py): "mask", a brain-mask file (> 0) used instead of
    seg > 0, and "seg_scheme", the numbering of the seg file ("muse", the default, or "freesurfer")."""
    from atlasmorph_cli.io import Volume, load_volume

    t1 = load_volume(task["t1"])
    seg = load_volume(task["seg"])
    mask = (load_volume(task["mask"]).data > 0) if task.get("mask") else seg.data > 0
    brain = Volume(t1.data * mask, t1.affine, t1.header, t1.source)
    return brain, mask, labels.to_index(seg.data, task.get("seg_scheme", "muse"))


def _save_prediction(task: dict, pred_index: np.ndarray, affine: np.ndarray) -> None:
    """Write the predicted class-index map (uint8) to task["pred_out"] when the task asks for it."""
    if task.get("pred_out"):
        from atlasmorph_cli.io import save_volume

        Path(task["pred_out"]).parent.mkdir(parents=True, exist_ok=True)
        save_volume(np.asarray(pred_index, dtype=np.uint8), affine, task["pred_out"], dtype=np.uint8)


def _score(pred_index: np.ndarray, truth: np.ndarray) -> dict:
    d = metrics.dice_per_structure(pred_index, truth)
    return {"dice": float(np.nanmean(d)), "dice_per_structure": dict(zip(NAMES, map(float, d)))}


def _ours(task: dict) -> dict:
    import torch

    from atlasmorph_cli import pipeline
    from atlasmorph_cli.io import Volume
    from atlasmorph_cli.nn.layers import jacobian_determinant
    from atlasmorph_cli.space import resample

    brain, mask, truth = _subject(task)
    t0 = time.perf_counter()
    _, model = pipeline.load(Path(task["model"]), task["threads"])
    load_s = time.perf_counter() - t0
    attrs = None
    if task["conditional"]:
        attrs = {n: task["attrs"][n] for n in model.config.encoder.names}
    mask_vol = Volume(mask.astype(np.float32), brain.affine)

    t0, c0 = time.perf_counter(), time.process_time()
    vec, _ = pipeline.encode_attributes(model, attrs)
    reg = pipeline.register(model, brain, vec, mask_vol, refine=task["refine"], refine_lr=task["refine_lr"])
    seg, _ = reg.labels_to_native()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    rec = _score(labels.to_index(seg, "freesurfer"), truth)
    _save_prediction(task, labels.to_index(seg, "freesurfer"), brain.affine)
    grid = reg.grid
    spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(0))
    # folding: the field that pulls the template into the subject's affinely aligned frame (model grid),
    # inside the subject's brain carried into that frame (the counterpart of ANTs' forward warp)
    with torch.no_grad():
        det = jacobian_determinant(reg.fwd[None])[0].numpy()
        det_inv = jacobian_determinant(reg.inv[None])[0].numpy()
    subj_mask = resample(mask.astype(np.float32), brain.affine, grid, world=reg.world) >= 0.5
    tmpl_mask = reg.template.probs[0] < 0.5
    rec.update({
        "seconds": wall, "cpu_seconds": cpu, "load_seconds": load_s,
        "folding_pct": folding_percent(det, subj_mask),
        "folding_pct_template_grid": folding_percent(det_inv, tmpl_mask),
        # centrality: the deformable template -> subject map on the template grid, inside the template's brain
        "mean_disp_mm": mean_magnitude(reg.inv.numpy(), tmpl_mask, spacing),
    })
    return rec


def _ants_setup(task: dict):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(task["threads"])
    import ants

    try:  # fixed seed for the random metric sampling of the rigid/affine stages (keeps ITK's threads)
        ants.config._random_seed = 1
    except AttributeError:
        pass
    return ants


def _at_working_resolution(ants, img, interp: int):
    """The image itself if already 2 mm isotropic, else resampled to 2 mm (interp 0 linear, 1 nearest)."""
    if np.allclose(img.spacing, ANTS_WORKING_MM, atol=1e-3):
        return img
    return ants.resample_image(img, (ANTS_WORKING_MM,) * 3, use_voxels=False, interp_type=interp)


def _write(data, affine, path: Path) -> Path:
    from atlasmorph_cli.io import save_volume

    save_volume(np.asarray(data, dtype=np.float32), affine, path)
    return path


def _ants(task: dict) -> dict:
    from atlasmorph_cli.intensity import normalize

    ants = _ants_setup(task)
    scratch = Path(tempfile.mkdtemp(prefix="ants-", dir=task["scratch"]))
    try:
        brain, mask, truth = _subject(task)
        native = ants.image_read(str(_write(normalize(brain.data, mask), brain.affine, scratch / "brain.nii.gz")))
        mask_img = ants.image_read(str(_write(mask, brain.affine, scratch / "mask.nii.gz")))
        t0 = time.perf_counter()
        moving = ants.image_read(task["template"])
        moving_labels = ants.image_read(task["template_labels"])
        load_s = time.perf_counter() - t0

        t0, c0 = time.perf_counter(), time.process_time()
        fixed = _at_working_resolution(ants, native, 0)
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=task["transform"],
                                outprefix=str(scratch / "reg_"))
        out = ants.apply_transforms(fixed=native, moving=moving_labels, transformlist=reg["fwdtransforms"],
                                    interpolator="genericLabel")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0

        rec = _score(np.rint(out.numpy()).astype(np.uint8), truth)
        _save_prediction(task, np.rint(out.numpy()).astype(np.uint8), brain.affine)
        rec.update({"seconds": wall, "cpu_seconds": cpu, "load_seconds": load_s,
                    "folding_pct": None, "mean_disp_mm": None})
        warp = next((p for p in reg["fwdtransforms"] if p.endswith("Warp.nii.gz")), None)
        if warp is not None:  # a deformable transform (not e.g. 'Affine')
            fixed_mask = _at_working_resolution(ants, mask_img, 1).numpy() > 0.5
            det = ants.create_jacobian_determinant_image(fixed, warp, do_log=False).numpy()
            field = ants.image_read(warp).numpy()  # (X, Y, Z, 3) in mm
            rec["folding_pct"] = folding_percent(det, fixed_mask)
            rec["mean_disp_mm"] = mean_magnitude(field, fixed_mask, axis=-1)
        return rec
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _stdout_to(path: str | None):
    """Send this process's stdout (file descriptor 1, so C++ output too) to a file while inside."""
    if not path:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _build_template(task: dict) -> dict:
    """ants.build_template from training brains, then its labels by majority vote of theirs warped to it."""
    from atlasmorph_cli.intensity import normalize

    ants = _ants_setup(task)
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=task["scratch"]))
    try:
        images, label_maps = [], []
        for t1_path, seg_path in task["subjects"]:
            brain, mask, index = _subject({"t1": t1_path, "seg": seg_path})
            k = len(images)
            img = ants.image_read(str(_write(normalize(brain.data, mask), brain.affine, scratch / f"b{k}.nii.gz")))
            lab = ants.image_read(str(_write(index, brain.affine, scratch / f"l{k}.nii.gz")))
            images.append(_at_working_resolution(ants, img, 0))
            label_maps.append(lab)
        init = ants.image_read(task["template"])  # the MNI152 brain: the built template lives in MNI space

        t0, c0 = time.perf_counter(), time.process_time()
        with _stdout_to(task.get("log")):  # ANTs' affine averaging prints pages of debug text
            tmpl = ants.build_template(initial_template=init, image_list=images, iterations=task["iterations"])
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0

        t0 = time.perf_counter()
        warped = []
        for k, (img, lab) in enumerate(zip(images, label_maps)):
            r = ants.registration(fixed=tmpl, moving=img, type_of_transform="SyN", outprefix=str(scratch / f"v{k}_"))
            w = ants.apply_transforms(fixed=tmpl, moving=lab, transformlist=r["fwdtransforms"],
                                      interpolator="genericLabel")
            warped.append(np.rint(w.numpy()).astype(np.uint8))
        voted = tmpl.new_image_like(majority_vote(warped).astype(np.float32))
        label_s = time.perf_counter() - t0
        ants.image_write(tmpl, task["out_template"])
        ants.image_write(voted, task["out_labels"])
        return {"build_seconds": build_s, "build_cpu_seconds": build_cpu, "label_seconds": label_s,
                "n_subjects": len(images), "iterations": task["iterations"]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_task(task: dict) -> dict:
    """Entry point of a worker process: one (method, subject) or the template build; adds peak memory."""
    try:
        fn = {"ours": _ours, "ants": _ants, "build": _build_template}[task["kind"]]
        rec = fn(task)
    except Exception as exc:  # reported, not fatal: the table shows the failure
        import traceback

        rec = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    rec["peak_mb"] = vmhwm_mb()
    return rec


def in_fresh_process(task: dict) -> dict:
    """Run one task in a new spawned interpreter (so VmHWM is that task's own peak)."""
    ctx = mp.get_context("spawn")
    try:
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(run_task, task).result()
    except BrokenProcessPool as exc:  # killed (e.g. out of memory)
        return {"error": f"worker died ({exc})"}


# ------------------------------------------------------------------------------------ main side
def machine() -> str:
    return describe()


def versions() -> dict:
    import importlib.metadata as md

    import atlasmorph_cli

    out = {"python": platform.python_version(), "atlasmorph": atlasmorph_cli.__version__}
    for dist in ("torch", "numpy", "nibabel", "antspyx"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_mni(data_dir: Path, work: Path) -> tuple[Path, Path]:
    """The MNI152 brain on the model grid (2 mm, as our affine reference) and its DLMUSE labels at 1 mm
    as class indices 0..34, both written as NIfTI in MNI world coordinates for ANTs."""
    from atlasmorph_cli.io import load_volume
    from atlasmorph_cli.reference import MNI_LABELS, mni_reference
    from atlasmorph_cli.space import MODEL_GRID

    t1, lab = work / "mni152_brain_2mm.nii.gz", work / "mni152_dlmuse34_1mm.nii.gz"
    if not t1.is_file():
        _write(mni_reference(data_dir)[0], MODEL_GRID.affine, t1)
    if not lab.is_file():
        v = load_volume(data_dir / MNI_LABELS)
        _write(labels.to_index(v.data, "muse"), v.affine, lab)
    return t1, lab


@functools.lru_cache(maxsize=None)
def _content_sha256(path: str, size: int, mtime_ns: int) -> str:
    if path.endswith((".nii", ".nii.gz")):  # voxels + affine: a gzip header carries its write time
        import nibabel as nib

        img = nib.load(path)
        h = hashlib.sha256(np.ascontiguousarray(img.dataobj, dtype=np.float32).tobytes())
        h.update(np.asarray(img.affine, dtype=np.float64).tobytes())
        return h.hexdigest()
    return file_sha256(Path(path))


def content_sha256(path) -> str | None:
    """What an input file holds, as sha256 (NIfTI: voxel data and affine), or None if it is missing."""
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    return _content_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


# task entries that say where things go or how fast, not what is computed
_NOT_IN_KEY = ("scratch", "threads", "log", "out_template", "out_labels", "pred_out")


def task_key(task: dict) -> str:
    """What a cached result must match to be reused: method, subject, the content of the model/template
    files and the names of the subject's files; no absolute path, so results move between machines."""
    keep = {k: v for k, v in task.items() if k not in _NOT_IN_KEY}
    for k in ("model", "template", "template_labels"):
        if k in keep:
            keep[k] = content_sha256(keep[k])
    for k in ("t1", "seg", "mask"):
        if k in keep:
            keep[k] = Path(keep[k]).name
    if "subjects" in keep:
        keep["subjects"] = [[Path(f).name for f in pair] for pair in keep["subjects"]]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cached(task: dict, cache: Path | None, run: bool = True) -> tuple[dict | None, bool]:
    """The cached result of `task` if `cache` holds one for the same inputs, else a fresh run (saved there);
    (None, False) when there is none and `run` is False."""
    key = task_key(task)
    if cache is not None and cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("key") == key and "error" not in old:
            return old, True
    if not run:
        return None, False
    rec = in_fresh_process(task)
    rec["key"] = key
    rec["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rec["load_average"] = list(os.getloadavg())
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part")
        tmp.write_text(json.dumps(clean(rec), indent=1))
        tmp.replace(cache)
    return rec, False


def summarise(subjects: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        recs = [(s, s["methods"][m]) for s in subjects if m in s["methods"] and "error" not in s["methods"][m]]
        per_struct = {n: stats([r["dice_per_structure"][n] for _, r in recs]) for n in NAMES}
        by_age = {}
        for g, _, _ in AGE_GROUPS:
            by_age[g] = stats([r["dice"] for s, r in recs if age_group(s["age"]) == g])
        out[m] = {
            "n": len(recs),
            "dice": stats([r["dice"] for _, r in recs]),
            "dice_per_structure": per_struct,
            "dice_by_age_group": by_age,
            **{k: stats([r.get(k) for _, r in recs])
               for k in ("folding_pct", "seconds", "cpu_seconds", "load_seconds", "peak_mb", "mean_disp_mm")},
        }
    return out


def paired_subjects(subjects: list[dict], methods: list[str]) -> list[dict]:
    """The subjects on which every method has a successful result (the side-by-side comparison)."""
    return [s for s in subjects
            if all(m in s["methods"] and "error" not in s["methods"][m] for m in methods)]


def wins(subjects: list[dict], methods: list[str]) -> dict:
    """For every (ours, ANTs) pair: on how many subjects ours has the higher mean Dice, of how many."""
    out = {}
    for m in (x for x in methods if x in OURS):
        for a in (x for x in methods if x in ANTS):
            both = [s for s in subjects if "dice" in s["methods"].get(m, {}) and "dice" in s["methods"].get(a, {})]
            out[f"{m}:{a}"] = {"ours_higher": sum(s["methods"][m]["dice"] > s["methods"][a]["dice"] for s in both),
                               "n": len(both)}
    return out


def ratios(summary: dict, ants_method: str = "ants-syncc-mni") -> dict:
    """ours : an ANTs method for wall seconds and peak memory (give it the summary over paired subjects)."""
    out = {}
    a = summary.get(ants_method)
    for m in OURS:
        if m in summary and a:
            for k in ("seconds", "peak_mb"):
                num, den = summary[m][k]["mean"], a[k]["mean"]
                if num is not None and den:
                    out[f"{m}:{ants_method} {k}"] = num / den
    return out


def side_by_side(subjects: list[dict], methods: list[str]) -> dict:
    """For every ANTs method: ours and it on the subjects it ran on (summary, wins, ratios)."""
    ours = [m for m in methods if m in OURS]
    out = {}
    for a in (m for m in methods if m in ANTS):
        both = paired_subjects(subjects, ours + [a])
        if not both:
            continue
        summ = summarise(both, ours + [a])
        out[a] = {"subjects": [s["subject"] for s in both], "methods": ours + [a], "summary": summ,
                  "wins": wins(both, ours + [a]), "ratios": ratios(summ, a)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    ap.add_argument("--split", type=Path, default=None,
                    help="split.json from `atlasmorph train` (default: the model's configuration, else split.json beside it)")
    ap.add_argument("--baseline", type=Path, default=None, help="unconditional model (trained with --attributes none)")
    ap.add_argument("--methods", default=None,
                    help=f"comma list from {','.join(ALL_METHODS)} (default: {','.join(DEFAULT_METHODS)}"
                         " + atlasmorph-baseline when --baseline is given)")
    ap.add_argument("--n", type=int, default=None, help="at most this many validation subjects (default: all)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="output folder (default docs/benchmarks)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: ATLASMORPH_DATA or ../shared/data)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and ITK (default 2)")
    ap.add_argument("--template-subjects", type=int, default=10, help="training subjects for ants-syncc-built (default 10)")
    ap.add_argument("--template-iterations", type=int, default=2, help="ants.build_template iterations (default 2)")
    ap.add_argument("--ants-transform", default=ANTS_TRANSFORM,
                    help="type_of_transform of the ANTs methods (default SyNCC, what the method names say; "
                         "another one, e.g. 'antsRegistrationSyNQuick[s]', is named in the report)")
    ap.add_argument("--ants-n", type=int, default=None,
                    help="run the ANTs methods on the first N of those subjects only (10-20 min each on 2 cores)")
    ap.add_argument("--refine", type=int, default=None,
                    help="instance-optimisation steps of the AtlasMorph methods (default: what `atlasmorph segment` does)")
    ap.add_argument("--cached-only", action="store_true",
                    help="run nothing new: report only the results the --results folder already holds")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder of per-(method, subject) results, reused whenever the inputs match (default: WORK/results)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the MNI/ANTs files and per-task results, reused by a later run (default: temporary)")
    args = ap.parse_args(argv)

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # inherited by the workers
    import torch

    from atlasmorph_cli.datadir import find_data_dir
    from atlasmorph_cli.errors import AtlasMorphError
    from atlasmorph_cli.pipeline import REFINE_LR, REFINE_STEPS, resolve_model

    torch.set_num_threads(args.threads)
    if args.refine is None:
        args.refine = REFINE_STEPS
    data_dir = args.data or find_data_dir()
    if data_dir is None or not (data_dir / "ixi" / "subjects.csv").exists():
        print("no data folder (set ATLASMORPH_DATA or provide ../shared/data)", file=sys.stderr)
        return 2
    try:
        model_path = resolve_model(args.model)
    except AtlasMorphError as exc:
        print(exc, file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else (
        list(DEFAULT_METHODS[:2]) + (["atlasmorph-baseline"] if args.baseline else []) + list(DEFAULT_METHODS[2:]))
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        print(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}", file=sys.stderr)
        return 2
    if "atlasmorph-baseline" in methods and args.baseline is None:
        print("atlasmorph-baseline needs --baseline MODEL", file=sys.stderr)
        return 2
    notes = []
    if any(m in ANTS for m in methods):
        try:
            import ants  # noqa: F401  (the optional `bench` dependency; the workers import it themselves)
        except ImportError as exc:
            notes.append(f"antspyx not available ({exc}); ANTs methods not run")
            print(notes[-1], file=sys.stderr)
            methods = [m for m in methods if m not in ANTS]

    split, split_source = split_ids(args.split, model_path)
    with open(data_dir / "ixi" / "subjects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = pick_subjects(rows, split.get("validation", []), args.n)
    if not val:
        print(f"no validation subject of {split_source} with labels, age and sex in {data_dir}/ixi", file=sys.stderr)
        return 2

    work_ctx = None
    if args.work is None:
        work_ctx = tempfile.TemporaryDirectory(prefix="atlasmorph-seg-bench-")
        work = Path(work_ctx.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    results_dir = args.results or (work / "results" if args.work is not None else None)
    ixi = data_dir / "ixi"
    ants_val = val[:args.ants_n] if args.ants_n is not None else val

    def make_task(m: str, r: dict) -> dict:
        base = {"threads": args.threads, "scratch": str(scratch), "subject": r["subject"],
                "t1": str(ixi / r["t1"]), "seg": str(ixi / r["seg"])}
        if m in OURS:
            model = args.baseline if m == "atlasmorph-baseline" else model_path
            return {**base, "kind": "ours", "method": m, "model": str(Path(model).resolve()), "refine": args.refine,
                    "refine_lr": REFINE_LR, "conditional": m == "atlasmorph",
                    "attrs": {"age": float(r["age"]), "sex": r["sex"]}}
        tmpl = (mni_t1, mni_labels) if m == "ants-syncc-mni" else built
        return {**base, "kind": "ants", "method": m, "transform": args.ants_transform,
                "template": str(tmpl[0]), "template_labels": str(tmpl[1])}

    short = {"atlasmorph": "ours", "atlasmorph-average": "avg", "atlasmorph-baseline": "uncond",
             "ants-syncc-mni": "SyNCC-MNI", "ants-syncc-built": "SyNCC-built"}
    per_subject = [{"subject": r["subject"], "age": float(r["age"]), "sex": r["sex"],
                    "age_group": age_group(float(r["age"])), "methods": {}} for r in val]

    def run_all(ms: list[str], rows: list[dict]) -> None:
        """Every (method, subject) of ms x rows, one line each; cached results are reused."""
        for rec, r in zip(per_subject, val):
            if r not in rows:
                continue
            for m in ms:
                cache = results_dir / m / f"{r['subject']}.json" if results_dir else None
                res, cached = run_cached(make_task(m, r), cache, run=not args.cached_only)
                if res is None:  # --cached-only and not in the results folder
                    continue
                res.pop("key", None)
                rec["methods"][m] = res
                head = f"{r['subject']:<16} {float(r['age']):5.1f} {r['sex']:>3} {short[m]:<11}"
                if "error" in res:
                    print(f"{head} FAILED: {res['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"{head} Dice {res['dice']:.4f}  {res['seconds']:7.1f} s  {res['peak_mb']:5.0f} MB"
                          + ("  (cached)" if cached else ""), flush=True)

    ours_methods = [m for m in methods if m in OURS]
    print(f"{len(val)} validation subjects ({split_source}); ANTs methods on the first {len(ants_val)}", flush=True)
    run_all(ours_methods, val)  # the fast methods first, on every subject

    mni_t1, mni_labels = prepare_mni(data_dir, work) if any(m in ANTS for m in methods) else (None, None)
    template_build, built = None, None
    if "ants-syncc-built" in methods:
        # the built template is kept with the results: the SyNCC-built results are only valid against it
        home = (results_dir or work) / "ants-syncc-built"
        home.mkdir(parents=True, exist_ok=True)
        built = (home / "template.nii.gz", home / "template_labels.nii.gz")
        train_rows = pick_subjects(rows, split.get("train", []), args.template_subjects)
        task = {"kind": "build", "threads": args.threads, "scratch": str(scratch), "template": str(mni_t1),
                "iterations": args.template_iterations,
                "subjects": [(str(ixi / r["t1"]), str(ixi / r["seg"])) for r in train_rows],
                "out_template": str(built[0]), "out_labels": str(built[1]), "log": str(work / "build_template.log")}
        print(f"building an ANTs template from {len(train_rows)} training subjects "
              f"({args.template_iterations} iterations) ...", flush=True)
        template_build, cached = run_cached(task, home / "build.json", run=not args.cached_only)
        if cached and not all(p.is_file() for p in built):
            template_build, _ = run_cached(task, None, run=not args.cached_only)
        if template_build is None:
            template_build = {"error": "not in the results folder (--cached-only)"}
        template_build.pop("key", None)
        template_build["subjects"] = [r["subject"] for r in train_rows]
        if "error" in template_build:
            notes.append(f"ants.build_template failed: {template_build['error']}; ants-syncc-built not run")
            print(notes[-1], file=sys.stderr)
            methods.remove("ants-syncc-built")
        else:
            print(f"  built in {template_build['build_seconds']:.0f} s, labels in "
                  f"{template_build['label_seconds']:.0f} s, peak {template_build['peak_mb']:.0f} MB", flush=True)
    for m in (m for m in methods if m in ANTS):  # one method over all its subjects, then the next
        run_all([m], ants_val)
    if args.cached_only:
        missing = [f"{m} on {sum(m not in r['methods'] for r in per_subject)}" for m in methods
                   if any(m not in r["methods"] for r in per_subject)]
        if missing:
            notes.append("Not run yet (reported from the results folder only, `--cached-only`): "
                         + ", ".join(missing) + " subjects.")

    summary = summarise(per_subject, methods)
    paired = paired_subjects(per_subject, methods)
    paired_summary = summarise(paired, methods)
    result = {
        "command": "python benchmarks/segmentation_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "versions": versions(),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_end": list(os.getloadavg()),
        "model": str(model_path),
        "model_sha256": file_sha256(model_path),
        "baseline": str(args.baseline) if args.baseline else None,
        "baseline_sha256": file_sha256(args.baseline) if args.baseline else None,
        "split": split_source,
        "methods": methods,
        "ants_transform": args.ants_transform,
        "ants_n": len(ants_val) if any(m in ANTS for m in methods) and len(ants_val) < len(val) else None,
        "cached_only": args.cached_only,
        "refine": args.refine,
        "refine_lr": REFINE_LR,
        "ants_working_resolution_mm": ANTS_WORKING_MM,
        "template_build": template_build,
        "age_groups": [g for g, _, _ in AGE_GROUPS],
        "structures": NAMES,
        "n_subjects": len(per_subject),
        "summary": summary,
        "paired_subjects": [r["subject"] for r in paired],
        "paired_summary": paired_summary,
        "side_by_side": side_by_side(per_subject, methods),
        "notes": notes,
        "subjects": per_subject,
    }
    result = clean(result)
    print()
    for m in methods:
        s = summary[m]
        if not s["n"]:
            print(f"{m:<20} no successful subject")
            continue
        print(f"{m:<20} Dice {s['dice']['mean']:.4f} ± {s['dice']['std']:.4f}   folding {s['folding_pct']['mean']:.3f} %   "
              f"{s['seconds']['mean']:.1f} s/subject   peak {s['peak_mb']['mean']:.0f} MB   "
              f"|u| {s['mean_disp_mm']['mean']:.2f} mm")
    for a, sb in result["side_by_side"].items():
        print(f"\nside by side with {a} on the {len(sb['subjects'])} subjects it ran on:")
        for m in sb["methods"]:
            d = sb["summary"][m]["dice"]
            print(f"{m:<20} Dice {d['mean']:.4f} ± {d['std']:.4f}   {sb['summary'][m]['seconds']['mean']:.1f} s/subject")
        for k, v in sb["wins"].items():
            print(f"{k.replace(':', ' above ')} on {v['ours_higher']} of {v['n']} subjects")
        for k, v in sb["ratios"].items():
            print(f"ratio {k}: {v:.3g}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "segmentation.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "segmentation.md").write_text(markdown(result))
    boxplot(result, args.out / "dice_boxplot.png")
    print(f"wrote {args.out / 'segmentation.json'}, {args.out / 'segmentation.md'} and {args.out / 'dice_boxplot.png'}")
    if work_ctx is not None:
        work_ctx.cleanup()
    return 0


# ------------------------------------------------------------------------------------ report
def _pm(s: dict, fmt: str = ".3f") -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def markdown(res: dict) -> str:
    s, methods = res["summary"], res["methods"]
    tb = res.get("template_build")
    lines = [
        "# Atlas-based segmentation of held-out subjects",
        "",
        f"{res['n_subjects']} IXI validation subjects of the model (split: `{res['split']}`), sorted by id"
        + (f"; the ANTs methods on the first {res['ants_n']} of them" if res.get("ants_n") is not None else "") + ". Every",
        "method gets the subject's T1 skull-stripped with its own DLMUSE mask (seg > 0) in its native grid",
        "(120 x 120 x 90, 2 mm, PSR) and returns a label map on that grid; Dice against the subject's own DLMUSE",
        "labels mapped to the 34 structures (`atlasmorph_cli.labels`), mean over the structures present, then",
        "mean ± std over subjects.",
        "",
        "- **AtlasMorph (age, sex)**: `pipeline.register` + `Registration.labels_to_native` with the subject's true",
        "  age and sex, i.e. what `atlasmorph segment brain.nii.gz --mask seg.nii.gz --age A --sex S` computes"
        + (f", with {res['refine']} instance-optimisation steps (lr {res['refine_lr']:g}) on the network's velocity"
           f" (`--refine {res['refine']}`)." if res.get("refine") else ", the network's warp as is (`--refine 0`)."),
        "- **AtlasMorph, average template**: the same model without attributes (mean age, equal sex mix).",
        "- **AtlasMorph, unconditional model**: a model trained with `--attributes none` (when given).",
        f"- **ANTs SyNCC to MNI152**: `ants.registration(fixed=subject, moving=MNI152 brain, type_of_transform='{res['ants_transform']}')`",
        "  (rigid + affine + SyN with CC, antspyx defaults), then `ants.apply_transforms(..., interpolator='genericLabel')`",
        "  of the MNI152 DLMUSE labels. Moving image: the MNI152 T1 (FSL, 2 mm) resampled onto the model grid",
        "  and masked with its DLMUSE labels > 0, the very reference our affine step uses. Fixed image: the",
        f"  subject's normalised brain at {res['ants_working_resolution_mm']:g} mm isotropic (the IXI scans already are 2 mm,",
        "  so no resampling; other inputs are resampled linearly), the working resolution of our model grid.",
        "  Labels: the 1 mm DLMUSE map (34 structures) pulled straight into the subject's native grid, so the",
        "  labels are interpolated once.",
    ]
    if tb:
        lines += [
            f"- **ANTs SyNCC to built template**: `ants.build_template` (iterations: {tb.get('iterations')}, SyN, initialised",
            f"  with the MNI152 brain, so it stays on the model grid in MNI space) from {tb.get('n_subjects')} training",
            "  subjects' brains (first by id); its labels are the voxel-wise majority vote of those subjects' labels,",
            "  each warped to the built template by one more `SyN` registration (`genericLabel`; build_template does not",
            "  return its final transforms). Then registration + label transfer as above. Built in "
            f"{tb.get('build_seconds', float('nan')):.0f} s (labels {tb.get('label_seconds', float('nan')):.0f} s, peak "
            f"{tb.get('peak_mb', float('nan')):.0f} MB), once, not counted per subject.",
        ]
    lines += [
        "",
        "**Folding**: % of brain voxels where the Jacobian determinant of the deformable part is ≤ 0. Ours: the",
        "field that pulls the template into the subject's affinely aligned frame (model grid), inside the subject's",
        "brain mask carried there (central differences). ANTs: `ants.create_jacobian_determinant_image` of the",
        "forward warp (on the subject's 2 mm grid), inside the subject's brain mask.",
        "**Seconds**: wall time from the in-memory brain to the native label map (ours: template + affine + RegNet",
        "+ refinement + label resampling; ANTs: resampling, registration, label transfer), without reading files or loading the",
        "model. **Peak MB**: VmHWM of a fresh worker process that ran only that (method, subject), imports and",
        "model included. **Mean displacement**: mean length (mm) of the deformable part; ours: the template → subject field",
        "on the template grid inside the template's brain (centrality: a central template needs small fields);",
        "ANTs: the forward warp inside the subject's brain.",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']}; threads {res['threads']} (torch, ITK); load average at end "
        f"{', '.join(f'{x:.1f}' for x in res['load_average_at_end'])}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
        "",
        f"Model: `{res['model']}` (sha256 {res['model_sha256'][:12]}…)"
        + (f"; baseline `{res['baseline']}` (sha256 {res['baseline_sha256'][:12]}…)" if res.get("baseline") else ""),
        "",
        "## Summary",
        "",
        "| method | n | Dice (mean ± std) | folding % | s/subject | CPU s/subject | peak MB | model/template load s | mean displacement mm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        v = s[m]
        lines.append(f"| {LABEL[m]} | {v['n']} | {_pm(v['dice'], '.4f')} | {_pm(v['folding_pct'], '.3f')} | "
                     f"{_pm(v['seconds'], '.1f')} | {_pm(v['cpu_seconds'], '.1f')} | {_pm(v['peak_mb'], '.0f')} | "
                     f"{_pm(v['load_seconds'], '.2f')} | {_pm(v['mean_disp_mm'], '.2f')} |")
    if any(m in ANTS for m in methods) and res["ants_transform"] != ANTS_TRANSFORM:
        lines += ["", f"**Note**: the ANTs methods ran `type_of_transform='{res['ants_transform']}'`, not "
                  f"{ANTS_TRANSFORM}; their names are kept for the table."]
    def paired_table(ms: list[str], summ: dict) -> list[str]:
        out = ["| method | Dice (mean ± std) | " + " | ".join(f"{g} (n)" for g in res["age_groups"])
               + " | folding % | s/subject | peak MB | mean displacement mm |", "|---|---|" + "---|" * (len(res["age_groups"]) + 4)]
        for m in ms:
            v = summ[m]
            cells = [f"{_pm(v['dice_by_age_group'][g], '.4f')} ({v['dice_by_age_group'][g]['n']})" for g in res["age_groups"]]
            out.append(f"| {LABEL[m]} | {_pm(v['dice'], '.4f')} | " + " | ".join(cells)
                       + f" | {_pm(v['folding_pct'], '.3f')} | {_pm(v['seconds'], '.1f')} | {_pm(v['peak_mb'], '.0f')}"
                       + f" | {_pm(v['mean_disp_mm'], '.2f')} |")
        return out

    for a, sb in (res.get("side_by_side") or {}).items():
        lines += ["", f"## Side by side with {LABEL[a]}: the {len(sb['subjects'])} subjects it ran on", "",
                  "Subjects: " + ", ".join(sb["subjects"]) + ".", ""]
        lines += paired_table(sb["methods"], sb["summary"])
        lines += [""] + [f"- {LABEL[k.split(':')[0]]} has the higher Dice than {LABEL[k.split(':')[1]]} on "
                         f"{v['ours_higher']} of {v['n']} subjects" for k, v in sb["wins"].items()]
        lines += [f"- ratio of the means, {k.split(':')[0]} : {k.split(':')[1]} = {v:.3g}"
                  + (f" (ANTs takes {1 / v:.0f}x as long)" if k.endswith("seconds") else "")
                  for k, v in sb["ratios"].items()]
    if sum(m in ANTS for m in methods) > 1 and res.get("paired_subjects"):
        lines += ["", f"## All methods on the {len(res['paired_subjects'])} subjects every method ran on", "",
                  "Subjects: " + ", ".join(res["paired_subjects"]) + ".", ""]
        lines += paired_table(methods, res["paired_summary"])
    for n in res.get("notes") or []:
        lines += ["", n]
    lines += ["", "## Dice by age group", "", "| method | " + " | ".join(f"{g} (n)" for g in res["age_groups"]) + " |",
              "|---|" + "---|" * len(res["age_groups"])]
    for m in methods:
        cells = [f"{_pm(s[m]['dice_by_age_group'][g], '.4f')} ({s[m]['dice_by_age_group'][g]['n']})" for g in res["age_groups"]]
        lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    lines += ["", "## Dice per structure (mean ± std over subjects)", "",
              "| structure | " + " | ".join(LABEL[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for n in res["structures"]:
        lines.append(f"| {n} | " + " | ".join(_pm(s[m]['dice_per_structure'][n]) for m in methods) + " |")
    ours = [m for m in methods if m in OURS]
    if ours:
        lines += ["", "## Centrality: mean displacement of the deformable part (mm), per subject", "",
                  "| subject | age | sex | " + " | ".join(LABEL[m] for m in ours) + " |", "|---|---|---|" + "---|" * len(ours)]
        for r in res["subjects"]:
            cells = [f"{r['methods'][m]['mean_disp_mm']:.2f}" if r["methods"].get(m, {}).get("mean_disp_mm") is not None
                     else "–" for m in ours]
            lines.append(f"| {r['subject']} | {r['age']:.1f} | {r['sex']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per subject (mean Dice / seconds / peak MB)", "",
              "| subject | age | sex | " + " | ".join(LABEL[m] for m in methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for r in res["subjects"]:
        cells = []
        for m in methods:
            v = r["methods"].get(m, {})
            cells.append("not run" if not v else "failed" if v.get("dice") is None
                         else f"{v['dice']:.4f} / {v['seconds']:.1f} / {v['peak_mb']:.0f}")
        lines.append(f"| {r['subject']} | {r['age']:.1f} | {r['sex']} | " + " | ".join(cells) + " |")
    lines += ["", "![Dice per method](dice_boxplot.png)"]
    return "\n".join(lines) + "\n"


def _merged_structures() -> list[tuple[str, list[str]]]:
    """Structure names with Left-/Right- merged (the order of labels.STRUCTURES)."""
    groups: dict[str, list[str]] = {}
    for n in NAMES:
        key = n.replace("Left-", "").replace("Right-", "")
        groups.setdefault(key, []).append(n)
    return list(groups.items())


def box_labels(methods: list[str], counts: list[int]) -> list[str]:
    """One-line tick label per method with its number of subjects (the slow ANTs methods may have fewer)."""
    return [f"{TICK[m]} (n = {n})" for m, n in zip(methods, counts)]


def boxplot(res: dict, path: Path) -> Path:
    """Mean Dice per subject for each method (left) and per structure, left and right pooled (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = res["methods"]
    colours = plt.get_cmap("tab10").colors
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1.3, 4.2]})
    data = [[r["methods"][m]["dice"] for r in res["subjects"] if r["methods"].get(m, {}).get("dice") is not None]
            for m in methods]
    bp = ax0.boxplot(data, patch_artist=True, widths=0.6)
    for patch, c in zip(bp["boxes"], colours):
        patch.set_facecolor(c)
        patch.set_alpha(0.6)
    for k, d in enumerate(data):
        ax0.scatter(np.full(len(d), k + 1.0) + np.linspace(-0.12, 0.12, len(d)), d, s=8, color="k", zorder=3)
    ax0.set_xticks(range(1, len(methods) + 1), box_labels(methods, [len(d) for d in data]),
                   rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
    ax0.set_ylabel("mean Dice over 34 structures")
    ax0.set_title("per validation subject", fontsize=10)
    ax0.grid(axis="y", alpha=0.3)

    groups = _merged_structures()
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        per = []
        for _, names in groups:
            vals = [r["methods"][m]["dice_per_structure"][n] for r in res["subjects"]
                    if r["methods"].get(m, {}).get("dice_per_structure") for n in names]
            per.append([v for v in vals if v is not None])
        pos = np.arange(len(groups)) + (k - (len(methods) - 1) / 2) * width
        b = ax1.boxplot(per, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False,
                        manage_ticks=False)
        for patch in b["boxes"]:
            patch.set_facecolor(colours[k % len(colours)])
            patch.set_alpha(0.6)
        ax1.plot([], [], color=colours[k % len(colours)], lw=6, alpha=0.6, label=LABEL[m])
    ax1.set_xticks(range(len(groups)), [g for g, _ in groups], rotation=60, ha="right", fontsize=8)
    ax1.set_ylabel("Dice (left and right pooled)")
    ax1.set_ylim(0, 1)
    ax1.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(methods), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
