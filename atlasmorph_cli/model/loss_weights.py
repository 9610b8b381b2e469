"""Default weights of the training loss terms (no torch import: the CLI reads them for --help)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossWeights:
    """Weights of the loss terms (recorded in every checkpoint and model file)."""

    # MSE on [0, 1] intensities weighted 1 / sigma^2 with sigma = 0.1 (voxelmorph's MSE convention): at
    # weight 1 the soft-Dice gradients alone left the RegNet at ~0 displacement after 175 IXI steps,
    # at 100 it deforms within 20 (measured, docs/training.md)
    image: float = 100.0  # subject vs warped template (MSE or NCC)
    image_inverse: float = 0.0  # template vs subject warped into template space (costs a full-res warp)
    seg: float = 1.0  # soft Dice: subject labels vs warped template label map
    smooth: float = 1.0  # gradient L2 of the half-resolution displacement (voxelmorph's 0.01 x the image weight)
    # kernel-weighted mean of the registration network's displacements pulled toward zero (v1 used 1). Off by
    # default: with the deformable template (v2) the template itself is refitted to the centre of its
    # sub-population, and this term would hide the mean displacement that refit reads (docs/conditioning.md)
    centrality: float = 0.0
    magnitude: float = 0.001  # plain mean squared displacement
    # the template's log-volume change with age (sums of label probabilities) vs the training cohort's regression
    # of model-space volumes on the attributes (training.volume_prior); 0 = off (v1, v2-rc2)
    volume: float = 0.0
