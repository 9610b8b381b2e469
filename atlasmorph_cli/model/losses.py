"""Loss functions and the image-loss registry: image and label matching, smoothness priors, centrality.

Each loss is a pure function returning a scalar tensor (lower is better). The centrality term reads a
memory of every training subject's last displacement that the training loop keeps (and checkpoints).
`get_image_loss(name)` is the one place an image-similarity name (`--image-loss`, a model's recorded
training settings) becomes a function; an unknown name is an error.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import AtlasMorphError
from .layers import box_mean


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, over the voxels where `mask` (broadcastable to a) is nonzero when given."""
    sq = (a - b) ** 2
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype).expand_as(sq)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-8) -> torch.Tensor:
    """Negative mean local (squared) normalised cross-correlation over window^3 boxes; -1 is a perfect match.

    As in VoxelMorph, each voxel scores cov^2 / (var_a var_b + eps), so any positive or negative
    linear rescaling of `a` scores -1, and flat regions score 0. `window` must be odd; border boxes average
    their in-volume voxels. (The affine registration scores the same map with an analytic gradient,
    zero-padded boxes, eps 1e-3 and an offset of 1: geometry.affine._LocalNCC.)
    """
    if window % 2 != 1:
        raise ValueError("window must be odd")
    mu_a, mu_b = box_mean(a, window), box_mean(b, window)
    cov = box_mean(a * b, window) - mu_a * mu_b
    var_a = (box_mean(a * a, window) - mu_a**2).clamp_min(0.0)
    var_b = (box_mean(b * b, window) - mu_b**2).clamp_min(0.0)
    return -(cov**2 / (var_a * var_b + eps)).mean()


ImageLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IMAGE_LOSSES: dict[str, ImageLoss] = {"mse": mse, "ncc": local_ncc}


def get_image_loss(name: str) -> ImageLoss:
    """The image-similarity loss called `name` (mse or ncc); any other name is an error, not a silent default."""
    try:
        return IMAGE_LOSSES[name]
    except KeyError:
        raise AtlasMorphError(f"unknown image loss '{name}' (choose from {', '.join(IMAGE_LOSSES)})") from None


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


def log_volumes(probs: torch.Tensor, voxel_volume: float = 1.0) -> torch.Tensor:
    """log(1 + volume) of each class of probs (B, C, X, Y, Z): sums of probabilities x voxel_volume."""
    return torch.log1p(probs.sum(tuple(range(2, probs.dim()))) * voxel_volume)


def volume_trend_loss(log_vol: torch.Tensor, log_vol_reference: torch.Tensor, trend: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between a template's log-volume change from a reference template
    (log_vol - log_vol_reference, (B, C)) and the expected change `trend` (B, C; NaN = not scored);
    channel 0 (background) is left out."""
    target = trend[:, 1:]
    scored = torch.isfinite(target)
    change = log_vol[:, 1:] - log_vol_reference[:, 1:]
    if not bool(scored.any()):
        return change.sum() * 0.0
    return ((change - target.nan_to_num()) ** 2)[scored].mean()


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
