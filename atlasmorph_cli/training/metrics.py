"""Overlap and regularity figures reported by training, benchmarks and the model card."""
from __future__ import annotations

import numpy as np

from ..labels import N_CLASSES


def dice_per_structure(a: np.ndarray, b: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Dice of every structure (class indices 1..n_classes-1) between two index maps; NaN if absent in both."""
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    both = np.bincount(a[a == b], minlength=n_classes)[:n_classes]
    na = np.bincount(a, minlength=n_classes)[:n_classes]
    nb = np.bincount(b, minlength=n_classes)[:n_classes]
    denom = (na + nb).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2.0 * both / denom, np.nan)
    return d[1:]


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the structures present in either map."""
    return float(np.nanmean(dice_per_structure(a, b)))
