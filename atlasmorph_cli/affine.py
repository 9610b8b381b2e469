"""12-parameter affine registration of a brain-extracted T1 to the model-space reference, in torch.

The result is a 4x4 world-to-world matrix T taking FIXED (model/MNI) world points to MOVING world
points (the pull-back convention), so that ``space.resample(moving, moving_affine, grid, world=T)``
brings the moving image onto the fixed grid.

Method (all deterministic):

1. Both images are normalised inside their brain (non-zero) masks; the moving image is
   box-averaged down to roughly the fixed voxel size when it is finer.
2. Initialisation from the masks' moments: centres of mass are matched, the scale is set from the
   brain volumes, and the rotation candidates are the identity plus the four proper rotations
   that map the fixed principal axes onto the moving ones (the eigenvector sign ambiguity).
3. Every candidate is optimised briefly at the coarsest level (in one batch); the best one is
   refined coarse-to-fine. The similarity is the global normalised cross-correlation over the fixed
   grid (brain and background box), on Gaussian-smoothed images at each level.
4. The transform is x -> c_m + t + A0 (I + L / r) (x - c_f): translation t in mm and a 3x3 matrix L
   scaled by a brain radius r = 50 mm, so every parameter is a displacement in mm at the brain
   surface and Adam's step sizes mean the same thing for all 12 of them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AtlasMorphError
from .space import Grid

RADIUS_MM = 50.0


@dataclass(frozen=True)
class Level:
    """One resolution level: sample spacing (mm), smoothing sigma (mm), Adam iterations and step (mm)."""

    spacing_mm: float
    sigma_mm: float
    iterations: int
    lr: float


LEVELS: tuple[Level, ...] = (
    Level(8.0, 4.0, 80, 1.0),
    Level(4.0, 2.0, 60, 0.4),
    Level(2.0, 1.0, 30, 0.15),
)
CANDIDATE_ITERATIONS = 30


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _normalise(data: np.ndarray) -> np.ndarray:
    from .intensity import normalize

    mask = np.isfinite(data) & (data > 0)
    if not mask.any():
        raise AtlasMorphError("affine registration: the image has no positive (brain) voxels")
    return normalize(data, mask)


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _reduce(data: np.ndarray, affine: np.ndarray, target_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Box-average by integer factors along axes whose voxels are much finer than `target_mm`."""
    factors = [max(1, int(math.floor(target_mm / z + 1e-6))) for z in _zooms(affine)]
    if factors == [1, 1, 1]:
        return data, affine
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    t = F.avg_pool3d(t, kernel_size=factors, stride=factors, ceil_mode=True, count_include_pad=False)
    scale = np.diag([*factors, 1]).astype(np.float64)
    scale[:3, 3] = (np.asarray(factors) - 1) / 2.0
    return t[0, 0].numpy(), affine @ scale


def _gaussian_1d(sigma_vox: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    return k / k.sum()


def _smooth(vol: torch.Tensor, sigmas_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, X, Y, Z) tensor (zero padding), sigma per axis in voxels."""
    out = vol
    for axis, s in enumerate(sigmas_vox):
        if s < 0.3:
            continue
        k = _gaussian_1d(float(s))
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k.numel() // 2
        out = F.conv3d(F.pad(out, pad), k.view(shape))
    return out


def _moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre of mass (world mm), covariance (mm^2) and volume (mm^3) of a binary mask."""
    idx = np.argwhere(mask).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(axis=0)
    d = world - centre
    cov = d.T @ d / len(d)
    volume = len(idx) * abs(np.linalg.det(affine[:3, :3]))
    return centre, cov, volume


def _candidate_rotations(cov_f: np.ndarray, cov_m: np.ndarray) -> list[np.ndarray]:
    """Identity plus the proper rotations mapping the fixed principal axes onto the moving ones."""
    _, e_f = np.linalg.eigh(cov_f)
    _, e_m = np.linalg.eigh(cov_m)
    rots = [np.eye(3)]
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1), (-1, -1, -1), (-1, 1, 1), (1, -1, 1), (1, 1, -1)):
        r = e_m @ np.diag(signs) @ e_f.T
        if np.linalg.det(r) > 0:
            rots.append(r)
    return rots


class _SampleWithGradient(torch.autograd.Function):
    """grid_sample of channel 0 whose backward uses the sampled image gradient (channels 1..3).

    torch's CPU backward of 3-D grid_sample is single-threaded and slow; sampling the precomputed
    gradient image in the forward pass costs three more channels of a fast, parallel forward.
    Channels 1..3 hold the gradient with respect to grid_sample's normalised (x, y, z) coordinates.
    """

    @staticmethod
    def forward(ctx, vol4: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        out = F.grid_sample(vol4.expand(grid.shape[0], -1, -1, -1, -1), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=True)
        ctx.save_for_backward(out[:, 1:])
        return out[:, :1]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (g,) = ctx.saved_tensors
        return None, (grad_out * g).permute(0, 2, 3, 4, 1)


class _Sampler:
    """The fixed image and the world coordinates of its voxels at one level, and the smoothed moving image."""

    def __init__(self, fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                 level: Level):
        f_zoom = _zooms(fixed_affine)
        stride = [max(1, int(round(level.spacing_mm / z))) for z in f_zoom]
        sig_f = [math.sqrt(max(level.sigma_mm**2 - (0.5 * z) ** 2 * 0, 0.0)) / z for z in f_zoom]
        ft = _smooth(torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))[None, None], sig_f)
        off = [(s - 1) // 2 for s in stride]
        ft = ft[:, :, off[0]::stride[0], off[1]::stride[1], off[2]::stride[2]]
        self.fixed = ft.reshape(1, -1)
        fc = self.fixed - self.fixed.mean()
        self.fixed_c = fc
        self.fixed_norm = fc.pow(2).sum().sqrt()
        shape = ft.shape[2:]
        axes = [torch.arange(n, dtype=torch.float64) * s + o for n, s, o in zip(shape, stride, off)]
        a = torch.as_tensor(fixed_affine, dtype=torch.float64)
        # World coordinates of the level's voxels as three broadcastable per-axis terms.
        self.axis_terms = [(a[:3, d].view(3, 1) * axes[d].view(1, -1)).float() for d in range(3)]
        self.origin = a[:3, 3].float()
        self.shape = tuple(int(n) for n in shape)

        m_zoom = _zooms(moving_affine)
        sig_m = [level.sigma_mm / z for z in m_zoom]
        mt = _smooth(torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))[None, None], sig_m)
        self.m_shape = mt.shape[2:]
        # Image gradient (central differences) with respect to grid_sample's (x, y, z) = (k, j, i).
        grads = []
        for axis in (2, 1, 0):
            d = torch.zeros_like(mt)
            n = mt.shape[2 + axis]
            if n > 2:
                hi = mt.narrow(2 + axis, 2, n - 2)
                lo = mt.narrow(2 + axis, 0, n - 2)
                d.narrow(2 + axis, 1, n - 2).copy_((hi - lo) * 0.5)
            grads.append(d * ((n - 1) / 2.0))
        self.moving4 = torch.cat([mt] + grads, dim=1).contiguous()
        inv = np.linalg.inv(moving_affine)
        # moving world -> grid_sample normalised coordinates (k, j, i order)
        norm = np.diag([2.0 / max(n - 1, 1) for n in self.m_shape] + [1.0])
        norm[:3, 3] = -1.0
        w2n = (norm @ inv)[[2, 1, 0, 3]][:3]
        self.w2n = torch.as_tensor(w2n, dtype=torch.float32)

    def grid(self, lin: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """Sampling grid (B, X, Y, Z, 3) for fixed-world -> moving-world maps x -> lin x + trans."""
        m = torch.einsum("ab,nbc->nac", self.w2n[:, :3], lin)  # (B,3,3): fixed world -> normalised
        b = torch.einsum("ab,nb->na", self.w2n[:, :3], trans) + self.w2n[:, 3]
        b = b + torch.einsum("nab,b->na", m, self.origin)
        X, Y, Z = self.shape
        tx = torch.einsum("nab,bx->nxa", m, self.axis_terms[0]).view(-1, X, 1, 1, 3)
        ty = torch.einsum("nab,by->nya", m, self.axis_terms[1]).view(-1, 1, Y, 1, 3)
        tz = torch.einsum("nab,bz->nza", m, self.axis_terms[2]).view(-1, 1, 1, Z, 3)
        return tx + ty + tz + b.view(-1, 1, 1, 1, 3)

    def loss(self, lin: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """1 - NCC per batch element (B,)."""
        g = self.grid(lin, trans)
        w = _SampleWithGradient.apply(self.moving4, g).reshape(g.shape[0], -1)
        wc = w - w.mean(dim=1, keepdim=True)
        ncc = (wc * self.fixed_c).sum(dim=1) / (wc.pow(2).sum(dim=1).sqrt() * self.fixed_norm + 1e-8)
        return 1.0 - ncc


def _transform(params: torch.Tensor, a0: torch.Tensor, c_f: torch.Tensor, c_m: torch.Tensor):
    """Linear part and translation (fixed world -> moving world) of params (B, 12)."""
    t = params[:, :3]
    l = params[:, 3:].view(-1, 3, 3) / RADIUS_MM
    lin = a0 @ (torch.eye(3) + l)
    trans = c_m + t - torch.einsum("nab,b->na", lin, c_f)
    return lin, trans


def _optimise(sampler: _Sampler, params: torch.Tensor, a0: torch.Tensor, c_f, c_m, iterations: int, lr: float):
    params = params.clone().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        lin, trans = _transform(params, a0, c_f, c_m)
        loss = sampler.loss(lin, trans)
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        lin, trans = _transform(params, a0, c_f, c_m)
        final = sampler.loss(lin, trans)
    return params.detach(), final


def fit_affine(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_grid: Grid,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """Affine (12-parameter) registration; returns T (4x4) mapping fixed world points to moving world points.

    `moving` is a brain-extracted T1 (zero outside the brain) with voxel-to-world `moving_affine`,
    any orientation and voxel size; `fixed` is the normalised reference brain on `fixed_grid`.
    ``space.resample(moving, moving_affine, fixed_grid, world=T)`` then puts the moving image on the grid.
    """
    moving = np.asarray(moving, dtype=np.float32)
    fixed = np.asarray(fixed, dtype=np.float32)
    if moving.ndim != 3 or fixed.ndim != 3:
        raise AtlasMorphError("affine registration needs 3D images")
    if tuple(fixed.shape) != tuple(fixed_grid.shape):
        raise AtlasMorphError(f"fixed image shape {fixed.shape} does not match its grid {fixed_grid.shape}")
    f_aff = np.asarray(fixed_grid.affine, dtype=np.float64)
    m_aff = np.asarray(moving_affine, dtype=np.float64)

    with _torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mov = _normalise(moving)
        fix = _normalise(fixed)
        finest = float(min(LEVELS[-1].spacing_mm, _zooms(f_aff).min()))
        mov, m_aff_r = _reduce(mov, m_aff, finest)

        c_f, cov_f, vol_f = _moments(fix > 0, f_aff)
        c_m, cov_m, vol_m = _moments(mov > 0, m_aff_r)
        scale = (vol_m / vol_f) ** (1.0 / 3.0)
        rots = _candidate_rotations(cov_f, cov_m)

        c_f_t = torch.as_tensor(c_f, dtype=torch.float32)
        c_m_t = torch.as_tensor(c_m, dtype=torch.float32)
        a0s = torch.as_tensor(np.stack([scale * r for r in rots]), dtype=torch.float32)

        samplers = [_Sampler(fix, f_aff, mov, m_aff_r, lv) for lv in LEVELS]
        params = torch.zeros(len(rots), 12)
        params, losses = _optimise(samplers[0], params, a0s, c_f_t, c_m_t, CANDIDATE_ITERATIONS, LEVELS[0].lr)
        best = int(torch.argmin(losses))
        params, a0 = params[best : best + 1], a0s[best : best + 1]
        for lv, sampler in zip(LEVELS, samplers):
            params, _ = _optimise(sampler, params, a0, c_f_t, c_m_t, lv.iterations, lv.lr)
        lin, trans = _transform(params, a0, c_f_t, c_m_t)

    out = np.eye(4)
    out[:3, :3] = lin[0].detach().double().numpy()
    out[:3, 3] = trans[0].detach().double().numpy()
    return out
