"""Known-answer tests of the losses, the centrality term and the image-loss registry."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from atlasmorph_cli.model.layers import warp
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.model.losses import (
    IMAGE_LOSSES,
    centrality_loss,
    get_image_loss,
    gradient_l2,
    local_ncc,
    magnitude_l2,
    mse,
    soft_dice,
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


def _memory(shifts, attrs, shape=(4, 4, 4), n: int | None = None) -> SimpleNamespace:
    """The training loop's centrality memory (fields, attrs, filled) holding constant shifts."""
    n = len(shifts) if n is None else n
    mem = SimpleNamespace(fields=torch.zeros(n, 3, *shape), attrs=torch.zeros(n, attrs.shape[1]),
                          filled=torch.zeros(n, dtype=torch.bool))
    for i, s in enumerate(shifts):
        mem.fields[i] = torch.tensor(s).view(3, 1, 1, 1).expand(3, *shape)
        mem.attrs[i] = attrs[i]
        mem.filled[i] = True
    return mem


def _loss(mem, disp, attrs, self_idx, bandwidth):
    return centrality_loss(disp, attrs, mem.fields, mem.attrs, mem.filled, self_idx, bandwidth)


def test_centrality_identical_shift_gives_shift_squared():
    s = [1.0, -2.0, 0.5]
    mem = _memory([s] * 5, torch.zeros(5, 0))
    disp = torch.tensor(s).view(1, 3, 1, 1, 1).expand(1, 3, 4, 4, 4).clone().requires_grad_()
    loss = _loss(mem, disp, torch.zeros(1, 0), torch.tensor([0]), bandwidth=1.0)
    torch.testing.assert_close(loss, torch.tensor(sum(v * v for v in s)))
    loss.backward()
    assert disp.grad is not None and disp.grad.abs().sum() > 0


def test_centrality_symmetric_shifts_cancel():
    mem = _memory([[1.0, 0, 0], [-1.0, 0, 0], [7.0, 0, 0]], torch.zeros(3, 1))
    disp = torch.zeros(1, 3, 4, 4, 4)  # this is subject 2, whose stale memory entry (+7) must be left out
    loss = _loss(mem, disp, torch.zeros(1, 1), torch.tensor([2]), bandwidth=1.0)
    assert loss.item() < 1e-10
    unfilled = _memory([], torch.zeros(3, 1), n=3)
    disp[:, 0] = -1.0
    assert math.isclose(_loss(unfilled, disp, torch.zeros(1, 1), None, 1.0).item(), 1.0)


def test_centrality_far_attributes_get_no_weight():
    attrs = torch.tensor([[0.0], [100.0]])
    mem = _memory([[0.0, 0, 0], [5.0, 0, 0]], attrs)
    disp = torch.zeros(1, 3, 4, 4, 4)
    disp[:, 0] = 1.0
    near_zero = _loss(mem, disp, torch.tensor([[0.0]]), None, bandwidth=1.0)
    torch.testing.assert_close(near_zero, torch.tensor(((1.0 + 0.0) / 2) ** 2))  # the +5 entry is ignored
    near_hundred = _loss(mem, disp, torch.tensor([[100.0]]), None, bandwidth=1.0)
    torch.testing.assert_close(near_hundred, torch.tensor(((1.0 + 5.0) / 2) ** 2))  # the 0 entry is ignored


def test_centrality_is_pure_function_of_memory():
    mem = _memory([[1.0, 2.0, 3.0]], torch.ones(1, 2))
    disp = torch.zeros(2, 3, 4, 4, 4)
    loss = centrality_loss(disp, torch.ones(2, 2), mem.fields, mem.attrs, mem.filled, torch.tensor([5, 6]), 1.0)
    torch.testing.assert_close(loss, torch.tensor(14.0 / 4.0))


def test_image_loss_registry_names_and_unknown_name():
    assert get_image_loss("mse") is mse and get_image_loss("ncc") is local_ncc and set(IMAGE_LOSSES) == {"mse", "ncc"}
    with pytest.raises(AtlasMorphError, match="unknown image loss 'ssim'"):
        get_image_loss("ssim")
