"""Resource limits checked before any work: image sizes from the header, model settings that would never end.

* An input image may hold at most `MAX_VOXELS` voxels (2^25 = 33.5 M: a head at 0.6 mm isotropic,
  e.g. 322 x 322 x 323, or 0.7 mm HCP scans, 260 x 311 x 260). The count comes from the header,
  before any voxel is read, so a 2 MB gzip bomb that unpacks to 1300^3 voxels, or a header that
  claims 10^53 voxels, is refused in milliseconds. Every command stays within 3 GB up to the limit
  (measured by benchmarks/memory_limits.py, figures in docs/reliability.md); for a larger image,
  resample it first (e.g. ``mri_convert -vs 0.8 0.8 0.8``; the model works at 2 mm anyway).
* A model's configuration is checked before the model is built: scaling-and-squaring steps
  (`int_steps`, 7 in shipped models) at most `MAX_INT_STEPS`, a model grid of at most
  `MAX_MODEL_VOXELS`, network widths at most `MAX_WIDTH`.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import AtlasMorphError

MAX_VOXELS = 1 << 25
MAX_INT_STEPS = 16
MAX_MODEL_VOXELS = 256 ** 3
MAX_WIDTH = 1024


def check_image_shape(shape, where: str | Path) -> None:
    """Refuse a header whose dimensions are not positive or whose voxel count exceeds MAX_VOXELS."""
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError, OverflowError):
        raise AtlasMorphError(f"{where}: the header's image dimensions are not numbers ({shape})") from None
    if not dims or any(d <= 0 for d in dims):
        raise AtlasMorphError(f"{where}: the header gives impossible image dimensions {tuple(dims)}")
    n = math.prod(dims)
    if n > MAX_VOXELS:
        shown = "x".join(str(d) for d in dims)
        raise AtlasMorphError(
            f"{where}: the header claims {shown} = {n:.3g} voxels; atlasmorph reads at most {MAX_VOXELS:,} "
            "(e.g. 322x322x323); resample the image first (e.g. mri_convert -vs 0.8 0.8 0.8)"
        )


def check_model_config(config, where: str | Path) -> None:
    """Refuse model settings that would take for ever or exhaust memory before building the model."""
    steps = config.int_steps
    if not isinstance(steps, int) or not 0 <= steps <= MAX_INT_STEPS:
        raise AtlasMorphError(f"{where}: the model's int_steps is {steps} (expected an integer 0-{MAX_INT_STEPS}, "
                              "7 in shipped models); the file is damaged or was edited")
    shape = config.grid.get("shape", []) if isinstance(config.grid, dict) else []
    try:
        n = math.prod(int(d) for d in shape)
    except (TypeError, ValueError):
        n = -1
    if len(shape) != 3 or not 0 < n <= MAX_MODEL_VOXELS:
        raise AtlasMorphError(f"{where}: the model grid {shape} is not a 3-D grid of at most {MAX_MODEL_VOXELS:,} voxels")
    widths = [config.template_width, *config.reg_enc, *config.reg_dec]
    if not all(isinstance(w, int) and 0 <= w <= MAX_WIDTH for w in widths):
        raise AtlasMorphError(f"{where}: the model's network widths {widths} are out of range (0-{MAX_WIDTH})")
