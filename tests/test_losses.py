"""Known-answer tests of the losses and the centrality terms."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atlasmorph_cli.model.layers import warp
from atlasmorph_cli.model.losses import (
    CentralityMemory,
    RunningMean,
    centrality_loss,
    gradient_l2,
    local_ncc,
    magnitude_l2,
    mse,
    running_mean_step,
    soft_dice,
    warped_soft_dice,
)


def test_mse_and_mask():
    a = torch.rand(2, 1, 6, 6, 6)
    assert mse(a, a) == 0
    b = a.clone()
    b[:, :, :3] += 2.0
    mask = torch.zeros(2, 1, 6, 6, 6)
    mask[:, :, 3:] = 1
    assert mse(a, b, mask) == 0
    torch.testing.assert_close(mse(a, b), torch.tensor(2.0))


def test_local_ncc_identical_and_rescaled():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 16, 16, 16, generator=g)
    assert abs(local_ncc(a, a).item() + 1.0) < 1e-3
    assert abs(local_ncc(a, 3.0 * a + 0.5).item() + 1.0) < 1e-3
    b = torch.rand(1, 1, 16, 16, 16, generator=g)
    assert local_ncc(a, b).item() > -0.2


def test_soft_dice_perfect_and_disjoint():
    lab = torch.zeros(1, 3, 4, 4, 4)
    lab[:, 0, :2], lab[:, 1, 2:, :2], lab[:, 2, 2:, 2:] = 1, 1, 1
    assert abs(soft_dice(lab, lab).item()) < 1e-6
    swapped = lab[:, [0, 2, 1]]
    assert abs(soft_dice(swapped, lab).item() - 1.0) < 1e-6
    assert abs(soft_dice(lab, lab, exclude_background=False).item()) < 1e-6


def test_soft_dice_ignores_classes_absent_from_the_target():
    lab = torch.zeros(1, 4, 4, 4, 4)
    lab[:, 0, :2], lab[:, 1, 2:] = 1, 1  # classes 2 and 3 absent
    probs = lab.clone()
    probs[:, 1, 2:] = 0.5  # half of class 1's mass leaks to absent class 3
    probs[:, 3, 2:] = 0.5
    # only class 1 counts: inter 0.5*32, mass 0.5*32, count 32 -> Dice 2/3
    torch.testing.assert_close(soft_dice(probs, lab), torch.tensor(1 - 2 / 3), atol=1e-5, rtol=0)
    assert soft_dice(lab[:, :1], lab[:, :1]).item() == 0.0  # background only: nothing to score


def test_gradient_and_magnitude_l2():
    const = torch.ones(1, 3, 5, 5, 5) * 3.0
    assert gradient_l2(const) == 0
    ramp = torch.zeros(1, 3, 5, 5, 5)
    ramp[:, 1] = 0.5 * torch.arange(5.0).view(5, 1, 1)  # slope 0.5 along X only
    torch.testing.assert_close(gradient_l2(ramp), torch.tensor(0.25 / 3.0 / 3.0))
    torch.testing.assert_close(magnitude_l2(const), torch.tensor(9.0))


def _memory(shifts, attrs, shape=(4, 4, 4)) -> CentralityMemory:
    mem = CentralityMemory(len(shifts), shape, attrs.shape[1])
    for i, s in enumerate(shifts):
        mem.update(torch.tensor([i]), torch.tensor(s).view(1, 3, 1, 1, 1).expand(1, 3, *shape), attrs[i : i + 1])
    return mem


def test_centrality_identical_shift_gives_shift_squared():
    s = [1.0, -2.0, 0.5]
    mem = _memory([s] * 5, torch.zeros(5, 0))
    disp = torch.tensor(s).view(1, 3, 1, 1, 1).expand(1, 3, 4, 4, 4).clone().requires_grad_()
    loss = mem.loss(disp, torch.zeros(1, 0), torch.tensor([0]), bandwidth=1.0)
    torch.testing.assert_close(loss, torch.tensor(sum(v * v for v in s)))
    loss.backward()
    assert disp.grad is not None and disp.grad.abs().sum() > 0


def test_centrality_symmetric_shifts_cancel():
    mem = _memory([[1.0, 0, 0], [-1.0, 0, 0], [7.0, 0, 0]], torch.zeros(3, 1))
    disp = torch.zeros(1, 3, 4, 4, 4)  # this is subject 2, whose stale memory entry (+7) must be left out
    loss = mem.loss(disp, torch.zeros(1, 1), torch.tensor([2]), bandwidth=1.0)
    assert loss.item() < 1e-10
    unfilled = CentralityMemory(3, (4, 4, 4), 1)
    disp[:, 0] = -1.0
    assert math.isclose(unfilled.loss(disp, torch.zeros(1, 1), None, 1.0).item(), 1.0)


def test_centrality_far_attributes_get_no_weight():
    attrs = torch.tensor([[0.0], [100.0]])
    mem = _memory([[0.0, 0, 0], [5.0, 0, 0]], attrs)
    disp = torch.zeros(1, 3, 4, 4, 4)
    disp[:, 0] = 1.0
    near_zero = mem.loss(disp, torch.tensor([[0.0]]), None, bandwidth=1.0)
    torch.testing.assert_close(near_zero, torch.tensor(((1.0 + 0.0) / 2) ** 2))  # the +5 entry is ignored
    near_hundred = mem.loss(disp, torch.tensor([[100.0]]), None, bandwidth=1.0)
    torch.testing.assert_close(near_hundred, torch.tensor(((1.0 + 5.0) / 2) ** 2))  # the 0 entry is ignored


def test_centrality_is_pure_function_of_memory():
    mem = _memory([[1.0, 2.0, 3.0]], torch.ones(1, 2))
    disp = torch.zeros(2, 3, 4, 4, 4)
    loss = centrality_loss(disp, torch.ones(2, 2), mem.fields, mem.attrs, mem.filled, torch.tensor([5, 6]), 1.0)
    torch.testing.assert_close(loss, torch.tensor(14.0 / 4.0))
    assert set(mem.state_dict()) == {"fields", "attrs", "filled"}


def test_running_mean_ramps_in_and_tracks_mean():
    rm = RunningMean((2, 2, 2), cap=4)
    disp = torch.ones(1, 3, 2, 2, 2)
    first = rm(disp)  # count 1: mean = disp, ramp 1/4 -> 3 * (1/4)^2
    torch.testing.assert_close(first, torch.tensor(3.0 / 16.0))
    for _ in range(5):
        p = rm(disp)
    torch.testing.assert_close(p, torch.tensor(3.0))
    assert rm.count.item() == 6
    mean, count, pen = running_mean_step(torch.zeros(1, 3, 2, 2, 2), 0, -disp, cap=4)
    assert count.item() == 1 and torch.equal(mean, -disp)
    rm.eval()
    rm(torch.zeros_like(disp))
    assert rm.count.item() == 6


def test_warped_soft_dice_equals_full_warp():
    g = torch.Generator().manual_seed(0)
    shape, n_classes = (10, 12, 9), 5
    probs = torch.softmax(3 * torch.randn(2, n_classes, *shape, generator=g), 1).requires_grad_()
    low = torch.randn(2, 3, 3, 3, 3, generator=g)
    disp = (3.0 * F.interpolate(low, size=shape, mode="trilinear", align_corners=True)).requires_grad_()
    labels = torch.randint(0, n_classes, (2, *shape), generator=g)
    onehot = F.one_hot(labels, n_classes).permute(0, 4, 1, 2, 3).float()
    for exclude in (True, False):
        full = soft_dice(warp(probs, disp), onehot, exclude)
        fast = warped_soft_dice(probs, disp, labels, exclude)
        torch.testing.assert_close(fast, full)
        for gf, gs in zip(torch.autograd.grad(full, (probs, disp)), torch.autograd.grad(fast, (probs, disp))):
            torch.testing.assert_close(gs, gf, atol=1e-6, rtol=1e-4)
