"""Affine registration to the MNI152 brain: AtlasMorph's fit_affine against ANTs `Affine`.

For the first N IXI subjects with an age (sorted by subject id): skull-strip the T1 with its own
DLMUSE mask (seg > 0), normalise, register to the MNI152 brain on the model grid, carry the subject's
labels (34 structures) into model space and score Dice against the MNI152 DLMUSE labels there.

    python benchmarks/affine_benchmark.py --n 20 --out docs

writes <out>/benchmarks/affine.json and <out>/affine.md. ANTs (antspyx, the `bench` extra) is
optional: without it only AtlasMorph is reported. Both methods get 2 threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(THREADS))
# OpenMP worker threads that spin while idle make torch 10-20x slower whenever another process
# keeps a core busy (measured on a shared 2-core machine); sleeping workers cost next to nothing.
# Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from atlasmorph_cli import labels  # noqa: E402
from atlasmorph_cli.training import metrics  # noqa: E402
from atlasmorph_cli.geometry.affine import LEVELS, fit_affine  # noqa: E402
from atlasmorph_cli.geometry.intensity import normalize  # noqa: E402
from atlasmorph_cli.io.volumes import load_volume, save_volume  # noqa: E402
from atlasmorph_cli.training.reference import mni_reference  # noqa: E402
from atlasmorph_cli.geometry.space import MODEL_GRID, resample_labels  # noqa: E402


class Ants:
    """ANTs `Affine` through antspyx, on images written to a scratch folder (so affines go through ITK)."""

    def __init__(self, ref: np.ndarray, scratch: Path):
        import ants  # the optional `bench` dependency

        self.ants = ants
        self.scratch = scratch
        self.version = getattr(ants, "__version__", "?")
        self.fixed = self._image(ref, MODEL_GRID.affine, "fixed.nii.gz")

    def _image(self, data: np.ndarray, affine: np.ndarray, name: str):
        path = self.scratch / name
        save_volume(np.asarray(data, dtype=np.float32), affine, path)
        return self.ants.image_read(str(path))

    def run(self, brain: np.ndarray, index: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float, float]:
        moving = self._image(brain, affine, "moving.nii.gz")
        lab = self._image(index, affine, "labels.nii.gz")
        t0, c0 = time.perf_counter(), time.process_time()
        reg = self.ants.registration(
            fixed=self.fixed, moving=moving, type_of_transform="Affine", random_seed=1,
            outprefix=str(self.scratch / "ants_"),
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = self.ants.apply_transforms(
            fixed=self.fixed, moving=lab, transformlist=reg["fwdtransforms"], interpolator="genericLabel"
        )
        return np.rint(out.numpy()).astype(np.uint8), wall, cpu


def summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="number of IXI subjects (default 20)")
    ap.add_argument("--out", type=Path, default=Path("docs"), help="output folder (default docs)")
    common.add_data_option(ap)
    ap.add_argument("--no-ants", action="store_true", help="skip ANTs")
    args = ap.parse_args(argv)

    torch.set_num_threads(THREADS)
    data_dir = common.data_folder(args.data)
    ref, ref_labels = mni_reference(data_dir)
    rows = common.with_attributes(common.ixi_rows(data_dir), args.n)  # the first N by id

    scratch_ctx = tempfile.TemporaryDirectory(prefix="atlasmorph-affine-bench-")
    scratch = Path(scratch_ctx.name)
    ants_runner, ants_note = None, None
    if not args.no_ants:
        try:
            ants_runner = Ants(ref, scratch)
        except ImportError as exc:
            ants_note = f"antspyx not available ({exc}); ANTs not run"
            print(ants_note, file=sys.stderr)

    names = [s.name for s in labels.STRUCTURES]
    per_subject = []
    header = f"{'subject':<16} {'ours Dice':>9} {'s':>6} {'cpu s':>6}"
    if ants_runner:
        header += f" {'ANTs Dice':>9} {'s':>6} {'cpu s':>6}"
    print(header, flush=True)
    for r in rows:
        t1 = load_volume(r["t1"])
        seg = load_volume(r["seg"])
        mask = seg.data > 0
        brain = normalize(t1.data, mask)
        index = labels.to_index(seg.data, "muse")

        t0, c0 = time.perf_counter(), time.process_time()
        T = fit_affine(brain, t1.affine, ref, MODEL_GRID, threads=THREADS)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        moved = resample_labels(index, seg.affine, MODEL_GRID, world=T)
        d = metrics.dice_per_structure(moved, ref_labels)
        rec = {
            "subject": r["subject"],
            "ours": {"dice": float(np.nanmean(d)), "seconds": wall, "cpu_seconds": cpu,
                     "dice_per_structure": dict(zip(names, map(float, d))), "T": T.tolist()},
        }
        line = f"{r['subject']:<16} {rec['ours']['dice']:9.4f} {wall:6.2f} {cpu:6.2f}"
        if ants_runner:
            moved_a, wall_a, cpu_a = ants_runner.run(brain, index, t1.affine)
            da = metrics.dice_per_structure(moved_a, ref_labels)
            rec["ants"] = {"dice": float(np.nanmean(da)), "seconds": wall_a, "cpu_seconds": cpu_a,
                           "dice_per_structure": dict(zip(names, map(float, da)))}
            line += f" {rec['ants']['dice']:9.4f} {wall_a:6.2f} {cpu_a:6.2f}"
        print(line, flush=True)
        per_subject.append(rec)
    scratch_ctx.cleanup()

    methods = ["ours"] + (["ants"] if ants_runner else [])
    result = {
        "command": common.command_line("affine_benchmark.py", argv),
        "machine": common.describe_machine(with_torch=True),
        "threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_end": list(os.getloadavg()),
        "levels": [dataclasses.asdict(lv) for lv in LEVELS],
        "n_subjects": len(rows),
        "structures": names,
        "summary": {
            m: {
                "dice": summary([s[m]["dice"] for s in per_subject]),
                "seconds": summary([s[m]["seconds"] for s in per_subject]),
                "cpu_seconds": summary([s[m]["cpu_seconds"] for s in per_subject]),
                "dice_per_structure": {
                    n: float(np.nanmean([s[m]["dice_per_structure"][n] for s in per_subject])) for n in names
                },
            }
            for m in methods
        },
        "ants_version": ants_runner.version if ants_runner else None,
        "note": ants_note,
        "subjects": per_subject,
    }
    print()
    for m in methods:
        s = result["summary"][m]
        print(f"{m:<5} Dice {s['dice']['mean']:.4f} ± {s['dice']['std']:.4f}   "
              f"{s['seconds']['mean']:.2f} ± {s['seconds']['std']:.2f} s/subject (cpu {s['cpu_seconds']['mean']:.2f} s)")
    out_json = common.write_json(args.out / "benchmarks" / "affine.json", result)
    (args.out / "affine.md").write_text(markdown(result))
    print(f"wrote {out_json} and {args.out / 'affine.md'}")
    return 0


def markdown(res: dict) -> str:
    s = res["summary"]
    has_ants = "ants" in s
    lines = [
        "# Affine registration to MNI152",
        "",
        "`atlasmorph_cli.geometry.affine.fit_affine` registers a brain-extracted T1 to the MNI152 brain on the model grid",
        "(80 x 96 x 80, 2 mm) with a 12-parameter affine, implemented in PyTorch:",
        "",
        "- **Initialisation**: brain centres of mass matched; isotropic scale from the brain volumes; rotation",
        "  candidates = identity + the 4 proper rotations mapping the reference's principal axes onto the",
        "  subject's (eigenvector sign ambiguity). All candidates are optimised briefly, in one batch, at the",
        "  coarsest level and the best is kept.",
        "- **Similarity**: Mattes mutual information (B-spline Parzen windows, 32 bins) over a fixed pseudo-random",
        "  point set of the model grid at the coarse levels, then local normalised cross-correlation over the dense",
        "  grid at the fine levels, on intensity-normalised (1st-99th percentile), Gaussian-smoothed brains.",
        "- **Multi-resolution**: " + ", ".join(f"{lv.get('metric', '').upper()} {lv['spacing_mm']:g} mm (sigma {lv['sigma_mm']:g} mm, {lv['iterations']} it)" for lv in res.get("levels", [])) + ".",
        "- **Parametrisation**: x -> c_m + t + A0 (I + L / 50 mm)(x - c_f): translation in mm and a 3x3 matrix",
        "  around the centre of mass scaled so every parameter is a displacement in mm at the brain surface;",
        "  Adam, deterministic. Output: 4x4 world matrix mapping model (MNI) world points to subject world points.",
        "",
        "## Benchmark",
        "",
        f"{res['n_subjects']} IXI subjects (first with age, sorted by id), each skull-stripped with its own DLMUSE",
        "mask (seg > 0) and normalised; the subject's labels (34 structures) are carried into model space with the",
        "fitted transform and compared with the MNI152 DLMUSE labels there (Dice, mean over the 34 structures).",
        "Ours: partial-volume label resampling. ANTs: `ants.registration(fixed, moving, type_of_transform='Affine')`",
        "(fixed = MNI brain on the model grid, moving = subject brain), labels with `genericLabel`.",
        f"Both with {res['threads']} threads (torch.set_num_threads, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS).",
        "Seconds are wall-clock time of the registration call alone (cpu = process CPU time).",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']}" + (f"; ANTsPy {res['ants_version']}" if res.get("ants_version") else ""),
        "",
        "| method | Dice (mean ± std) | s/subject (mean ± std) | CPU s/subject |",
        "|---|---|---|---|",
    ]
    label = {"ours": "AtlasMorph fit_affine", "ants": "ANTs Affine"}
    for m, v in s.items():
        lines.append(
            f"| {label[m]} | {v['dice']['mean']:.4f} ± {v['dice']['std']:.4f} | "
            f"{v['seconds']['mean']:.2f} ± {v['seconds']['std']:.2f} | {v['cpu_seconds']['mean']:.2f} |"
        )
    if res.get("note"):
        lines += ["", res["note"]]
    lines += ["", "### Per subject", ""]
    if has_ants:
        lines += ["| subject | ours Dice | ours s | ANTs Dice | ANTs s |", "|---|---|---|---|---|"]
        for r in res["subjects"]:
            lines.append(f"| {r['subject']} | {r['ours']['dice']:.4f} | {r['ours']['seconds']:.2f} | "
                         f"{r['ants']['dice']:.4f} | {r['ants']['seconds']:.2f} |")
    else:
        lines += ["| subject | ours Dice | ours s |", "|---|---|---|"]
        for r in res["subjects"]:
            lines.append(f"| {r['subject']} | {r['ours']['dice']:.4f} | {r['ours']['seconds']:.2f} |")
    lines += ["", "### Per structure (mean Dice)", ""]
    if has_ants:
        lines += ["| structure | ours | ANTs |", "|---|---|---|"]
        for n in res["structures"]:
            lines.append(f"| {n} | {s['ours']['dice_per_structure'][n]:.3f} | {s['ants']['dice_per_structure'][n]:.3f} |")
    else:
        lines += ["| structure | ours |", "|---|---|"]
        for n in res["structures"]:
            lines.append(f"| {n} | {s['ours']['dice_per_structure'][n]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
