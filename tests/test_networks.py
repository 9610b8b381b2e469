"""Tests of TemplateNet and RegNet: shapes, zero-initialised residual, gradients end to end."""
from __future__ import annotations

import pytest
import torch

from atlasmorph_cli.model.layers import warp
from atlasmorph_cli.model.losses import centrality_loss, gradient_l2, mse, soft_dice
from atlasmorph_cli.model.networks import RegNet, TemplateNet, velocity_to_displacements

SHAPE = (32, 32, 32)


def test_template_starts_as_base_and_init_base():
    torch.manual_seed(0)
    net = TemplateNet(n_attrs=2, shape=SHAPE, n_classes=4, width=8)
    mean_t1 = torch.rand(*SHAPE)
    onehot = torch.zeros(4, *SHAPE)
    onehot[0, :16], onehot[1, 16:] = 1.0, 1.0
    net.init_base(mean_t1, onehot)
    out = net(torch.randn(3, 2))
    assert out.shape == (3, 5, *SHAPE)
    assert torch.equal(out, net.base.expand_as(out))
    t1, logits = TemplateNet.split(out)
    assert torch.equal(t1[0, 0], mean_t1)
    probs = torch.softmax(logits, 1)
    assert probs[0, 0, 0, 0, 0] > 0.99 and probs[0, 1, -1, 0, 0] > 0.99
    torch.testing.assert_close(torch.exp(logits).sum(1), torch.ones(3, *SHAPE))


def test_unconditional_template_is_base():
    net = TemplateNet(n_attrs=0, shape=SHAPE, n_classes=3)
    out = net(torch.zeros(2, 0))
    assert out.shape == (2, 4, *SHAPE)
    assert sum(p.numel() for p in net.parameters()) == net.base.numel()


@pytest.mark.parametrize("enc", [(0, 32, 32, 32), (16, 32, 32, 32)])
def test_regnet_shapes_and_near_zero_start(enc):
    net = RegNet(enc=enc)
    vel = net(torch.rand(2, 1, *SHAPE), torch.rand(1, 1, *SHAPE))
    assert vel.shape == (2, 3, 16, 16, 16)
    assert vel.abs().max() < 1e-2
    fwd, inv, fwd_half = velocity_to_displacements(vel)
    assert fwd.shape == inv.shape == (2, 3, *SHAPE) and fwd_half.shape == vel.shape


def test_gradients_reach_both_networks():
    torch.manual_seed(0)
    n_classes = 4
    tnet = TemplateNet(n_attrs=2, shape=SHAPE, n_classes=n_classes, width=8)
    reg = RegNet()
    with torch.no_grad():  # start away from zero so every term carries gradient
        tnet.base.normal_()
        reg.flow.weight.normal_(std=1e-2)
    mem_fields, mem_attrs, mem_filled = torch.zeros(4, 3, 8, 8, 8), torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool)
    attrs, subject = torch.randn(1, 2), torch.rand(1, 1, *SHAPE)
    onehot = torch.nn.functional.one_hot(torch.randint(0, n_classes, (1, *SHAPE)), n_classes)
    onehot = onehot.permute(0, 4, 1, 2, 3).float()

    t1, logits = TemplateNet.split(tnet(attrs))
    vel = reg(subject, t1)
    fwd, _, fwd_half = velocity_to_displacements(vel, 4)
    low = torch.nn.functional.avg_pool3d(fwd_half, 2)
    loss = (
        mse(warp(t1, fwd), subject)
        + soft_dice(warp(torch.softmax(logits, 1), fwd), onehot)
        + gradient_l2(vel)
        + centrality_loss(low, attrs, mem_fields, mem_attrs, mem_filled, torch.tensor([0]), 1.0)
    )
    loss.backward()
    assert tnet.base.grad is not None and tnet.base.grad.abs().sum() > 0
    assert tnet.head.weight.grad.abs().sum() > 0  # zero-initialised head still learns
    for name, p in reg.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert reg.down[0][0].weight.grad.abs().sum() > 0 and reg.flow.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- deformable template (v2)
def _ramp_base(net: TemplateNet) -> None:
    """A base whose T1 is a ramp along x: a shift along x is then a known change of intensity."""
    with torch.no_grad():
        net.base.zero_()
        net.base[0, 0] = torch.arange(SHAPE[0], dtype=torch.float32).view(-1, 1, 1).expand(*SHAPE)


@pytest.mark.parametrize("n_attrs", [0, 2])
def test_deformable_template_starts_at_the_identity(n_attrs):
    torch.manual_seed(0)
    plain = TemplateNet(n_attrs, SHAPE, n_classes=4, width=8)
    deform = TemplateNet(n_attrs, SHAPE, n_classes=4, width=8, deform=True)
    missing, unexpected = deform.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["attr_hi", "attr_lo", "shape_coef"]
    with torch.no_grad():
        deform.base.normal_()
        plain.base.copy_(deform.base)
    a = torch.randn(3, n_attrs)
    torch.testing.assert_close(deform(a), plain(a), atol=1e-4, rtol=0)  # a warp by zero resamples at the voxels
    vel = deform.forward_train(a)["vel"]
    assert vel.shape == (3, 3, 16, 16, 16) and float(vel.abs().max()) == 0.0


def test_constant_template_velocity_shifts_the_base():
    net = TemplateNet(0, SHAPE, n_classes=3, deform=True, int_steps=5)
    _ramp_base(net)
    with torch.no_grad():  # 0.75 quarter-resolution voxels along x = 3 model voxels (a translation: exp(v) = v)
        net.shape_coef[0, 0] = 0.75
    t1 = TemplateNet.split(net(torch.zeros(1, 0)))[0][0, 0]
    expect = net.base[0, 0, 8:24, 8:24, 8:24] + 3.0  # pull-back: out(x) = base(x + 3)
    torch.testing.assert_close(t1[8:24, 8:24, 8:24], expect, atol=1e-4, rtol=0)
    out = net.forward_train(torch.zeros(2, 0))
    torch.testing.assert_close(out["t1"][0, 0, 8:24, 8:24, 8:24], expect, atol=1e-4, rtol=0)
    assert out["vel"].shape == (2, 3, 16, 16, 16)


def test_fit_shape_recovers_a_quadratic_trend_and_clamps_outside_the_range():
    """Targets that are a known function [1, a, a^2] @ C of the attributes give back C exactly; beyond the
    training range the template holds the deformation of the range's end."""
    gen = torch.Generator().manual_seed(0)
    net = TemplateNet(1, SHAPE, n_classes=3, width=8, deform=True)
    coef = torch.randn(3, 3, 8, 8, 8, generator=gen)
    attrs = torch.linspace(-1.5, 1.5, 40).view(-1, 1)
    targets = torch.einsum("bk,kcxyz->bcxyz", torch.cat([torch.ones_like(attrs), attrs, attrs**2], 1), coef)
    net.set_attribute_range(attrs)
    net.fit_shape(*net.shape_normal_equations(attrs, targets), ridge=1e-9)
    torch.testing.assert_close(net.shape_coef, coef, atol=1e-4, rtol=0)
    expect = torch.einsum("k,kcxyz->cxyz", torch.tensor([1.0, 0.5, 0.25]), coef)[None]  # a = 0.5
    torch.testing.assert_close(net.velocity_quarter(torch.tensor([[0.5]])), expect, atol=1e-4, rtol=0)
    torch.testing.assert_close(net.velocity_quarter(torch.tensor([[4.0]])), net.velocity_quarter(torch.tensor([[1.5]])))


def test_fit_shape_of_noisy_subjects_is_their_conditional_mean():
    """Two groups of subjects (attribute -1 and +1) with noisy warps: each group's template velocity is the
    mean of its members' (the template is the centre of its sub-population)."""
    gen = torch.Generator().manual_seed(1)
    net = TemplateNet(1, SHAPE, n_classes=3, width=8, deform=True)
    attrs = torch.tensor([[-1.0]] * 10 + [[1.0]] * 10)
    targets = torch.randn(20, 3, 8, 8, 8, generator=gen)
    net.set_attribute_range(attrs)
    net.fit_shape(*net.shape_normal_equations(attrs, targets))
    for a, group in ((-1.0, targets[:10]), (1.0, targets[10:])):
        torch.testing.assert_close(net.velocity_quarter(torch.tensor([[a]]))[0], group.mean(0), atol=2e-3, rtol=0)
