"""Intensity normalisation of T1 images inside the brain, and the checked brain mask it works in."""
from __future__ import annotations

import numpy as np

from ..errors import AtlasMorphError
from ..io.volumes import Volume, grid_difference, same_grid

MIN_BRAIN_VOXELS = 1000


def brain_mask(image: Volume, mask: Volume | None, where: str | None = None, *, image_name: str = "image",
               mask_name: str = "mask") -> np.ndarray:
    """The brain voxels of `image`: `mask` > 0, else the image's non-zero voxels (a brain-extracted image).

    Refused, in one message starting with `where`, when the mask is on another grid, the image is all
    zeros, the brain has fewer than MIN_BRAIN_VOXELS voxels or the image is constant inside it; the
    names say what the caller calls the two images (`register`: image and mask; training: T1 and seg).
    """
    name = f"{where}: " if where else ""
    if mask is not None and not same_grid(mask, image):
        raise AtlasMorphError(
            f"{name}the {mask_name} is on another grid than the {image_name} "
            f"({grid_difference(mask.shape, mask.affine, image.shape, image.affine)}); "
            f"resample it to the {image_name} first"
        )
    if not np.any(image.data):
        raise AtlasMorphError(f"{name}the {image_name} is all zeros")
    m = mask.data > 0 if mask is not None else image.data != 0
    if m.sum() < MIN_BRAIN_VOXELS:
        raise AtlasMorphError(f"{name}the {image_name} (or its {mask_name}) has no brain: fewer than "
                              f"{MIN_BRAIN_VOXELS} non-zero voxels")
    vals = image.data[m]
    if float(vals.max() - vals.min()) <= 0:
        raise AtlasMorphError(f"{name}the {image_name} is constant inside the brain")
    return m


def normalize(data: np.ndarray, mask: np.ndarray | None, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    """Map the [lo, hi] percentiles of the intensities inside `mask` to [0, 1], clip, zero outside.

    `mask` is any array broadcastable to `data` whose non-zero voxels are the region of interest
    (None: the whole volume). Returns float32. When the percentiles coincide (a constant region),
    every voxel inside the mask is set to 1.
    """
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"need 0 <= lo < hi <= 100, got lo={lo}, hi={hi}")
    arr = np.asarray(data, dtype=np.float32)
    inside = np.ones(arr.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask) != 0, arr.shape)
    values = arr[inside & np.isfinite(arr)]
    if values.size == 0:
        raise AtlasMorphError("cannot normalise intensities: the brain mask is empty")
    p_lo, p_hi = np.percentile(values, [lo, hi])
    if p_hi <= p_lo:
        out = np.ones(arr.shape, dtype=np.float32)
    else:
        out = (arr - np.float32(p_lo)) / np.float32(p_hi - p_lo)
        np.clip(out, 0.0, 1.0, out=out)
        out = np.nan_to_num(out, nan=0.0)
    out[~inside] = 0.0
    return out.astype(np.float32, copy=False)
