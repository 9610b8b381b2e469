"""12-parameter affine registration of a brain-extracted T1 to the model-space reference, in torch.

The result is a 4x4 world-to-world matrix T taking FIXED (model/MNI) world points to MOVING world
points (the pull-back convention), so that ``space.resample(moving, moving_affine, grid, world=T)``
brings the moving image onto the fixed grid.

Method (deterministic):

1. Both images are intensity-normalised inside their brain (positive) masks to [0.1, 1] (1st-99th
   percentiles), background 0, so the brain outline is an edge even next to dark CSF; a moving
   image with voxels much finer than the finest level is box-averaged down first.
2. Initialisation from the brain masks' moments: centres of mass are matched, the scale is set
   from the brain volumes, and the rotation candidates are the identity plus the four proper
   rotations that map the fixed principal axes onto the moving ones (the eigenvector sign
   ambiguity). Every candidate is optimised briefly at the coarsest level, in one batch, and the
   best one is refined coarse-to-fine.
3. Similarity: Mattes mutual information (cubic B-spline Parzen windows, 32 bins) between the
   fixed image and the warped moving image, over a fixed pseudo-random set of points of the fixed
   grid (brain and background box) with sub-voxel jitter, on Gaussian-smoothed images per level.
   Its gradient is analytic: the joint histogram's derivative times the image gradient, sampled in
   the same (fast, parallel) forward pass as the image itself.
4. Parametrisation: x -> c_m + t + A0 (I + L / r)(x - c_f), translation t in mm and a 3x3 matrix
   L scaled by a brain radius r = 50 mm, so every parameter is a displacement in mm at the brain
   surface; Adam's step sizes then mean the same for all 12 of them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AtlasMorphError
from ..model.layers import box_mean
from .space import Grid

RADIUS_MM = 50.0
BINS = 32
SEED = 20240611


@dataclass(frozen=True)
class Level:
    """One resolution level.

    metric: "mi" (Mattes mutual information over a pseudo-random, jittered point set) or "lncc"
    (local normalised cross-correlation over the dense grid, windows of 2 * radius + 1 voxels of
    the level's grid); spacing_mm: sample spacing; sigma_mm: Gaussian smoothing of both images;
    iterations and lr: Adam steps and step size (mm at the brain surface); fraction: share of the
    grid points used ("mi" only).
    """

    metric: str
    spacing_mm: float
    sigma_mm: float
    iterations: int
    lr: float
    fraction: float = 1.0
    radius: int = 2


# MI at 8 mm finds the pose; local NCC at 4 mm and then 2 mm refines it. A level of MI at 4 mm (40 iterations)
# between them and 10 iterations at 2 mm instead of 5 cost 1 CPU s more (2.2 vs 1.2 s) for the same accuracy:
# MNI-space Dice of 14 IXI subjects 0.6947 with them, 0.6952 without (docs/benchmarks.md, section 3). Halving the
# MI iterations (80 -> 40), 25 instead of 40 at 4 mm and 3 instead of 5 at 2 mm cost 0.3 CPU s less with the same
# segmentation Dice on the 23 validation subjects, with and without refinement (benchmarks/speed_settings.py);
# leaving the 2 mm level out costs 0.0015 Dice without refinement. The candidates keep 30 steps each: 15 gave the
# same validation Dice, but on the nearly half-turn-symmetric test phantoms another candidate wins for 5 of 8.
LEVELS: tuple[Level, ...] = (
    Level("mi", 8.0, 4.0, 40, 1.0),
    Level("lncc", 4.0, 2.0, 25, 0.3, radius=2),
    Level("lncc", 2.0, 0.0, 3, 0.1, radius=3),
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


# Brain intensities are mapped to [MASK_OFFSET, 1] so that the brain outline stays a visible edge
# even where dark CSF would otherwise normalise to the background's 0 (+0.006 mean Dice on IXI).
MASK_OFFSET = 0.1
SAMPLE_MARGIN_MM = 10.0


def _normalise(data: np.ndarray) -> np.ndarray:
    """Brain (positive) intensities -> [MASK_OFFSET, 1] via the 1st-99th percentiles; background 0."""
    from .intensity import normalize

    mask = np.isfinite(data) & (data > 0)
    if not mask.any():
        raise AtlasMorphError("affine registration: the image has no positive (brain) voxels")
    out = normalize(data, mask)
    if MASK_OFFSET > 0:
        out = np.where(mask, MASK_OFFSET + (1.0 - MASK_OFFSET) * out, 0.0).astype(np.float32)
    return out


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


def _smooth(vol: torch.Tensor, sigmas_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, X, Y, Z) tensor (zero padding), sigma per axis in voxels.

    Each 1-D convolution is a weighted sum of shifted copies of the zero-padded volume, taps in order: the
    numbers of conv1d over the rows of the axis, about 14x faster on CPU than conv1d with a batch of rows.
    """
    out = vol[0, 0]
    for axis, s in enumerate(sigmas_vox):
        if s < 0.2:
            continue
        radius = max(1, int(math.ceil(3.0 * s)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / float(s)) ** 2)
        k = k / k.sum()
        n = out.shape[axis]
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        padded = F.pad(out[None], pad)[0]
        acc = padded.narrow(axis, 0, n) * k[0]
        for j in range(1, len(k)):
            acc.add_(padded.narrow(axis, j, n), alpha=float(k[j]))
        out = acc
    return out.contiguous()[None, None]


def _moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre of mass (world mm), covariance (mm^2) and volume (mm^3) of a binary mask.

    From the mask's three 2-D projections (counts per voxel pair of axes), which hold every first and second
    moment of the voxel indices: no list of a million voxel coordinates is built (10x faster).
    """
    mask = np.asarray(mask, dtype=bool)
    n = int(np.count_nonzero(mask))
    pairs = {(0, 1): mask.sum(2, dtype=np.float64), (0, 2): mask.sum(1, dtype=np.float64),
             (1, 2): mask.sum(0, dtype=np.float64)}
    axes = [np.arange(s, dtype=np.float64) for s in mask.shape]
    marginal = [pairs[(0, 1)].sum(1), pairs[(0, 1)].sum(0), pairs[(0, 2)].sum(0)]
    mean = np.array([axes[a] @ marginal[a] for a in range(3)]) / n
    second = np.empty((3, 3))
    for a in range(3):
        second[a, a] = (axes[a] ** 2) @ marginal[a] / n
    for (a, b), counts in pairs.items():
        second[a, b] = second[b, a] = axes[a] @ counts @ axes[b] / n
    cov_idx = second - np.outer(mean, mean)
    lin = affine[:3, :3]
    return lin @ mean + affine[:3, 3], lin @ cov_idx @ lin.T, n * abs(np.linalg.det(lin))


def _candidate_rotations(cov_f: np.ndarray, cov_m: np.ndarray) -> list[np.ndarray]:
    """Identity plus the 4 proper rotations mapping the fixed principal axes onto the moving ones."""
    _, e_f = np.linalg.eigh(cov_f)
    _, e_m = np.linalg.eigh(cov_m)
    rots = [np.eye(3)]
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1), (-1, -1, -1), (-1, 1, 1), (1, -1, 1), (1, 1, -1)):
        r = e_m @ np.diag(signs) @ e_f.T
        if np.linalg.det(r) > 0:
            rots.append(r)
    return rots


def _bspline(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cubic B-spline Parzen window of intensities in [0, 1]: first bin (N,), weights and their
    derivatives with respect to the intensity (N, 4) over bins first..first+3."""
    scale = bins - 3
    pos = (values.clamp(0.0, 1.0) * scale + 1.0).clamp(max=bins - 2 - 1e-4)
    fl = torch.floor(pos)
    t = pos - fl
    t2, t3 = t * t, t * t * t
    u = 1.0 - t
    w = torch.stack([u * u * u / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], dim=-1)
    dw = torch.stack([-u * u / 2, (3 * t2 - 4 * t) / 2, (-3 * t2 + 2 * t + 1) / 2, t2 / 2], dim=-1) * scale
    return fl.long() - 1, w, dw


class _NegMutualInformation(torch.autograd.Function):
    """-MI (B,) between fixed samples (their bins, (N,)) and moving samples v (B, N).

    Mattes et al.'s estimator: a zero-order (box) Parzen window for the fixed intensities and a
    cubic B-spline window for the moving ones, so each sample adds to 4 joint-histogram cells.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, f_bin: torch.Tensor, bins: int) -> torch.Tensor:
        n = v.shape[1]
        base = f_bin * bins
        taps = torch.arange(4)
        out, grads = [], []
        for b in range(v.shape[0]):
            m_first, m_w, m_dw = _bspline(v[b], bins)
            flat = ((base + m_first)[:, None] + taps).reshape(-1)  # (N*4,)
            joint = torch.zeros(bins * bins, dtype=v.dtype).index_add_(0, flat, m_w.reshape(-1))
            joint = joint.view(bins, bins) / n
            pf = joint.sum(dim=1, keepdim=True)
            pm = joint.sum(dim=0, keepdim=True)
            eps = 1e-12
            ratio = torch.log(joint + eps) - torch.log(pf + eps) - torch.log(pm + eps)
            out.append(-(joint * ratio).sum())
            # d(-MI)/dv_n = -(1/N) sum_b dw_b(v_n) ratio[f_n, m_n + b]
            g = ratio.reshape(-1)[flat].view(n, 4)
            grads.append((m_dw * g).sum(dim=1) * (-1.0 / n))
        ctx.save_for_backward(torch.stack(grads))
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (g,) = ctx.saved_tensors
        return grad_out[:, None] * g, None, None


def _fixed_bins(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Zero-order Parzen bin of fixed intensities in [0, 1], on the moving windows' bin centres."""
    pos = values.clamp(0.0, 1.0) * (bins - 3) + 1.0
    return torch.floor(pos + 0.5).long().clamp(0, bins - 1)


class _SampleWithGradient(torch.autograd.Function):
    """grid_sample of channel 0 whose backward uses the sampled image gradient (channels 1..3).

    torch's CPU backward of 3-D grid_sample is slow; sampling a precomputed gradient image in the
    forward pass costs three more channels of a fast, parallel forward. Channels 1..3 hold the
    gradient with respect to grid_sample's normalised (x, y, z) coordinates.
    """

    @staticmethod
    def forward(ctx, vol4: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        out = F.grid_sample(vol4, grid, mode="bilinear",
                            padding_mode="zeros", align_corners=True)
        ctx.save_for_backward(out[:, 1:])
        return out[:, :1]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (g,) = ctx.saved_tensors
        return None, (grad_out * g).permute(0, 2, 3, 4, 1)


def _with_gradient(vol: torch.Tensor) -> torch.Tensor:
    """(1, 4, X, Y, Z): the volume and its central-difference gradient w.r.t. grid_sample's (x, y, z)."""
    grads = []
    for axis in (2, 1, 0):  # grid_sample's x, y, z are the volume's k, j, i
        d = torch.zeros_like(vol)
        n = vol.shape[2 + axis]
        if n > 2:
            diff = vol.narrow(2 + axis, 2, n - 2) - vol.narrow(2 + axis, 0, n - 2)
            d.narrow(2 + axis, 1, n - 2).copy_(diff * 0.5)
        grads.append(d * ((n - 1) / 2.0))
    return torch.cat([vol] + grads, dim=1).contiguous()


def _world_to_normalised(affine: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """3x4 matrix: world mm -> grid_sample normalised coordinates (x, y, z = k, j, i) of a volume."""
    norm = np.diag([2.0 / max(int(n) - 1, 1) for n in shape] + [1.0])
    norm[:3, 3] = -1.0
    return torch.as_tensor((norm @ np.linalg.inv(affine))[[2, 1, 0]], dtype=torch.float32)


def _moving_for_level(moving: np.ndarray, moving_affine: np.ndarray, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
    """The smoothed moving image with its gradient (1, 4, ...) and its world -> normalised map."""
    m_zoom = _zooms(moving_affine)
    mt = _smooth(torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))[None, None],
                 [level.sigma_mm / z for z in m_zoom])
    # Keep the smoothed moving image at about half the level's spacing: sampling a small volume
    # is much faster (cache), and the smoothing has removed the finer detail.
    m_stride = [max(1, int(math.floor(0.5 * level.spacing_mm / z + 1e-6))) for z in m_zoom]
    mt = mt[:, :, :: m_stride[0], :: m_stride[1], :: m_stride[2]]
    m_affine = np.asarray(moving_affine, dtype=np.float64) @ np.diag([*m_stride, 1.0])
    return _with_gradient(mt), _world_to_normalised(m_affine, mt.shape[2:])


def _near_brain(fixed: np.ndarray, zooms: np.ndarray, margin_mm: float) -> torch.Tensor:
    """Boolean volume: within `margin_mm` (box distance) of the fixed brain."""
    r = [max(1, int(round(margin_mm / z))) for z in zooms]
    near = torch.from_numpy(np.ascontiguousarray(fixed > 0)).float()[None, None]
    for axis in range(3):  # separable box dilation
        kernel, pad = [1, 1, 1], [0, 0, 0]
        kernel[axis], pad[axis] = 2 * r[axis] + 1, r[axis]
        near = F.max_pool3d(near, kernel_size=kernel, stride=1, padding=pad)
    return near[0, 0] > 0


class _PointLevel:
    """Mutual information over a fixed set of jittered sample points of the fixed grid near the brain."""

    def __init__(self, fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray,
                 moving_affine: np.ndarray, level: Level, generator: torch.Generator):
        f_zoom = _zooms(fixed_affine)
        ft = _smooth(torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))[None, None],
                     [level.sigma_mm / z for z in f_zoom])
        stride = [max(1, int(round(level.spacing_mm / z))) for z in f_zoom]
        counts = [max(1, int(n) // s) for n, s in zip(fixed.shape, stride)]
        axes = [torch.arange(c, dtype=torch.float32) * s + (s - 1) / 2.0 for c, s in zip(counts, stride)]
        ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        # Only points within SAMPLE_MARGIN_MM of the fixed brain: farther background never meets
        # the moving brain once the centres of mass are matched, and costs time.
        near = _near_brain(fixed, f_zoom, SAMPLE_MARGIN_MM)
        idx = ijk.round().long()
        ijk = ijk[near[idx[:, 0], idx[:, 1], idx[:, 2]]]
        if level.fraction < 1.0:
            keep = torch.randperm(ijk.shape[0], generator=generator)[: int(round(level.fraction * ijk.shape[0]))]
            ijk = ijk[torch.sort(keep).values]
        # sub-voxel jitter: no grid-aligned interpolation artefacts in the histogram
        jitter = (torch.rand(ijk.shape, generator=generator) - 0.5) * torch.tensor(stride, dtype=torch.float32)
        hi = torch.tensor(fixed.shape, dtype=torch.float32) - 1
        ijk = torch.minimum(torch.maximum(ijk + jitter, torch.zeros(3)), hi)
        norm = ijk / hi.clamp_min(1) * 2 - 1
        fvals = F.grid_sample(ft, norm[:, [2, 1, 0]].view(1, 1, 1, -1, 3), mode="bilinear",
                              padding_mode="border", align_corners=True).reshape(-1)
        self.f_bin = _fixed_bins(fvals, BINS)
        a = torch.as_tensor(fixed_affine, dtype=torch.float32)
        self.points = ijk @ a[:3, :3].T + a[:3, 3]  # (N, 3) fixed world mm
        self.moving4, self.w2n = _moving_for_level(moving, moving_affine, level)

    def loss(self, lin: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """-MI (B,) for the fixed-world -> moving-world maps x -> lin x + trans (lin (B,3,3), trans (B,3))."""
        m = torch.einsum("ab,nbc->nac", self.w2n[:, :3], lin)
        b = torch.einsum("ab,nb->na", self.w2n[:, :3], trans) + self.w2n[:, 3]
        grid = torch.einsum("nac,pc->npa", m, self.points) + b[:, None, :]  # (B, N, 3)
        # One batch of B*N points: a batch of B would copy the moving volume B times.
        v = _SampleWithGradient.apply(self.moving4, grid.reshape(1, 1, 1, -1, 3))  # (1, 1, 1, 1, B*N)
        return _NegMutualInformation.apply(v.reshape(lin.shape[0], -1), self.f_bin, BINS)


def _box_mean(vol: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over (2r+1)^3 zero-padded boxes of the last three axes (self-adjoint: the analytic gradient needs it)."""
    return box_mean(vol, 2 * radius + 1, border="zero")


class _LocalNCC(torch.autograd.Function):
    """1 - mean over voxels of the squared local correlation cov^2 / (var_w var_f + eps), with an
    analytic gradient (three more box filters) instead of autograd through the running sums.

    The map of model.losses.local_ncc, on zero-padded boxes and with eps 1e-3 (the smoothed, block-averaged
    images have near-flat boxes), offset by 1 so the loss is >= 0; the fixed image's moments are computed once."""

    EPS = 1e-3

    @staticmethod
    def forward(ctx, w: torch.Tensor, f: torch.Tensor, mf: torch.Tensor, vf: torch.Tensor, radius: int):
        mw, mww, mwf = _box_mean(torch.stack([w, w * w, w * f]), radius).unbind(0)
        cov = mwf - mw * mf
        vw = (mww - mw * mw).clamp_min(0.0)
        inv_d = 1.0 / (vw * vf + _LocalNCC.EPS)
        cc = cov * cov * inv_d
        n = float(w.numel())
        # derivatives of the loss with respect to the local means mw, mww, mwf
        a = 2.0 * cov * inv_d
        b = cc * vf * inv_d
        coeff = torch.stack([(a * mf - 2.0 * b * mw) / n, b / n, -a / n])
        ctx.save_for_backward(coeff, w, f)
        ctx.radius = radius
        return 1.0 - cc.mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        coeff, w, f = ctx.saved_tensors
        g_mw, g_mww, g_mwf = _box_mean(coeff, ctx.radius).unbind(0)
        grad = (g_mw + 2.0 * w * g_mww + f * g_mwf) * grad_out
        return grad, None, None, None, None


class _WarpDense(torch.autograd.Function):
    """Trilinear sampling of a single-channel volume on a dense affine grid (1, X, Y, Z, 3).

    The backward uses finite differences of the warped image itself: for an affine grid
    n = G ijk + g0, grad_n I = G^-T grad_ijk w. One sampled channel instead of four halves the cost.
    """

    @staticmethod
    def forward(ctx, vol: torch.Tensor, grid: torch.Tensor, g_inv_t: torch.Tensor) -> torch.Tensor:
        w = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        ctx.save_for_backward(w, g_inv_t)
        return w

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w, g_inv_t = ctx.saved_tensors
        d = torch.zeros((3,) + tuple(w.shape), dtype=w.dtype)
        for axis in range(3):
            n = w.shape[axis]
            if n > 2:
                d[axis].narrow(axis, 1, n - 2).copy_(
                    (w.narrow(axis, 2, n - 2) - w.narrow(axis, 0, n - 2)) * 0.5)
        grad_n = torch.einsum("ab,bxyz->xyza", g_inv_t, d * grad_out)
        return None, grad_n[None], None


class _DenseLevel:
    """Local NCC over the whole fixed grid (block-averaged to the level's spacing)."""

    def __init__(self, fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray,
                 moving_affine: np.ndarray, level: Level):
        f_zoom = _zooms(fixed_affine)
        ft = _smooth(torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))[None, None],
                     [level.sigma_mm / z for z in f_zoom])
        stride = [max(1, int(round(level.spacing_mm / z))) for z in f_zoom]
        if stride != [1, 1, 1]:
            ft = F.avg_pool3d(ft, kernel_size=stride, stride=stride)
        self.f = ft[0, 0].contiguous()
        mf, mff = _box_mean(torch.stack([self.f, self.f * self.f]), level.radius).unbind(0)
        self.mf = mf
        self.vf = (mff - mf * mf).clamp_min(0.0)
        self.radius = level.radius
        a = torch.as_tensor(fixed_affine, dtype=torch.float32)
        # world coordinates of the block centres, as three broadcastable per-axis terms
        self.axis_terms = [
            a[:3, d].view(3, 1) * (torch.arange(n, dtype=torch.float32) * s + (s - 1) / 2.0).view(1, -1)
            for d, (n, s) in enumerate(zip(self.f.shape, stride))
        ]
        self.origin = a[:3, 3]
        self.steps = a[:3, :3] * torch.tensor(stride, dtype=torch.float32)  # world per level voxel
        moving4, self.w2n = _moving_for_level(moving, moving_affine, level)
        self.moving = moving4[:, :1].contiguous()

    def loss(self, lin: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        if lin.shape[0] != 1:
            raise ValueError("local NCC levels take a single transform")
        m = self.w2n[:, :3] @ lin[0]
        b = self.w2n[:, :3] @ trans[0] + self.w2n[:, 3] + m @ self.origin
        X, Y, Z = self.f.shape
        grid = ((m @ self.axis_terms[0]).T.view(X, 1, 1, 3) + (m @ self.axis_terms[1]).T.view(1, Y, 1, 3)
                + (m @ self.axis_terms[2]).T.view(1, 1, Z, 3) + b)
        g_inv_t = torch.linalg.inv((m @ self.steps).detach()).T  # rows of m are grid (x, y, z)
        w = _WarpDense.apply(self.moving, grid[None], g_inv_t)
        return _LocalNCC.apply(w, self.f, self.mf, self.vf, self.radius)[None]


def _transform(params: torch.Tensor, a0: torch.Tensor, c_f: torch.Tensor, c_m: torch.Tensor):
    """Linear part (B,3,3) and translation (B,3), fixed world -> moving world, of params (B, 12)."""
    lin = a0 @ (torch.eye(3) + params[:, 3:].view(-1, 3, 3) / RADIUS_MM)
    trans = c_m + params[:, :3] - torch.einsum("nab,b->na", lin, c_f)
    return lin, trans


def _optimise(level: _PointLevel | _DenseLevel, params: torch.Tensor, a0: torch.Tensor, c_f: torch.Tensor, c_m: torch.Tensor,
              iterations: int, lr: float, score: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adam on params (B, 12), written out: torch.optim's first use imports torch._dynamo (~2 s).

    Returns the parameters and, with `score`, the loss they reach (one more evaluation: only the choice
    between candidate initialisations needs it)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    params = params.clone()
    m1 = torch.zeros_like(params)
    m2 = torch.zeros_like(params)
    for it in range(1, iterations + 1):
        p = params.clone().requires_grad_(True)
        level.loss(*_transform(p, a0, c_f, c_m)).sum().backward()
        g = p.grad
        m1.mul_(beta1).add_(g, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = (m1 / (1 - beta1**it)) / ((m2 / (1 - beta2**it)).sqrt() + eps)
        params = params - lr * step
    if not score:
        return params, None
    with torch.no_grad():
        final = level.loss(*_transform(params, a0, c_f, c_m))
    return params, final


def fit_affine(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_grid: Grid,
    *,
    threads: int | None = None,
    levels: Sequence[Level] = LEVELS,
    candidate_iterations: int = CANDIDATE_ITERATIONS,
) -> np.ndarray:
    """Affine (12-parameter) registration; returns T (4x4) mapping fixed world points to moving world points.

    `moving` is a brain-extracted T1 (zero outside the brain) with voxel-to-world `moving_affine`,
    any orientation and voxel size; `fixed` is the normalised reference brain on `fixed_grid`.
    ``space.resample(moving, moving_affine, fixed_grid, world=T)`` then puts the moving image on the grid.
    `threads` sets torch's thread count for the call (restored afterwards); `levels` replaces the
    coarse-to-fine schedule (the first must be "mi": it chooses between the candidate rotations, each optimised
    `candidate_iterations` steps on it first).
    """
    if not levels or levels[0].metric != "mi":
        raise ValueError("the first affine level must be 'mi' (it chooses between the candidate rotations)")
    moving = np.asarray(moving, dtype=np.float32)
    fixed = np.asarray(fixed, dtype=np.float32)
    if moving.ndim != 3 or fixed.ndim != 3:
        raise AtlasMorphError("affine registration needs 3D images")
    if tuple(fixed.shape) != tuple(fixed_grid.shape):
        raise AtlasMorphError(f"fixed image shape {fixed.shape} does not match its grid {fixed_grid.shape}")
    f_aff = np.asarray(fixed_grid.affine, dtype=np.float64)
    m_aff = np.asarray(moving_affine, dtype=np.float64)

    with _torch_threads(threads), torch.no_grad():
        mov = _normalise(moving)
        fix = _normalise(fixed)
        mov, m_aff = _reduce(mov, m_aff, float(levels[-1].spacing_mm))

        c_f, cov_f, vol_f = _moments(fix > 0, f_aff)
        c_m, cov_m, vol_m = _moments(mov > 0, m_aff)
        scale = (vol_m / vol_f) ** (1.0 / 3.0)
        rots = _candidate_rotations(cov_f, cov_m)
        c_f_t = torch.as_tensor(c_f, dtype=torch.float32)
        c_m_t = torch.as_tensor(c_m, dtype=torch.float32)
        a0s = torch.as_tensor(np.stack([scale * r for r in rots]), dtype=torch.float32)

        generator = torch.Generator().manual_seed(SEED)
        built = [
            _PointLevel(fix, f_aff, mov, m_aff, lv, generator) if lv.metric == "mi"
            else _DenseLevel(fix, f_aff, mov, m_aff, lv)
            for lv in levels
        ]

    with _torch_threads(threads), torch.enable_grad():
        params, losses = _optimise(built[0], torch.zeros(len(rots), 12), a0s, c_f_t, c_m_t,
                                   candidate_iterations, levels[0].lr)
        best = int(torch.argmin(losses))
        params, a0 = params[best : best + 1], a0s[best : best + 1]
        for lv, level in zip(levels, built):
            params, _ = _optimise(level, params, a0, c_f_t, c_m_t, lv.iterations, lv.lr, score=False)
        lin, trans = _transform(params, a0, c_f_t, c_m_t)

    out = np.eye(4)
    out[:3, :3] = lin[0].detach().double().numpy()
    out[:3, 3] = trans[0].detach().double().numpy()
    return out
