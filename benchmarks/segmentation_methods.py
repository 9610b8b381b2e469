"""The segmentation benchmark's worker side: each method on one subject, in a fresh process, and the ANTs inputs.

Workers stay torch-free until a method needs it: this module imports numpy and numpy-only package modules.
The pure measures (folding, displacement, majority vote) live here because the workers compute them.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import common
from atlasmorph_cli import labels  # with training.metrics below: numpy-only, workers stay torch-free
from atlasmorph_cli.training import metrics

OURS = ("atlasmorph", "atlasmorph-average", "atlasmorph-baseline")
ANTS = ("ants-syncc-mni", "ants-syncc-built")
ALL_METHODS = OURS + ANTS
DEFAULT_METHODS = ("atlasmorph", "atlasmorph-average", "ants-syncc-mni")
NAMES = [s.name for s in labels.STRUCTURES]
ANTS_TRANSFORM = "SyNCC"
ANTS_WORKING_MM = 2.0  # the model grid's voxel size: ANTs registers at the same resolution as ours


# ------------------------------------------------------------------------------------ pure measures
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


def majority_vote(maps, n_classes: int = labels.N_CLASSES) -> np.ndarray:
    """Voxel-wise most frequent class of several index maps of one shape (ties: the lower index)."""
    maps = list(maps)
    votes = np.zeros((n_classes, *np.shape(maps[0])), dtype=np.uint16)
    for m in maps:
        m = np.asarray(m, dtype=np.int64)
        for c in np.unique(m):
            votes[c] += m == c
    return votes.argmax(0).astype(np.uint8)


# ------------------------------------------------------------------------------------ methods
def load_subject(task: dict):
    """(brain Volume, mask, truth class indices) of one subject: its T1 inside its own seg > 0.

    Optional task entries (used by ood_benchmark.py): "mask", a brain-mask file (> 0) used instead of
    seg > 0, and "seg_scheme", the numbering of the seg file ("muse", the default, or "freesurfer")."""
    from atlasmorph_cli.io.volumes import Volume, load_volume

    t1 = load_volume(task["t1"])
    seg = load_volume(task["seg"])
    mask = (load_volume(task["mask"]).data > 0) if task.get("mask") else seg.data > 0
    brain = Volume(t1.data * mask, t1.affine, t1.header, t1.source)
    return brain, mask, labels.to_index(seg.data, task.get("seg_scheme", "muse"))


def _save_prediction(task: dict, pred_index: np.ndarray, affine: np.ndarray) -> None:
    """Write the predicted class-index map (uint8) to task["pred_out"] when the task asks for it."""
    if task.get("pred_out"):
        from atlasmorph_cli.io.volumes import save_volume

        Path(task["pred_out"]).parent.mkdir(parents=True, exist_ok=True)
        save_volume(np.asarray(pred_index, dtype=np.uint8), affine, task["pred_out"], dtype=np.uint8)


def score(pred_index: np.ndarray, truth: np.ndarray) -> dict:
    """Mean Dice over the structures present and Dice per structure of a class-index map against the truth."""
    d = metrics.dice_per_structure(pred_index, truth)
    return {"dice": float(np.nanmean(d)), "dice_per_structure": dict(zip(NAMES, map(float, d)))}


def _ours(task: dict) -> dict:
    """An AtlasMorph method: template for the task's attributes (or none), register, labels to native."""
    import torch

    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.model.shipped import load
    from atlasmorph_cli.io.volumes import Volume
    from atlasmorph_cli.model.layers import jacobian_determinant
    from atlasmorph_cli.geometry.space import resample

    brain, mask, truth = load_subject(task)
    t0 = time.perf_counter()
    _, model = load(Path(task["model"]), task["threads"])
    load_s = time.perf_counter() - t0
    attrs = None
    if task["conditional"]:
        attrs = {n: task["attrs"][n] for n in model.config.encoder.names}
    mask_vol = Volume(mask.astype(np.float32), brain.affine)

    t0, c0 = time.perf_counter(), time.process_time()
    vec, _ = encode_attributes(model, attrs)
    reg = register_subject(model, brain, vec, mask_vol, refine=task["refine"], refine_lr=task["refine_lr"],
                           refine_loss=task.get("refine_loss", "model"),
                           acquisition_blur=task.get("acquisition_blur", True))
    seg, _ = reg.labels_to_native()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    rec = score(labels.to_index(seg, "freesurfer"), truth)
    _save_prediction(task, labels.to_index(seg, "freesurfer"), brain.affine)
    grid = reg.grid
    spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(0))
    # folding: the field that pulls the template into the subject's affinely aligned frame (model grid),
    # inside the subject's brain carried into that frame (the counterpart of ANTs' forward warp)
    with torch.no_grad():
        det = jacobian_determinant(reg.template_to_subject_field[None])[0].numpy()
        det_inv = jacobian_determinant(reg.subject_to_template_field[None])[0].numpy()
    subj_mask = resample(mask.astype(np.float32), brain.affine, grid, world=reg.world) >= 0.5
    tmpl_mask = reg.template.probs[0] < 0.5
    rec.update({
        "seconds": wall, "cpu_seconds": cpu, "load_seconds": load_s,
        "folding_pct": folding_percent(det, subj_mask),
        "folding_pct_template_grid": folding_percent(det_inv, tmpl_mask),
        # centrality: the deformable template -> subject map on the template grid, inside the template's brain
        "mean_disp_mm": mean_magnitude(reg.subject_to_template_field.numpy(), tmpl_mask, spacing),
    })
    return rec


def _ants_setup(task: dict):
    """antspyx with the task's ITK thread count and a fixed seed."""
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


def write_float(data, affine, path: Path) -> Path:
    """Save an array as float32 NIfTI (for ANTs, which reads files)."""
    from atlasmorph_cli.io.volumes import save_volume

    save_volume(np.asarray(data, dtype=np.float32), affine, path)
    return path


def _ants(task: dict) -> dict:
    """An ANTs method: register the template to the subject's brain, pull its labels into the native grid."""
    from atlasmorph_cli.geometry.intensity import normalize

    ants = _ants_setup(task)
    scratch = Path(tempfile.mkdtemp(prefix="ants-", dir=task["scratch"]))
    try:
        brain, mask, truth = load_subject(task)
        native = ants.image_read(str(write_float(normalize(brain.data, mask), brain.affine, scratch / "brain.nii.gz")))
        mask_img = ants.image_read(str(write_float(mask, brain.affine, scratch / "mask.nii.gz")))
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

        rec = score(np.rint(out.numpy()).astype(np.uint8), truth)
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
    from atlasmorph_cli.geometry.intensity import normalize

    ants = _ants_setup(task)
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=task["scratch"]))
    try:
        images, label_maps = [], []
        for t1_path, seg_path in task["subjects"]:
            brain, mask, index = load_subject({"t1": t1_path, "seg": seg_path})
            k = len(images)
            img = ants.image_read(str(write_float(normalize(brain.data, mask), brain.affine, scratch / f"b{k}.nii.gz")))
            lab = ants.image_read(str(write_float(index, brain.affine, scratch / f"l{k}.nii.gz")))
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
    rec["peak_mb"] = common.peak_mb()
    return rec


def in_fresh_process(task: dict) -> dict:
    """Run one task in a new spawned interpreter (so VmHWM is that task's own peak)."""
    ctx = mp.get_context("spawn")
    try:
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(run_task, task).result()
    except BrokenProcessPool as exc:  # killed (e.g. out of memory)
        return {"error": f"worker died ({exc})"}


def prepare_mni(data_dir: Path, work: Path) -> tuple[Path, Path]:
    """The MNI152 brain on the model grid (2 mm, as our affine reference) and its DLMUSE labels at 1 mm
    as class indices 0..34, both written as NIfTI in MNI world coordinates for ANTs."""
    from atlasmorph_cli.io.volumes import load_volume
    from atlasmorph_cli.training.reference import MNI_LABELS, mni_reference
    from atlasmorph_cli.geometry.space import MODEL_GRID

    t1, lab = work / "mni152_brain_2mm.nii.gz", work / "mni152_dlmuse34_1mm.nii.gz"
    if not t1.is_file():
        write_float(mni_reference(data_dir)[0], MODEL_GRID.affine, t1)
    if not lab.is_file():
        v = load_volume(data_dir / MNI_LABELS)
        write_float(labels.to_index(v.data, "muse"), v.affine, lab)
    return t1, lab
