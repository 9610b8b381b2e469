"""Deliberately broken inputs made from one real IXI subject, for the quality check's tests and calibration.

Each maker takes the subject's whole-head T1 (data, affine) and its DLMUSE labels and returns a
`Case`: the image to give, an optional mask, and whether `--skullstripped` is passed. The same makers
serve tests/test_quality.py and benchmarks/quality_calibration.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np


@dataclass
class Case:
    name: str
    data: np.ndarray
    affine: np.ndarray
    mask: np.ndarray | None = None
    skullstripped: bool = False

    def write(self, folder: Path) -> tuple[Path, Path | None]:
        folder.mkdir(parents=True, exist_ok=True)
        t1 = folder / f"{self.name}_T1.nii.gz"
        nib.save(nib.Nifti1Image(self.data.astype(np.float32), self.affine), str(t1))
        if self.mask is None:
            return t1, None
        m = folder / f"{self.name}_mask.nii.gz"
        nib.save(nib.Nifti1Image(self.mask.astype(np.float32), self.affine), str(m))
        return t1, m


def _world(m3: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """`affine` followed by a linear map of world space about the image centre."""
    t = np.eye(4)
    t[:3, :3] = m3
    return t @ affine


def wholehead_as_skullstripped(t1, aff, seg) -> Case:
    return Case("wholehead_as_skullstripped", t1, aff, skullstripped=True)


def flipped_header(t1, aff, seg) -> Case:
    """Anterior and posterior swapped in the header (a mirror image; the voxels are untouched)."""
    return Case("flipped_header", t1, _world(np.diag([1.0, -1.0, 1.0]), aff))


def rotated_header(t1, aff, seg) -> Case:
    """The header's axes rotated by 90 degrees about left-right (the head lies on its back)."""
    return Case("rotated_header", t1, _world(np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]), aff))


def inverted_contrast(t1, aff, seg) -> Case:
    """A skull-stripped brain with its contrast inverted (dark white matter, bright CSF), with its mask."""
    brain = seg > 0
    inv = np.where(brain, t1[brain].max() - t1, 0)
    return Case("inverted_contrast", inv, aff, mask=brain)


def noise(t1, aff, seg) -> Case:
    """Not a brain: Gaussian noise on the same grid (no mask: the tool decides)."""
    rng = np.random.default_rng(0)
    return Case("noise", np.abs(rng.normal(100, 30, t1.shape)), aff)


def mask_in_the_air(t1, aff, seg) -> Case:
    """A 12-voxel cube outside the brain as the brain mask: the one of the six places at the middle of a
    face of the field of view whose voxels vary most (IXI's air is mostly exact zeros, which is refused
    as "constant inside the brain" before any registration; in front of the face it is not)."""
    s = t1.shape
    best, mask = -1.0, None
    for axis in range(3):
        for start in (2, s[axis] - 14):
            sl = [slice(n // 2 - 6, n // 2 + 6) for n in s]
            sl[axis] = slice(start, start + 12)
            if np.any(seg[tuple(sl)] > 0):
                continue
            if float(t1[tuple(sl)].std()) > best:
                best, mask = float(t1[tuple(sl)].std()), np.zeros(s, bool)
                mask[tuple(sl)] = True
    return Case("mask_in_the_air", t1, aff, mask=mask)


def mask_with_skull(t1, aff, seg) -> Case:
    """A smoothed mask read as > 0 (what a probabilistic mask used to become): the brain plus ~1 cm around it."""
    from scipy.ndimage import binary_dilation

    return Case("mask_with_skull", t1, aff, mask=binary_dilation(seg > 0, iterations=5))


def smoothed_mask(t1, aff, seg) -> Case:
    """A probabilistic (Gaussian-smoothed) mask: read as >= 0.5, so this one must pass (with a warning)."""
    from scipy.ndimage import gaussian_filter

    return Case("smoothed_mask", t1, aff, mask=gaussian_filter((seg > 0).astype(np.float32), 2.0))


def slab(t1, aff, seg) -> Case:
    """Two slices of the skull-stripped brain (a 2-voxel slab)."""
    brain = np.where(seg > 0, t1, 0)
    k = int(np.argmax((seg > 0).sum((0, 1))))
    off = np.eye(4)
    off[2, 3] = k
    return Case("slab", np.ascontiguousarray(brain[:, :, k:k + 2]), aff @ off)


BROKEN: dict[str, Callable] = {f.__name__: f for f in (
    wholehead_as_skullstripped, flipped_header, rotated_header, inverted_contrast, noise, mask_in_the_air,
    mask_with_skull, slab)}
PASSING: dict[str, Callable] = {"smoothed_mask": smoothed_mask}
