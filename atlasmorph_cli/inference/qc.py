"""QC pictures a researcher looks at before trusting the numbers (`--qc qc.png`; batch: one per subject + index).

Each picture shows the subject's T1 in three planes (rows: sagittal, coronal, axial; five slices each,
spread over the brain) on its own voxel grid, put in the closest RAS voxel order for display
(neurological view: the subject's left on the left of the picture; every row is labelled with its
sides), with the outline of each of the 34 structures in its FreeSurfer colour and the brain-mask
contour in blue; each panel is cropped to the brain mask with a margin. The title holds the subject, its attributes, the quality score and, when flagged,
the reasons, in red (the style of fMRIPrep's and FreeSurfer's QC snapshots). In batch mode `qc_index.html` lists every subject's picture, flagged ones first.
"""
from __future__ import annotations

import html
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io.volumes import Volume, atomic_path
from ..labels import STRUCTURES

N_SLICES = 5
MASK_COLOUR = "#1E90FF"  # the brain-mask contour (no structure of the FreeSurfer LUT is this blue)


def _canonical(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`vol` in the closest RAS voxel order and the voxel sizes along those axes."""
    ornt = nib.io_orientation(affine)
    out = nib.orientations.apply_orientation(vol, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))[ornt[:, 0].astype(int)]
    return np.ascontiguousarray(out), zooms


def _lut() -> np.ndarray:
    lut = np.zeros((max(s.fs_id for s in STRUCTURES) + 1, 3))
    for s in STRUCTURES:
        lut[s.fs_id] = np.asarray(s.rgb) / 255.0
    return lut


def _outline(labels: np.ndarray) -> np.ndarray:
    """Voxels of a 2D label map whose 4-neighbourhood holds another label (the structures' outlines)."""
    edge = np.zeros(labels.shape, bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def _crop_box(mask: np.ndarray, margin: float = 0.15) -> tuple[slice, slice, slice]:
    """The mask's bounding box grown by `margin` of its size on every side (the whole volume if empty)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)  # type: ignore[return-value]
    box = []
    for axis, n in enumerate(mask.shape):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        pad = int(np.ceil(margin * (idx.max() - idx.min() + 1))) + 2
        box.append(slice(max(0, idx.min() - pad), min(n, idx.max() + 1 + pad)))
    return tuple(box)  # type: ignore[return-value]


def _slices(mask: np.ndarray, axis: int) -> list[int]:
    """N_SLICES positions along `axis` spread over the brain mask's extent (the middle 70 %)."""
    idx = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
    if idx.size == 0:
        idx = np.arange(mask.shape[axis])
    lo, hi = idx.min(), idx.max()
    return [int(round(lo + f * (hi - lo))) for f in np.linspace(0.15, 0.85, N_SLICES)]


def qc_figure(subject: Volume, mask: np.ndarray, labels: np.ndarray | None, quality, path: Path,
              attributes: str = "") -> Path:
    """Write the QC picture of one subject: T1, structure outlines (FreeSurfer ids), brain-mask contour, title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t1, zooms = _canonical(subject.data, subject.affine)
    m, _ = _canonical(mask.astype(np.uint8), subject.affine)
    lab = _canonical(labels.astype(np.int32), subject.affine)[0] if labels is not None else None
    box = _crop_box(m > 0)
    t1, m = t1[box], m[box]
    lab = lab[box] if lab is not None else None
    inside = t1[m > 0] if np.any(m) else t1.ravel()
    lo, hi = np.percentile(inside, [1, 99.5]) if inside.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1
    lut = _lut()
    planes = [("sagittal", 0, ("P", "A")), ("coronal", 1, ("L", "R")), ("axial", 2, ("L", "R"))]
    fig, axes = plt.subplots(3, N_SLICES, figsize=(2.4 * N_SLICES, 8.2), facecolor="black")
    for row, (name, axis, sides) in enumerate(planes):
        for col, k in enumerate(_slices(m > 0, axis)):
            ax = axes[row, col]
            take = lambda v: np.take(v, k, axis=axis).T  # noqa: E731 - rows: the later of the two other axes
            rest = [a for a in range(3) if a != axis]
            aspect = zooms[rest[1]] / zooms[rest[0]]
            ax.imshow(take(t1), cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if lab is not None:
                ll = take(lab)
                edge = _outline(ll)
                rgba = np.zeros((*ll.shape, 4))
                rgba[edge, :3] = lut[np.clip(ll[edge], 0, len(lut) - 1)]
                rgba[edge, 3] = 0.9
                ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
            mm = take(m)
            if mm.any() and not mm.all():
                ax.contour(mm, levels=[0.5], colors=MASK_COLOUR, linewidths=1.0)
            ax.set_axis_off()
            if col == 0:
                ax.text(0.02, 0.5, sides[0], color="yellow", transform=ax.transAxes, fontsize=8, va="center")
                ax.text(0.98, 0.5, sides[1], color="yellow", transform=ax.transAxes, fontsize=8, va="center",
                        ha="right")
                ax.set_title(name, color="white", fontsize=9, loc="left")
    flagged = bool(getattr(quality, "flagged", False))
    score = getattr(quality, "score", float("nan"))
    head = f"{getattr(quality, 'subject', '') or ''}  {attributes}".strip()
    status = (f"quality score {score:.2f}: " + ("FLAGGED" if flagged else "ok")) if quality is not None else ""
    lines = [head, status + "   (outlines: structures, FreeSurfer colours; blue: brain mask)"]
    if flagged:
        lines += textwrap.wrap("; ".join(quality.reasons), 140)
    fig.suptitle("\n".join(x for x in lines if x), color="red" if flagged else "white", fontsize=10,
                 x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93 - 0.02 * max(0, len(lines) - 2)))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", facecolor="black")
    plt.close(fig)
    return path


def qc_index(path: Path, entries: list[tuple[str, str, object]]) -> Path:
    """An HTML page listing (subject, picture file name relative to the page, quality), flagged first."""
    def key(e):
        q = e[2]
        return (not getattr(q, "flagged", False), getattr(q, "score", 0.0) if q is not None else 0.0)

    rows = []
    for sid, png, q in sorted(entries, key=key):
        flagged = bool(getattr(q, "flagged", False))
        reasons = "; ".join(getattr(q, "reasons", []) or [])
        score = getattr(q, "score", float("nan"))
        rows.append(f'<h3 style="color:{"red" if flagged else "black"}">{html.escape(sid)}: score {score:.2f}'
                    f'{" FLAGGED: " + html.escape(reasons) if flagged else ""}</h3>\n'
                    f'<a href="{html.escape(png)}"><img src="{html.escape(png)}" width="900"></a>')
    n_flag = sum(bool(getattr(q, "flagged", False)) for _, _, q in entries)
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>AtlasMorph QC</title></head><body>\n"
            f"<h1>AtlasMorph QC: {len(entries)} subjects, {n_flag} flagged</h1>\n" + "\n".join(rows) + "\n</body></html>\n")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(page)
    return path
