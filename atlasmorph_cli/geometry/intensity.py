"""Intensity normalisation of T1 images."""
from __future__ import annotations

import numpy as np

from ..errors import AtlasMorphError


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
