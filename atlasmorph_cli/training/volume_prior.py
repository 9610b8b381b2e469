"""The training cohort's expected structure volumes as a function of the attributes (the volume prior).

A template for attributes a should carry the anatomy typical of subjects with a, and its structure volumes
(sums of label probabilities) are the part of that anatomy one can measure. The training subjects' volumes
on the model grid (affinely normalised to MNI space, so head size is factored out) are regressed, as
log(1 + voxels), on the quadratic basis of the attributes that the template's shape uses; the
`volume` loss term pulls the template's volumes toward that regression at each subject's attributes.
"""
from __future__ import annotations

import torch

from ..model.networks import quadratic_basis, ridge_coefficients


def structure_volumes(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, X, Y, Z) integer label maps -> (N, n_classes) voxel counts."""
    return torch.stack([torch.bincount(lab.reshape(-1).long(), minlength=n_classes)[:n_classes] for lab in labels]).double()


def expected_log_volumes(labels: torch.Tensor, attrs: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Each subject's expected log(1 + volume) per class (N, n_classes): the ridge regression of the
    subjects' own log volumes on the basis of their (encoded) attributes, evaluated at those attributes.
    NaN for a class no subject has (a cohort that labels only some structures): it is not scored."""
    basis = quadratic_basis(attrs.double())
    vols = structure_volumes(labels, n_classes)
    coef = ridge_coefficients(basis.T @ basis, basis.T @ torch.log1p(vols))
    fit = basis @ coef
    fit[:, vols.sum(0) == 0] = float("nan")
    return fit.float()
