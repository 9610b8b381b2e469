"""The volume prior: the cohort's log structure volumes regressed on the attributes, and its loss term."""
from __future__ import annotations

import math

import torch

from atlasmorph_cli.model.losses import log_volume_loss
from atlasmorph_cli.training.volume_prior import expected_log_volumes, structure_volumes


def _labels_with_class1_volume(volumes: list[int], shape=(16, 16, 16)) -> torch.Tensor:
    """One label map per subject: the first `v` voxels (in raster order) are class 1, the rest class 0."""
    out = torch.zeros(len(volumes), *shape, dtype=torch.int64)
    for i, v in enumerate(volumes):
        out[i].view(-1)[:v] = 1
    return out


def test_structure_volumes_count_voxels():
    vols = structure_volumes(_labels_with_class1_volume([5, 100]), 3)
    assert vols.tolist() == [[4091.0, 5.0, 0.0], [3996.0, 100.0, 0.0]]


def test_expected_volumes_follow_an_exponential_trend_in_age():
    """log(1 + volume) exactly quadratic in the attribute: the regression returns it (ridge is tiny)."""
    ages = torch.linspace(-1, 1, 9)[:, None]
    true_log = 6.0 + 0.8 * ages[:, 0] - 0.3 * ages[:, 0] ** 2
    vols = [round(math.exp(t) - 1) for t in true_log.tolist()]
    fit = expected_log_volumes(_labels_with_class1_volume(vols), ages, 2)
    assert torch.allclose(fit[:, 1], torch.log1p(torch.tensor(vols, dtype=torch.float32)), atol=0.015)  # the ridge (1e-3) shrinks slightly


def test_expected_volumes_without_attributes_are_the_mean_log_volume():
    vols = [10, 40, 160]
    fit = expected_log_volumes(_labels_with_class1_volume(vols), torch.zeros(3, 0), 2)
    mean = torch.log1p(torch.tensor(vols, dtype=torch.float64)).mean()
    assert torch.allclose(fit[:, 1].double(), mean.expand(3), atol=0.01)


def test_log_volume_loss_is_zero_at_the_target_and_pulls_toward_it():
    probs = torch.zeros(1, 2, 4, 4, 4)
    probs[:, 1, :2] = 1.0  # 32 voxels of class 1
    probs[:, 0] = 1 - probs[:, 1]
    at = torch.log1p(torch.tensor([[0.0, 32.0 * 8]]))  # voxels of volume 8 each; background is not scored
    assert float(log_volume_loss(probs, at, 8.0)) < 1e-10
    logits = torch.zeros(1, 2, 4, 4, 4, requires_grad=True)
    loss = log_volume_loss(torch.softmax(logits, 1), torch.log1p(torch.tensor([[0.0, 64.0 * 8]])), 8.0)
    loss.backward()  # 50 % everywhere = 32 voxels, target 64: class 1's logits must rise
    assert float(logits.grad[:, 1].max()) < 0


def test_a_class_no_subject_has_is_not_scored():
    fit = expected_log_volumes(_labels_with_class1_volume([10, 40]), torch.zeros(2, 0), 3)
    assert torch.isnan(fit[:, 2]).all() and torch.isfinite(fit[:, :2]).all()
    probs = torch.full((2, 3, 4, 4, 4), 1 / 3)
    target = fit.clone()
    target[:, 1] = torch.log1p(probs[:, 1].sum((1, 2, 3)))
    assert float(log_volume_loss(probs, target)) < 1e-10  # class 2's mass is left alone

