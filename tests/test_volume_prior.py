"""The volume prior: the cohort's log structure volumes regressed on the attributes, and its loss term."""
from __future__ import annotations

import math

import torch

from atlasmorph_cli.model.losses import log_volumes, volume_trend_loss
from atlasmorph_cli.training.volume_prior import fit_log_volumes, log_volumes_at, structure_volumes, volume_trends


def _labels_with_class1_volume(volumes: list[int], shape=(16, 16, 16)) -> torch.Tensor:
    """One label map per subject: the first `v` voxels (in raster order) are class 1, the rest class 0."""
    out = torch.zeros(len(volumes), *shape, dtype=torch.int64)
    for i, v in enumerate(volumes):
        out[i].view(-1)[:v] = 1
    return out


def test_structure_volumes_count_voxels():
    vols = structure_volumes(_labels_with_class1_volume([5, 100]), 3)
    assert vols.tolist() == [[4091.0, 5.0, 0.0], [3996.0, 100.0, 0.0]]


def test_the_regression_recovers_a_quadratic_trend_in_age():
    """log(1 + volume) exactly quadratic in the attribute: the regression returns it (ridge is tiny)."""
    ages = torch.linspace(-1, 1, 9)[:, None]
    true_log = 6.0 + 0.8 * ages[:, 0] - 0.3 * ages[:, 0] ** 2
    vols = [round(math.exp(t) - 1) for t in true_log.tolist()]
    coef = fit_log_volumes(_labels_with_class1_volume(vols), ages, 2)
    fit = log_volumes_at(coef, ages)
    assert torch.allclose(fit[:, 1], torch.log1p(torch.tensor(vols, dtype=torch.float32)), atol=0.015)  # ridge 1e-3
    trend = volume_trends(_labels_with_class1_volume(vols), ages, torch.tensor([True]), 2)
    assert torch.allclose(trend[:, 1], fit[:, 1] - fit[4, 1], atol=1e-5)  # age 0 (index 4) is the mean here


def test_without_attributes_there_is_no_trend():
    trend = volume_trends(_labels_with_class1_volume([10, 40, 160]), torch.zeros(3, 0), torch.zeros(0, dtype=torch.bool), 2)
    assert torch.equal(trend[:, 1], torch.zeros(3))


def test_a_class_no_subject_has_is_not_scored():
    trend = volume_trends(_labels_with_class1_volume([10, 40]), torch.tensor([[0.0], [1.0]]), torch.tensor([True]), 3)
    assert torch.isnan(trend[:, 2]).all() and torch.isfinite(trend[:, :2]).all()
    logv = log_volumes(torch.rand(2, 3, 4, 4, 4))
    ref = logv.clone()
    ref[:, 1] -= trend[:, 1]  # the change from the reference is exactly the trend for class 1
    ref[:, 2] += 5.0  # class 2 is far off, but not scored
    assert float(volume_trend_loss(logv, ref, trend)) < 1e-10
    assert float(volume_trend_loss(logv, ref, torch.full_like(trend, float("nan")))) == 0.0  # nothing scored


def test_categories_are_kept_in_the_reference():
    """Age (numeric) and sex (one-hot): the reference keeps each subject's sex, so a pure sex difference in
    volume is no trend (it is the level, left to the segmentation term), while an age effect is."""
    from atlasmorph_cli.training.volume_prior import reference_attributes

    ages = torch.tensor([-1.0, -0.5, 0.5, 1.0] * 2)
    sex = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    attrs = torch.cat([ages[:, None], sex], 1)
    numeric = torch.tensor([True, False, False])
    assert torch.equal(reference_attributes(attrs, numeric), torch.cat([torch.zeros(8, 1), sex], 1))
    k = math.log(3.0) / 2  # x3 from age -1 to 1 in both sexes; males 10x the females
    vols = [round(v * math.exp(k * float(a))) - 1 for v, a in zip([100] * 4 + [1000] * 4, ages)]
    trend = volume_trends(_labels_with_class1_volume(vols), attrs, numeric, 2)[:, 1]
    assert torch.allclose(trend, k * ages, atol=0.03), trend


def test_the_trend_loss_pulls_the_template_toward_the_trend():
    """50 % class 1 everywhere = 32 voxels; the reference has 32 too; the trend asks for log 2 more."""
    logits = torch.zeros(1, 2, 4, 4, 4, requires_grad=True)
    reference = log_volumes(torch.softmax(torch.zeros(1, 2, 4, 4, 4), 1))
    trend = torch.tensor([[0.0, math.log(65 / 33)]])
    loss = volume_trend_loss(log_volumes(torch.softmax(logits, 1)), reference, trend)
    assert abs(float(loss.detach()) - math.log(65 / 33) ** 2) < 1e-6
    loss.backward()
    assert float(logits.grad[:, 1].max()) < 0  # class 1's logits must rise


def test_a_subject_missing_a_structure_does_not_bend_its_trend():
    """Volumes x3 over age, plus one old subject whose structure is nearly absent (2 voxels): it is left out
    of that structure's fit, so the trend stays the cohort's."""
    ages = torch.linspace(-1, 1, 9)[:, None]
    k = math.log(3.0) / 2
    vols = [round(300 * math.exp(k * float(a))) - 1 for a in ages[:, 0]]
    clean = volume_trends(_labels_with_class1_volume(vols), ages, torch.tensor([True]), 2)[:, 1]
    vols_cut = vols[:-1] + [2]
    cut = volume_trends(_labels_with_class1_volume(vols_cut), ages, torch.tensor([True]), 2)[:, 1]
    assert torch.allclose(clean, k * ages[:, 0], atol=0.03)
    assert torch.allclose(cut, clean, atol=0.03), (cut, clean)
