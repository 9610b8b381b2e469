"""Spatial layers: sampling, warping, velocity integration, resizing, Jacobians and local box means.

Conventions: volumes are (B, C, X, Y, Z) with X, Y, Z the voxel axes i, j, k. Displacement and
velocity fields are (B, 3, X, Y, Z) in voxel units of the grid they live on; channel 0 moves along i,
1 along j, 2 along k. All sampling uses `grid_sample(align_corners=True)`, so voxel index c of an axis
of n voxels is the normalised coordinate 2 c / (n - 1) - 1 (voxel centres, exactly).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_MODES = {"bilinear": "bilinear", "linear": "bilinear", "trilinear": "bilinear", "nearest": "nearest"}


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates (3, X, Y, Z) of a grid: the identity map that displacements are added to."""
    axes = [torch.arange(int(n), device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _normalised_grid(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates (B, 3, ...) of a grid of `shape` -> grid_sample's (B, ..., 3) in (k, j, i) order."""
    norm = [coords[:, a] * (2.0 / max(int(n) - 1, 1)) - 1.0 for a, n in enumerate(shape)]
    return torch.stack(norm[::-1], dim=-1)


def sample_at(
    vol: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Sample vol (B, C, X, Y, Z) at voxel coordinates coords (B, 3, X', Y', Z') -> (B, C, X', Y', Z').

    A batch of 1 on either side is broadcast to the other. `mode` is "bilinear" (trilinear in 3-D) or
    "nearest"; `padding_mode` is "border", "zeros" or "reflection" (what lies outside the volume).
    """
    if mode not in _MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}")
    if vol.shape[0] != coords.shape[0]:
        b = max(vol.shape[0], coords.shape[0])
        vol, coords = vol.expand(b, *vol.shape[1:]), coords.expand(b, *coords.shape[1:])
    grid = _normalised_grid(coords.to(vol.dtype), vol.shape[2:])
    b, x_out = grid.shape[0], grid.shape[1]
    slabs = _n_slabs(b, x_out, vol.device)
    if slabs == 1:
        return F.grid_sample(vol, grid, mode=_MODES[mode], padding_mode=padding_mode, align_corners=True)
    # CPU grid_sample for 3-D parallelises over the batch only: cut the output into X' slabs as a batch.
    grid = grid.reshape(b * slabs, x_out // slabs, *grid.shape[2:])
    vol = vol.unsqueeze(1).expand(b, slabs, *vol.shape[1:]).reshape(b * slabs, *vol.shape[1:])
    out = F.grid_sample(vol, grid, mode=_MODES[mode], padding_mode=padding_mode, align_corners=True)
    out = out.view(b, slabs, *out.shape[1:]).transpose(1, 2)
    return out.reshape(b, out.shape[1], x_out, *out.shape[4:])


def _n_slabs(batch: int, x_out: int, device: torch.device) -> int:
    """How many output slabs to sample in parallel: enough to use every CPU thread when the batch is small."""
    if device.type != "cpu" or batch >= torch.get_num_threads():
        return 1
    want = max(1, torch.get_num_threads() // batch)
    return next(k for k in range(want, 0, -1) if x_out % k == 0)


def splat_weights(coords: torch.Tensor, shape: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """The adjoint of trilinear sampling at voxel coordinates coords (3, N), zeros outside: W (X, Y, Z) with
    sum_n sample_at(v, coords)[n] = sum_x v(x) W(x) for every volume v of `shape`.

    W(x) is the total trilinear weight that the N points give voxel x. It turns a sum over many sampled
    points into one weighted sum over the (smaller) grid. Added into `out` when given (a running total).
    """
    x, y, z = (int(n) for n in shape)
    y2, z2 = y + 2, z + 2  # a one-voxel border, so that the corners of any point in [-1, n] are in range
    total = torch.zeros((x + 2) * y2 * z2, dtype=coords.dtype, device=coords.device)
    f = coords.floor()
    w1 = coords - f
    hi = torch.tensor([x - 1, y - 1, z - 1], dtype=coords.dtype, device=coords.device).view(3, 1)
    keep = ((f >= -1) & (f <= hi)).all(0)  # any other point has no corner inside the grid
    f, w1 = f[:, keep].long() + 1, w1[:, keep]
    w0 = 1.0 - w1
    base = (f[0] * y2 + f[1]) * z2 + f[2]
    for dx in (0, 1):
        for dy in (0, 1):
            wxy = (w1[0] if dx else w0[0]) * (w1[1] if dy else w0[1])
            for dz in (0, 1):
                total.index_add_(0, base + ((dx * y2 + dy) * z2 + dz), wxy * (w1[2] if dz else w0[2]))
    inner = total.view(x + 2, y2, z2)[1:-1, 1:-1, 1:-1]
    return inner.clone() if out is None else out.add_(inner)


def warp(
    vol: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Pull-back warp: out(x) = vol(x + disp(x)); vol (B, C, X, Y, Z), disp (B, 3, X, Y, Z) on the same grid."""
    if tuple(vol.shape[2:]) != tuple(disp.shape[2:]):
        raise ValueError(f"volume grid {tuple(vol.shape[2:])} != field grid {tuple(disp.shape[2:])}")
    coords = identity_grid(disp.shape[2:], disp.device, disp.dtype).unsqueeze(0) + disp
    return sample_at(vol, coords, mode, padding_mode)


def integrate_velocity(vel: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: exp(vel) as a displacement, via u = vel / 2**steps, then u <- u o u `steps` times."""
    disp = vel / (2.0**steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp)
    return disp


def resize_field(
    disp: torch.Tensor,
    factor: float | Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Trilinearly resample a displacement field to another resolution and rescale its vectors.

    Give a scale `factor` (e.g. 2.0) or a target `shape` (a tuple as `factor` is taken as a shape).
    Grids are related by voxel extents (align_corners=False: voxel i of n spans [i, i+1) * N/n of a grid
    of N), so the vectors are multiplied by N/n per axis, exactly 2 for a factor of 2.
    """
    in_shape = tuple(int(n) for n in disp.shape[2:])
    if shape is None and isinstance(factor, (tuple, list, torch.Size)):
        shape, factor = factor, None
    if shape is None:
        if factor is None:
            raise ValueError("give factor or shape")
        shape = tuple(int(round(n * float(factor))) for n in in_shape)
    shape = tuple(int(n) for n in shape)
    if shape == in_shape:
        return disp
    out = F.interpolate(disp, size=shape, mode="trilinear", align_corners=False)
    scale = torch.tensor([o / i for o, i in zip(shape, in_shape)], device=disp.device, dtype=disp.dtype)
    return out * scale.view(1, 3, 1, 1, 1)


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant (B, X, Y, Z) of x -> x + disp(x), central differences (one-sided at edges)."""
    grads = torch.gradient(disp, dim=(2, 3, 4))  # grads[c][:, r] = d disp_r / d x_c
    j = [[grads[c][:, r] + (1.0 if r == c else 0.0) for c in range(3)] for r in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


BOX_BORDERS = ("shrink", "zero")


def box_mean(x: torch.Tensor, window: int, *, border: str = "shrink") -> torch.Tensor:
    """Local mean over window^3 boxes (window odd) of the last three axes, same size as x.

    The one box filter of the local-NCC measures (losses.local_ncc, quality's NCC, the affine's local NCC);
    `border` says what a box reaching past the volume averages, and is part of each measure's numbers:
    "shrink": only its in-volume voxels. The in-volume part of a box is a product of one interval per axis,
    so its mean is the zero-padded box sum divided by the product of the three in-volume counts (the same
    numbers as a 3-D average pooling without the padding, to float rounding);
    "zero": zeros outside, divided by window^3. Both use running sums along each axis (any leading axes):
    two subtractions per voxel and axis whatever the window, about 4x faster with its backward than three
    1-D average poolings. "zero" is self-adjoint, which the affine's analytic gradient relies on.
    """
    if window % 2 != 1:
        raise ValueError("window must be odd")
    if border not in BOX_BORDERS:
        raise ValueError(f"border must be one of {BOX_BORDERS}, got {border!r}")
    total = _box_sum(x, window)
    if border == "zero":
        return total / float(window**3)
    r = window // 2
    idx = [torch.arange(n, device=x.device) for n in x.shape[-3:]]  # a box covers [i - r, i + r] of [0, n - 1]
    counts = [((i + r).clamp(max=len(i) - 1) - (i - r).clamp(min=0) + 1).to(x.dtype) for i in idx]
    count = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    return total / count


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over window^3 boxes of the last three axes, zeros outside (running sums, one axis at a time)."""
    radius, out = window // 2, x
    for axis in range(x.dim() - 3, x.dim()):
        n = out.shape[axis]
        pad = [0] * (2 * (x.dim() - axis))
        pad[-2], pad[-1] = radius + 1, radius
        c = F.pad(out, pad).cumsum(axis)
        out = c.narrow(axis, window, n) - c.narrow(axis, 0, n)
    return out
