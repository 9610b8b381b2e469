"""A montage of built templates side by side (issue 21): AtlasMorph's build, ANTs' builds and the conditional template.

    python benchmarks/build_montage.py --work runs/build --arms cond-group-10,ours-10-it3,ants-fast-10-it3 \
        --out docs/benchmarks/build_montage.png

One row per template (the arm names of build_compare.py), three planes through MNI points chosen to cut
the ventricles, hippocampi and basal ganglia, each template shown on the model grid after the same
intensity normalisation, with the outlines of its label map; the title
gives the sharpness (mean gradient in the brain, per mm) that build_compare.py reports.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import common
from build_compare import VOXEL_MM, Context, found_arms, resolve

CUT_MM = (-22.0, -18.0, 8.0)  # MNI x (sagittal), y (coronal), z (axial) of the three planes


def planes(volume: np.ndarray, affine: np.ndarray) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices (display orientation: rows top to bottom) through CUT_MM."""
    ijk = np.rint(np.linalg.inv(affine) @ np.array([*CUT_MM, 1.0]))[:3].astype(int)
    i, j, k = (int(np.clip(c, 0, n - 1)) for c, n in zip(ijk, volume.shape))
    return [np.flipud(volume[i].T), np.flipud(volume[:, j].T), np.flipud(volume[:, :, k].T)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_data_option(ap)
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "build")
    ap.add_argument("--arms", default=None, help="comma list (default: every built arm and the group's conditional)")
    ap.add_argument("--out", type=Path, default=common.ROOT / "docs" / "benchmarks" / "build_montage.png")
    args = ap.parse_args(argv)
    from atlasmorph_cli.geometry.intensity import normalize
    from atlasmorph_cli.inference.build import sharpness

    names = args.arms.split(",") if args.arms else [n for n in found_arms(args.work) if n != "cond-subject"]
    arms = [resolve(n, args.work) for n in names]
    ctx = Context(common.data_folder(args.data), 1, 0)
    plt = common.pyplot()
    fig, axes = plt.subplots(len(arms), 3, figsize=(9, 3.1 * len(arms)), squeeze=False)
    for row, arm in zip(axes, arms):
        t = ctx.template(arm)
        brain = t.probs[0] < 0.5
        t1 = normalize(t.t1, brain) * brain
        labels = t.probs.argmax(0)
        for ax, img, lab, plane in zip(row, planes(t1, t.grid.affine), planes(labels, t.grid.affine),
                                       ("sagittal", "coronal", "axial")):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            edges = (np.diff(lab, axis=0, prepend=lab[:1]) != 0) | (np.diff(lab, axis=1, prepend=lab[:, :1]) != 0)
            ax.imshow(np.ma.masked_where(~edges, edges), cmap="autumn", alpha=0.35, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if plane == "sagittal":
                ax.set_ylabel(arm.name, fontsize=10)
        row[1].set_title(f"{arm.name}: sharpness {sharpness(t1, brain, VOXEL_MM):.4f} /mm", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.save_figure(fig, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
