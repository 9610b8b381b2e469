"""ANTs template builds on the IXI training subjects that `atlasmorph build` uses (issue 21): resumable, timed.

    PYTHONPATH=/work/ood-ants python benchmarks/build_ants.py --preset fast --n-train 10 --work runs/build/ants-fast-10
    PYTHONPATH=/work/ood-ants python benchmarks/build_ants.py --preset cc --n-train 10 --work runs/build/ants-cc-10 \
        --max-registrations 3          # a measured subset: prints the estimate of the whole build; rerun to go on

The loop is ants.build_template's own (antspyx 0.6.3, registration/build_template.py), written out so that
every registration is cached on disk and an interrupted build goes on where it stopped: per iteration,
register every subject to the current template (fixed = template), average the warped subjects, average
the affines without their rigid part (useNoRigid), take the mean warp times -gradient_step through the
inverse mean affine, move the average by it, blend with its Laplacian sharpening (0.75/0.25).
`--check-against-ants` runs ants.build_template itself on the same inputs and reports the correlation.

Presets (the initial template is the MNI152 brain on the model grid, as for the earlier build in
docs/benchmarks.md, so every template lives in MNI space on the model grid):
  fast: ants.build_template's defaults: SyN (Mattes MI, 40x20x0), gradient step 0.2, 3 iterations
        (its default; the template after 2 iterations is kept as well).
  cc:   antsMultivariateTemplateConstruction2.sh's defaults for the deformable stage: SyN[0.1,3,0],
        CC radius 4, 100x100x70x20 iterations, 4 iterations of the build, gradient step 0.25
        (the affine stage is antspy's, Mattes MI).
  syncc: antspy's SyNCC preset (rigid + affine + SyN[0.15,3,0] CC 4, 2100x1200x1200x20; what
        docs/benchmarks.md's "ANTs SyNCC" used: 7-24 min per registration here), 4 iterations, step 0.25.

Labels: each subject's label map is carried into the final template with ANTs' own transforms of
the last iteration composed with that iteration's template update ([mean warp, inverse mean affine,
subject warp, subject affine]); no extra registration. Written both as probabilities (the one-hot
classes interpolated linearly and averaged; used by build_compare.py) and as a majority vote
(genericLabel). Inputs are the subjects' brains (T1 inside their DLMUSE seg > 0, normalised as
AtlasMorph does), at their own 2 mm resolution. Everything runs on ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS
threads (--threads, default 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import common
from segmentation_methods import _stdout_to

PRESETS = {
    "fast": {"iterations": 3, "gradient_step": 0.2, "registration": {"type_of_transform": "SyN"}},
    "cc": {"iterations": 4, "gradient_step": 0.25,
           "registration": {"type_of_transform": "SyN", "syn_metric": "CC", "syn_sampling": 4,
                            "reg_iterations": (100, 100, 70, 20), "grad_step": 0.1}},
    "syncc": {"iterations": 4, "gradient_step": 0.25, "registration": {"type_of_transform": "SyNCC"}},
}
BLENDING = 0.75  # ants.build_template's blending_weight default


def _ants(threads: int):
    """antspyx on `threads` ITK threads with a fixed seed for the metric sampling."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    ants.config._random_seed = 1
    return ants


def _load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------ inputs
def prepare_inputs(rows: list[dict], data: Path, work: Path) -> tuple[list[Path], list[Path], Path]:
    """Normalised brains and class-index maps (0..34) of the subjects, and the MNI152 brain on the model
    grid, written once into work/inputs (what the registrations read)."""
    from atlasmorph_cli.geometry.intensity import normalize
    from segmentation_methods import load_subject, prepare_mni, write_float

    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    brains, indices = [], []
    for r in rows:
        b, i = inputs / f"{r['subject']}_brain.nii.gz", inputs / f"{r['subject']}_index.nii.gz"
        if not (b.is_file() and i.is_file()):
            brain, mask, index = load_subject({"t1": r["t1"], "seg": r["seg"]})
            write_float(index, brain.affine, i)
            write_float(normalize(brain.data, mask) * mask, brain.affine, b)
        brains.append(b)
        indices.append(i)
    init, _ = prepare_mni(data, inputs)
    return brains, indices, init


def _same_subjects(work: Path, ids: list[str], preset: dict) -> None:
    """Refuse to resume a work folder made for other subjects or another preset."""
    rec = work / "subjects.json"
    want = {"subjects": ids, "preset": preset}
    if rec.is_file():
        have = json.loads(rec.read_text())
        if have != json.loads(json.dumps(want)):
            raise SystemExit(f"{work}: made for other subjects or settings ({rec}); use another --work")
    else:
        rec.write_text(json.dumps(want, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ the build
def _register(ants, fixed, brain_path: Path, out: Path, kwargs: dict) -> dict:
    """One cached registration of a subject to the current template: out/ holds its transforms, the
    subject warped into the template and done.json (times); a finished one is read back."""
    done = out / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    moving = ants.image_read(str(brain_path))
    t0, c0 = time.perf_counter(), time.process_time()
    reg = ants.registration(fixed, moving, outprefix=str(out / "out"), **kwargs)
    rec = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "load_end": _load(),
           "fwdtransforms": [str(Path(p).name) for p in reg["fwdtransforms"]]}
    ants.image_write(reg["warpedmovout"], str(out / "warped.nii.gz"))
    done.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def _update(ants, it_dir: Path, regs: list[dict], n: int, gradient_step: float) -> dict:
    """ants.build_template's template update from the cached registrations of one iteration."""
    t0, c0 = time.perf_counter(), time.process_time()
    w = 1.0 / n
    affines, xavg_new, wavg = [], None, None
    for k, rec in enumerate(regs):
        d = it_dir / f"img{k:04d}"
        fwd = [str(d / name) for name in rec["fwdtransforms"]]
        affines.append(fwd[-1])
        warped = ants.image_read(str(d / "warped.nii.gz")) * w
        xavg_new = warped if xavg_new is None else xavg_new + warped
        if len(fwd) == 2:
            field = ants.image_read(fwd[0]) * w
            wavg = field if wavg is None else wavg + field
    avg_affine = ants.average_affine_transform_no_rigid(affines)
    aff_fn = str(it_dir / "avgAffine.mat")
    ants.write_transform(avg_affine, aff_fn)
    mean_warp_mm = None
    if wavg is not None:
        mean_warp_mm = float(np.sqrt((wavg.numpy() ** 2).sum(-1)).mean())
        wavg = wavg * (-1.0 * gradient_step)
        wavg_a = ants.apply_transforms(fixed=xavg_new, moving=wavg, imagetype=1, transformlist=aff_fn,
                                       whichtoinvert=[1])
        warp_fn = str(it_dir / "avgWarp.nii.gz")
        ants.image_write(wavg_a, warp_fn)
        xavg = ants.apply_transforms(fixed=xavg_new, moving=xavg_new, transformlist=[warp_fn, aff_fn],
                                     whichtoinvert=[0, 1])
    else:
        xavg = ants.apply_transforms(fixed=xavg_new, moving=xavg_new, transformlist=[aff_fn], whichtoinvert=[1])
    xavg = xavg * BLENDING + ants.iMath(xavg, "Sharpen") * (1.0 - BLENDING)
    rec = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
           "mean_warp_mm": mean_warp_mm}
    ants.image_write(xavg, str(it_dir / "template.nii.gz"))
    (it_dir / "step.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def build(ants, brains: list[Path], init: Path, work: Path, preset: dict, max_registrations: int | None) -> dict:
    """Run (or go on with) the build; returns per-iteration records, or stops after `max_registrations`
    new registrations with what was measured so far."""
    template = ants.image_read(str(init))
    iterations, new = [], 0
    for i in range(1, preset["iterations"] + 1):
        it_dir = work / f"it{i}"
        step = it_dir / "step.json"
        regs = []
        for k, b in enumerate(brains):
            out = it_dir / f"img{k:04d}"
            fresh = not (out / "done.json").is_file()
            if fresh and max_registrations is not None and new >= max_registrations:
                return {"finished": False, "iterations": iterations, "partial": regs}
            regs.append(_register(ants, template, b, out, preset["registration"]))
            new += fresh
            if fresh:
                print(f"iteration {i} subject {k + 1}/{len(brains)}: {regs[-1]['seconds']:.0f} s", file=sys.stderr)
        if step.is_file():
            upd = json.loads(step.read_text())
        else:
            with _stdout_to(str(work / "ants_stdout.log")):  # the affine averaging prints pages of debug text
                upd = _update(ants, it_dir, regs, len(brains), preset["gradient_step"])
        template = ants.image_read(str(it_dir / "template.nii.gz"))
        reg_s = sum(r["seconds"] for r in regs)
        iterations.append({"index": i, "registration_seconds": [r["seconds"] for r in regs],
                           "update_seconds": upd["seconds"], "seconds": reg_s + upd["seconds"],
                           "cpu_seconds": sum(r["cpu_seconds"] for r in regs) + upd["cpu_seconds"],
                           "mean_warp_mm": upd["mean_warp_mm"], "load_end": [r["load_end"] for r in regs]})
    return {"finished": True, "iterations": iterations, "partial": []}


def estimate_seconds(result: dict, n: int, iterations: int) -> float | None:
    """The whole build's time from the registrations measured so far: mean registration time x n x
    iterations, plus the measured (or, if none, the mean of the measured) template updates."""
    times = [s for it in result["iterations"] for s in it["registration_seconds"]]
    times += [r["seconds"] for r in result["partial"]]
    if not times:
        return None
    updates = [it["update_seconds"] for it in result["iterations"]] or [0.0]
    return float(np.mean(times) * n * iterations + np.mean(updates) * iterations)


# ------------------------------------------------------------------------------------------ labels
def carry_labels(ants, work: Path, iteration: int, indices: list[Path], out: Path) -> dict:
    """The subjects' label maps in the template of `iteration` through ANTs' own transforms: 4D
    probabilities (one-hot, linear, averaged; index order, channels last) and the majority vote as
    FreeSurfer ids. Also checks the composition: the subjects' brains carried the same way correlate
    with the template better than through their registrations alone."""
    from atlasmorph_cli.io.volumes import save_volume
    from atlasmorph_cli.labels import N_CLASSES, to_freesurfer

    probs_path, labels_path = out / "template_probs.nii.gz", out / "template_labels.nii.gz"
    rec_path = out / "labels.json"
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    it_dir = work / f"it{iteration}"
    tmpl = ants.image_read(str(it_dir / "template.nii.gz"))
    update = [str(it_dir / "avgWarp.nii.gz"), str(it_dir / "avgAffine.mat")]
    probs = np.zeros((*tmpl.shape, N_CLASSES), dtype=np.float64)
    votes = np.zeros((N_CLASSES, *tmpl.shape), dtype=np.uint16)
    corr_full, corr_reg = [], []
    t = tmpl.numpy().ravel()
    for k, idx_path in enumerate(indices):
        d = it_dir / f"img{k:04d}"
        rec = json.loads((d / "done.json").read_text())
        subject = [str(d / name) for name in rec["fwdtransforms"]]
        chain, invert = update + subject, [False, True] + [False] * len(subject)
        index = ants.image_read(str(idx_path))
        idx = index.numpy()
        for c in range(N_CLASSES):
            onehot = index.new_image_like((idx == c).astype(np.float32))
            probs[..., c] += ants.apply_transforms(tmpl, onehot, chain, whichtoinvert=invert).numpy()
        vote = ants.apply_transforms(tmpl, index, chain, whichtoinvert=invert, interpolator="genericLabel").numpy()
        vote = np.rint(vote).astype(np.int64)
        for c in range(N_CLASSES):
            votes[c] += vote == c
        brain = ants.image_read(str(work / "inputs" / idx_path.name.replace("_index", "_brain")))
        corr_full.append(float(np.corrcoef(t, ants.apply_transforms(tmpl, brain, chain, whichtoinvert=invert)
                                           .numpy().ravel())[0, 1]))
        corr_reg.append(float(np.corrcoef(t, ants.apply_transforms(tmpl, brain, subject).numpy().ravel())[0, 1]))
    probs[..., 0] += np.clip(len(indices) - probs.sum(-1), 0, None)  # outside a subject's grid: background
    probs /= probs.sum(-1, keepdims=True)
    affine = _ras_affine(tmpl)
    save_volume(probs.astype(np.float32), affine, probs_path)
    save_volume(to_freesurfer(votes.argmax(0)).astype(np.int32), affine, labels_path, dtype=np.int32)
    rec = {"seconds": time.perf_counter() - t0, "iteration": iteration, "probs": str(probs_path),
           "labels": str(labels_path), "template": str(it_dir / "template.nii.gz"),
           "correlation_through_update": corr_full, "correlation_registration_only": corr_reg}
    rec_path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def _ras_affine(img) -> np.ndarray:
    """The voxel-to-RAS affine of an ANTs image (ANTs keeps LPS origin and direction)."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(img.direction) * np.asarray(img.spacing)[None, :]
    a[:3, 3] = img.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


def check_against_ants(ants, brains: list[Path], init: Path, work: Path, preset: dict) -> float:
    """Correlation between this loop's template and ants.build_template's on the same inputs."""
    images = [ants.image_read(str(b)) for b in brains]
    ref = ants.build_template(initial_template=ants.image_read(str(init)), image_list=images,
                              iterations=preset["iterations"], gradient_step=preset["gradient_step"],
                              **preset["registration"])
    ours = ants.image_read(str(work / f"it{preset['iterations']}" / "template.nii.gz"))
    return float(np.corrcoef(ref.numpy().ravel(), ours.numpy().ravel())[0, 1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_data_option(ap)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    ap.add_argument("--n-train", type=int, default=10, help="training subjects (first of the shipped split, by id)")
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's number of iterations")
    ap.add_argument("--label-iterations", default="last",
                    help="iterations whose template gets labels: 'last' or a comma list (e.g. 2,3)")
    ap.add_argument("--max-registrations", type=int, default=None,
                    help="stop after this many new registrations (a measured subset; rerun to go on)")
    ap.add_argument("--threads", type=int, default=1, help="ITK threads")
    ap.add_argument("--check-against-ants", action="store_true",
                    help="also run ants.build_template itself and report the correlation (tiny inputs only)")
    ap.add_argument("--work", type=Path, required=True, help="cache folder (resumable)")
    args = ap.parse_args(argv)
    ants = _ants(args.threads)
    preset = dict(PRESETS[args.preset])
    if args.iterations is not None:
        preset["iterations"] = args.iterations
    data = common.data_folder(args.data)
    split = json.loads(common.SHIPPED_SPLIT.read_text())
    rows = common.pick_subjects(common.ixi_rows(data), split["train"], args.n_train)
    args.work.mkdir(parents=True, exist_ok=True)
    _same_subjects(args.work, [r["subject"] for r in rows], preset)
    brains, indices, init = prepare_inputs(rows, data, args.work)

    t0 = time.perf_counter()
    result = build(ants, brains, init, args.work, preset, args.max_registrations)
    est = estimate_seconds(result, len(rows), preset["iterations"])
    summary = {"preset": args.preset, "settings": preset, "subjects": [r["subject"] for r in rows],
               "threads": args.threads, "finished": result["finished"], "iterations": result["iterations"],
               "registrations_measured": sum(len(it["registration_seconds"]) for it in result["iterations"])
               + len(result["partial"]),
               "estimated_total_seconds": est, "this_run_wall_seconds": time.perf_counter() - t0,
               "machine": common.describe_machine(), "versions": common.versions("antspyx", "numpy"),
               "command": common.command_line("build_ants.py", argv)}
    if result["finished"]:
        summary["build_seconds"] = sum(it["seconds"] for it in result["iterations"])
        summary["build_cpu_seconds"] = sum(it["cpu_seconds"] for it in result["iterations"])
        summary["build_seconds_per_iteration_count"] = list(np.cumsum([it["seconds"] for it in result["iterations"]]))
        wanted = ([preset["iterations"]] if args.label_iterations == "last"
                  else [int(x) for x in args.label_iterations.split(",")])
        summary["labels"] = {str(i): carry_labels(ants, args.work, i, indices, args.work / f"labels-it{i}")
                             for i in wanted}
        if args.check_against_ants:
            summary["correlation_with_ants_build_template"] = check_against_ants(ants, brains, init, args.work, preset)
    common.write_json(args.work / "build_ants.json", summary)
    done = "finished" if result["finished"] else f"stopped after {args.max_registrations} new registrations"
    print(f"{args.preset}: {done}; {summary['registrations_measured']} registrations measured; estimated whole "
          f"build {est and est / 60:.1f} min" + (f"; build {summary['build_seconds']:.0f} s" if result["finished"] else ""))


if __name__ == "__main__":
    main()
