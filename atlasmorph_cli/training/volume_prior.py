"""The training cohort's structure volumes as a function of the attributes (the volume prior).

A template for attributes a should carry the anatomy typical of subjects with a, and its structure volumes
(sums of label probabilities) are the part of that anatomy one can measure. The training subjects' volumes
on the model grid (affinely normalised to MNI space, so head size is factored out) are regressed, as
log(1 + voxels), on the quadratic basis of the attributes that the template's shape uses. The `volume`
loss term asks the template for the cohort's *trend*: its log volumes at a minus those of the template at
a's reference (the same categories, numeric attributes at their training mean: a point inside the data,
unlike a mix of categories, where a quadratic basis would extrapolate) must equal the regression's
difference between the two. The level itself is left to the segmentation term (a soft template's summed
probabilities need not equal the subjects' hard-label volumes; pulling the level costs Dice,
docs/conditioning.md).
"""
from __future__ import annotations

import torch

from ..model.networks import quadratic_basis, ridge_coefficients


def structure_volumes(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, X, Y, Z) integer label maps -> (N, n_classes) voxel counts."""
    return torch.stack([torch.bincount(lab.reshape(-1).long(), minlength=n_classes)[:n_classes] for lab in labels]).double()


def fit_log_volumes(labels: torch.Tensor, attrs: torch.Tensor, n_classes: int, keep_above: float = 0.05) -> torch.Tensor:
    """(K, n_classes) coefficients of the ridge regression of the subjects' log(1 + volume) on the basis of
    their (encoded) attributes, one regression per class; NaN for a class absent from at least half the
    subjects (a cohort labelling only some structures: its median volume is 0). A subject whose structure is smaller than `keep_above` x the cohort's median
    (cut by the field of view, or missing from its label map: IXI has left cerebella of 2 voxels) is left
    out of that structure's fit: on a log scale it would bend the trend for every age."""
    basis = quadratic_basis(attrs.double())
    vols = structure_volumes(labels, n_classes)
    logv = torch.log1p(vols)
    coef = torch.full((basis.shape[1], n_classes), float("nan"), dtype=torch.float64)
    for c in range(n_classes):
        median = vols[:, c].median()
        if float(median) <= 0:
            continue  # absent from most subjects: not scored
        keep = vols[:, c] >= keep_above * median
        b = basis[keep]
        coef[:, c] = ridge_coefficients(b.T @ b, b.T @ logv[keep, c : c + 1])[:, 0]
    return coef


def log_volumes_at(coef: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """The regression's expected log(1 + volume) per class (B, n_classes) at encoded attributes (B, A)."""
    return (quadratic_basis(attrs.double()) @ coef).float()


def reference_attributes(attrs: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
    """Encoded attributes (B, A) with the numeric columns (`numeric`, (A,) bool) at the training mean (0)."""
    return attrs * (~numeric).to(attrs.dtype)


def volume_trends(labels: torch.Tensor, attrs: torch.Tensor, numeric: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Each subject's expected log-volume change from its reference attributes (N, n_classes; NaN: not scored)."""
    coef = fit_log_volumes(labels, attrs, n_classes)
    return log_volumes_at(coef, attrs) - log_volumes_at(coef, reference_attributes(attrs, numeric))
