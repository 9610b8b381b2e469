"""Training losses: image and label matching, smoothness priors and the centrality term.

Each loss is a pure function returning a scalar tensor (lower is better). The two stateful helpers,
`CentralityMemory` and `RunningMean`, keep their state in buffers so it travels with checkpoints.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import identity_grid


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, over the voxels where `mask` (broadcastable to a) is nonzero when given."""
    sq = (a - b) ** 2
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype).expand_as(sq)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a window^3 box per channel (same size; border boxes average their in-volume voxels)."""
    return F.avg_pool3d(x, window, stride=1, padding=window // 2, count_include_pad=False)


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-8) -> torch.Tensor:
    """Negative mean local (squared) normalised cross-correlation over window^3 boxes; -1 is a perfect match.

    As in VoxelMorph, each voxel scores cov^2 / (var_a var_b + eps), so any positive or negative
    linear rescaling of `a` scores -1, and flat regions score 0. `window` must be odd.
    """
    if window % 2 != 1:
        raise ValueError("window must be odd")
    mu_a, mu_b = _box_mean(a, window), _box_mean(b, window)
    cov = _box_mean(a * b, window) - mu_a * mu_b
    var_a = (_box_mean(a * a, window) - mu_a**2).clamp_min(0.0)
    var_b = (_box_mean(b * b, window) - mu_b**2).clamp_min(0.0)
    return -(cov**2 / (var_a * var_b + eps)).mean()


def soft_dice(
    probs: torch.Tensor, onehot: torch.Tensor, exclude_background: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """1 - mean soft Dice of probs vs onehot, both (B, C, X, Y, Z), over the (item, class) pairs present in onehot.

    Classes absent from a subject's labels are left out of the mean (as in the Dice one reports), so a
    cohort labelling only some structures is not dominated by the absent ones; their probability mass
    still counts against the present classes through the denominators. Channel 0 (background) is
    skipped when `exclude_background`.
    """
    if exclude_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    count = onehot.sum(dims)
    return _present_dice_loss(inter, probs.sum(dims), count, eps)


def _present_dice_loss(inter: torch.Tensor, mass: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """1 - mean over (B, C) entries with count > 0 of 2 inter / (mass + count); 0 when no class is present."""
    present = count > 0
    if not present.any():
        return mass.sum() * 0.0
    dice = (2.0 * inter + eps) / (mass + count + eps)
    return 1.0 - dice[present].mean()


def _trilinear_corners(disp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat voxel indices (B, 8, V) and weights (B, 8, V) of the trilinear corners sampled at x + disp(x).

    Border padding as warp(): coordinates are clamped into the volume (no gradient outside it).
    """
    shape = disp.shape[2:]
    coords = identity_grid(shape, disp.device, disp.dtype).unsqueeze(0) + disp
    axes = []
    for a, n in enumerate(shape):
        c = coords[:, a].clamp(0, n - 1).flatten(1)
        i0 = c.detach().floor()
        axes.append((i0.long(), (i0 + 1).clamp(max=n - 1).long(), c - i0))
    strides = (shape[1] * shape[2], shape[2], 1)
    idx, wts = [], []
    for bits in itertools.product((0, 1), repeat=3):
        i, w = 0, 1.0
        for (i0, i1, f), bit, st in zip(axes, bits, strides):
            i = i + (i1 if bit else i0) * st
            w = w * (f if bit else 1.0 - f)
        idx.append(i)
        wts.append(w)
    return torch.stack(idx, 1), torch.stack(wts, 1)


class _GatherAndMass(torch.autograd.Function):
    """(probs (B, C, V), idx (B, K), rho (B, V)) -> (probs.flat[idx] (B, K), sum_v probs * rho (B, C)).

    Hand-written backward: the dense gradient for probs is written once and the sparse part added in
    place, instead of autograd's zero-fill + scatter + add of two full C x V tensors.
    """

    @staticmethod
    def forward(ctx, probs: torch.Tensor, idx: torch.Tensor, rho: torch.Tensor):
        ctx.save_for_backward(probs, idx, rho)
        b = probs.shape[0]
        return probs.reshape(b, -1).gather(1, idx), torch.einsum("bcv,bv->bc", probs, rho)

    @staticmethod
    def backward(ctx, g_gathered: torch.Tensor, g_mass: torch.Tensor):
        probs, idx, rho = ctx.saved_tensors
        grad_probs = grad_rho = None
        if ctx.needs_input_grad[0]:
            grad_probs = g_mass[:, :, None] * rho[:, None, :]
            grad_probs.view(probs.shape[0], -1).scatter_add_(1, idx, g_gathered)
        if ctx.needs_input_grad[2]:
            grad_rho = torch.einsum("bc,bcv->bv", g_mass, probs)
        return grad_probs, None, grad_rho


def warped_soft_dice(
    probs: torch.Tensor,
    disp: torch.Tensor,
    labels: torch.Tensor,
    exclude_background: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """soft_dice(warp(probs, disp), one_hot(labels)) computed without building the warped C-channel volume.

    probs (B, C, X, Y, Z) in the template frame, disp (B, 3, X, Y, Z) the pull-back field of warp(),
    labels (B, X, Y, Z) integer classes of the subject. Per voxel only the subject's own class is
    sampled (8 gathers), and sum_x warp(p_c)(x) = sum_y p_c(y) rho(y) with rho the trilinear weights
    splatted onto the template grid; identical to the full warp (bilinear, border padding) up to rounding
    but several times cheaper for 35 classes on a CPU.
    """
    b, c = probs.shape[:2]
    nvox = probs[0, 0].numel()
    if disp.shape[0] != b:
        disp = disp.expand(b, *disp.shape[1:])
    lab = labels.reshape(b, nvox).long()
    idx, w = _trilinear_corners(disp)  # (B, 8, V) each
    rho = torch.zeros(b, nvox, dtype=w.dtype, device=w.device).scatter_add(1, idx.flatten(1), w.flatten(1))
    flat_idx = (lab.unsqueeze(1) * nvox + idx).flatten(1)
    gathered, mass = _GatherAndMass.apply(probs.reshape(b, c, nvox), flat_idx, rho)
    picked = (w * gathered.view(b, 8, nvox)).sum(1)  # warp(p_{label(x)})(x)
    zeros = torch.zeros(b, c, dtype=probs.dtype, device=probs.device)
    inter = zeros.scatter_add(1, lab, picked)
    count = zeros.scatter_add(1, lab, torch.ones_like(picked))
    if exclude_background:
        inter, mass, count = inter[:, 1:], mass[:, 1:], count[:, 1:]
    return _present_dice_loss(inter, mass, count, eps)


def gradient_l2(field: torch.Tensor) -> torch.Tensor:
    """Smoothness prior: mean over the 3 spatial axes of the mean squared forward difference."""
    dx = field[:, :, 1:] - field[:, :, :-1]
    dy = field[:, :, :, 1:] - field[:, :, :, :-1]
    dz = field[:, :, :, :, 1:] - field[:, :, :, :, :-1]
    return ((dx**2).mean() + (dy**2).mean() + (dz**2).mean()) / 3.0


def magnitude_l2(field: torch.Tensor) -> torch.Tensor:
    """Mean squared displacement mean(u^2): keeps deformations small."""
    return (field**2).mean()


# --------------------------------------------------------------------------------------------------
# Centrality: each template should sit at the centre of its sub-population (mean deformation ~ 0).
# --------------------------------------------------------------------------------------------------


def attribute_weights(query: torch.Tensor, keys: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Gaussian kernel weights (B, N) = exp(-||keys_j - query_b||^2 / (2 h^2)); all 1 when there are 0 attributes."""
    d2 = ((query[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    return torch.exp(-d2 / (2.0 * float(bandwidth) ** 2))


def centrality_loss(
    disp_lowres: torch.Tensor,
    attrs: torch.Tensor,
    mem_fields: torch.Tensor,
    mem_attrs: torch.Tensor,
    mem_filled: torch.Tensor,
    self_idx: torch.Tensor | None,
    bandwidth: float,
) -> torch.Tensor:
    """Kernel-weighted centrality penalty (AtlasMorph's KDE view of Dalca 2019's mean-displacement term).

    For batch item b with attributes a_b and (differentiable) displacement u_b (B, 3, x, y, z), the
    local mean displacement is m_b = (u_b + sum_j w_bj M_j) / (1 + sum_j w_bj) over the filled memory
    entries M_j other than self_idx[b] (None: exclude nothing), with w_bj = exp(-||a_j - a_b||^2 / (2 h^2))
    (u_b itself has weight 1). With 0 attributes every weight is 1: the global mean displacement.
    Returns the batch mean of mean_voxels(||m_b||^2). Memory is treated as constant, so the gradient
    flows only through u_b (scaled by 1 / (1 + sum_j w_bj), as in a running mean).
    """
    b, n = disp_lowres.shape[0], mem_fields.shape[0]
    keep = mem_filled.to(torch.bool).view(1, n).expand(b, n)
    if self_idx is not None:
        ids = torch.arange(n, device=mem_filled.device)
        keep = keep & (ids.view(1, n) != self_idx.to(ids.device).view(b, 1))
    w = attribute_weights(attrs.to(mem_attrs.dtype), mem_attrs, bandwidth) * keep.to(mem_attrs.dtype)
    others = (w @ mem_fields.detach().reshape(n, -1)).view_as(disp_lowres)
    mean = (disp_lowres + others) / (1.0 + w.sum(1)).view(b, 1, 1, 1, 1)
    return (mean**2).sum(1).mean()


class CentralityMemory(nn.Module):
    """Last-seen low-resolution displacement and attributes of every training subject (checkpointed)."""

    def __init__(self, n_subjects: int, shape: Sequence[int], n_attrs: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("fields", torch.zeros(n_subjects, 3, *shape, dtype=dtype))
        self.register_buffer("attrs", torch.zeros(n_subjects, n_attrs, dtype=dtype))
        self.register_buffer("filled", torch.zeros(n_subjects, dtype=torch.bool))

    @torch.no_grad()
    def update(self, idx: torch.Tensor, disp_lowres: torch.Tensor, attrs: torch.Tensor) -> None:
        """Store (detached) the displacements and attributes of subjects idx (B,)."""
        idx = torch.as_tensor(idx, device=self.fields.device, dtype=torch.long).view(-1)
        self.fields[idx] = disp_lowres.detach().to(self.fields.dtype)
        self.attrs[idx] = attrs.detach().to(self.attrs.dtype)
        self.filled[idx] = True

    def loss(
        self, disp_lowres: torch.Tensor, attrs: torch.Tensor, self_idx: torch.Tensor | None, bandwidth: float
    ) -> torch.Tensor:
        """centrality_loss against this memory."""
        return centrality_loss(
            disp_lowres, attrs, self.fields.to(disp_lowres.dtype), self.attrs, self.filled, self_idx, bandwidth
        )


def running_mean_step(
    mean: torch.Tensor, count: torch.Tensor | float, disp: torch.Tensor, cap: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dalca 2019's "mean stream": returns (new_mean, new_count, penalty).

    count += B; alpha = B / min(count, cap); new_mean = (1 - alpha) mean + alpha batch_mean(disp);
    penalty = mean_voxels(||min(1, count / cap) new_mean||^2), ramping in over the first `cap` samples.
    Gradient flows through disp only (with weight alpha); store new_mean.detach() for the next step.
    """
    bsz = disp.shape[0]
    count = torch.as_tensor(count, dtype=disp.dtype, device=disp.device) + bsz
    alpha = bsz / torch.clamp(count, max=float(cap))
    new_mean = (1.0 - alpha) * mean.detach() + alpha * disp.mean(0, keepdim=True)
    ramp = torch.clamp(count / float(cap), max=1.0)
    return new_mean, count, ((ramp * new_mean) ** 2).sum(1).mean()


class RunningMean(nn.Module):
    """Stateful mean-stream centrality term; calling it (in training mode) updates the mean and returns the penalty."""

    def __init__(self, shape: Sequence[int], cap: int = 100):
        super().__init__()
        self.cap = int(cap)
        self.register_buffer("mean", torch.zeros(1, 3, *shape))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, disp: torch.Tensor) -> torch.Tensor:
        """Penalty for displacements disp (B, 3, x, y, z); state is only updated in training mode."""
        new_mean, count, penalty = running_mean_step(self.mean.to(disp.dtype), self.count, disp, self.cap)
        if self.training:
            self.mean.copy_(new_mean.detach())
            self.count.copy_(count.detach())
        return penalty
