"""Training-time intensity and resolution augmentation of model-space subjects (what differs between sites).

The registration network sees the augmented subject while every loss is scored against the clean one,
so it learns a warp that does not depend on bias fields, contrast, noise or slice thickness. Each draw
uses the training generator, whose state is checkpointed, so a resumed run repeats its augmentations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random perturbations (each drawn per subject and step)."""

    bias_std: float = 0.3  # log-amplitude of a smooth multiplicative bias field
    bias_points: tuple[int, int, int] = (4, 5, 4)  # control points of the bias field per axis
    gamma_std: float = 0.25  # log of the gamma exponent
    noise_max: float = 0.05  # Gaussian noise sd, uniform in [0, noise_max] of the [0, 1] range
    thick_prob: float = 0.5  # probability of a thick-slice (or blurred) acquisition
    thick_max: int = 3  # slice thickness up to this many model voxels along one random axis
    fraction: float = 1.0  # probability that a subject is perturbed at all (the rest are shown clean)


def _uniform(gen: torch.Generator, n: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def bias_field(shape: tuple[int, int, int], std: float, points: tuple[int, int, int],
               gen: torch.Generator) -> torch.Tensor:
    """A smooth positive field exp(s), s trilinearly upsampled from random control points (1,1,X,Y,Z)."""
    low = torch.randn(1, 1, *points, generator=gen) * std
    return torch.exp(F.interpolate(low, size=shape, mode="trilinear", align_corners=True))


def thick_slices(x: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """Average `factor` voxels along `axis` and upsample back: a thicker acquisition resampled to the grid."""
    if factor <= 1:
        return x
    kernel = [1, 1, 1]
    kernel[axis] = factor
    size = x.shape[2:]
    low = F.avg_pool3d(x, kernel, stride=kernel, ceil_mode=True)
    return F.interpolate(low, size=size, mode="trilinear", align_corners=False)


def renormalize(x: torch.Tensor, mask: torch.Tensor, lo: float = 0.01, hi: float = 0.99) -> torch.Tensor:
    """Map the [lo, hi] quantiles inside `mask` to [0, 1], clip, zero outside (as intensity.normalize)."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        inside = mask[b]
        vals = x[b][inside]
        if vals.numel() == 0:
            continue
        q = torch.quantile(vals, torch.tensor([lo, hi], dtype=vals.dtype))
        scale = (q[1] - q[0]).clamp_min(1e-6)
        out[b] = torch.where(inside, ((x[b] - q[0]) / scale).clamp(0, 1), torch.zeros_like(x[b]))
    return out


@torch.no_grad()
def augment(x: torch.Tensor, gen: torch.Generator, s: AugmentSettings = AugmentSettings()) -> torch.Tensor:
    """A perturbed copy of subjects x (B,1,X,Y,Z; [0, 1] inside the brain, 0 outside), renormalised.

    Order follows the acquisition: anatomy x bias field, slice thickness, contrast (gamma), noise, then
    the same robust rescaling the tool applies to every input.
    """
    mask = x > 0
    out = []
    for b in range(x.shape[0]):
        if s.fraction < 1.0 and float(_uniform(gen)) >= s.fraction:  # no draw at 1: earlier runs repeat exactly
            out.append(None)
            continue
        v = x[b : b + 1].clamp_min(0)
        v = v * bias_field(tuple(v.shape[2:]), s.bias_std, s.bias_points, gen)
        if float(_uniform(gen)) < s.thick_prob:
            axis = int(torch.randint(3, (1,), generator=gen))
            factor = int(torch.randint(2, s.thick_max + 1, (1,), generator=gen))
            v = thick_slices(v, axis, factor)
        gamma = float(torch.exp(torch.randn(1, generator=gen) * s.gamma_std))
        v = v.clamp_min(0) ** gamma
        v = v + torch.randn(v.shape, generator=gen) * float(_uniform(gen)) * s.noise_max * float(v.max())
        out.append(renormalize(v, mask[b : b + 1]))
    return torch.cat([x[b : b + 1] if v is None else v for b, v in enumerate(out)])
