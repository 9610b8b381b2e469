"""The subject's acquisition blur carried onto the model grid, so the refinement compares like with like.

A scan with thick slices (e.g. 1 x 1 x 5 mm) stored on its own grid is, once resampled onto the 2 mm model
grid, blurred along the slice axis; a sharp template warped to it scores a lower local NCC wherever edges run
across the slices, and the refinement pulls the warp toward the blur. Blurring the warped template the same
way before the comparison restores the match (docs/ood.md, thick slices). The widths come from the header:
a scan resampled onto a finer grid before it reaches the tool is not detected.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_WIDTH = 2  # a subject voxel spanning fewer than 1.5 model voxels is not blurred (round(1.5) = 2)


def slice_blur_widths(subject_affine: np.ndarray, world: np.ndarray, grid_affine: np.ndarray) -> tuple[int, int, int]:
    """Box width (model voxels) per model-grid axis of the subject's voxels, 1 where it is not coarser.

    Each subject voxel axis is carried into model-grid voxels (subject world -> model world by the inverse of
    `world`, the model-grid-world -> subject-world affine; then into grid voxels); its length rounded is the
    number of model voxels one subject voxel spans, assigned to the model axis it runs closest to.
    """
    to_grid = np.linalg.inv(np.asarray(grid_affine, float)[:3, :3]) @ np.linalg.inv(np.asarray(world, float)[:3, :3])
    widths = [1, 1, 1]
    for k in range(3):
        step = to_grid @ np.asarray(subject_affine, float)[:3, k]
        n = int(np.floor(np.linalg.norm(step) + 0.5))
        axis = int(np.argmax(np.abs(step)))
        if n >= MIN_WIDTH:
            widths[axis] = max(widths[axis], n)
    return tuple(widths)


def blur_kernel(width: int) -> torch.Tensor:
    """A box of `width` voxels (the slice's average) convolved with itself (the linear interpolation between
    slice centres that brings it onto the grid): [1, 2, 1] / 4 for 2, [1, 2, 3, 2, 1] / 9 for 3."""
    box = torch.full((1, 1, width), 1.0 / width, dtype=torch.float64)
    return F.conv1d(F.pad(box, (width - 1, width - 1)), box.flip(-1))[0, 0].float()


def acquisition_blur(x: torch.Tensor, widths: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, X, Y, Z) blurred along each axis whose width is > 1 (edges replicated; differentiable)."""
    for axis, width in enumerate(widths):
        if width <= 1:
            continue
        kernel = blur_kernel(width).to(x)
        half = len(kernel) // 2
        shape = [1, 1, 1]
        shape[axis] = len(kernel)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = half
        b, c = x.shape[:2]
        y = F.conv3d(F.pad(x.reshape(b * c, 1, *x.shape[2:]), pad, mode="replicate"), kernel.view(1, 1, *shape))
        x = y.reshape(b, c, *x.shape[2:])
    return x
