"""Tests of TemplateNet and RegNet: shapes, zero-initialised residual, gradients end to end."""
from __future__ import annotations

import pytest
import torch

from atlasmorph_cli.nn.layers import warp
from atlasmorph_cli.nn.losses import CentralityMemory, gradient_l2, mse, soft_dice
from atlasmorph_cli.nn.networks import RegNet, TemplateNet, velocity_to_displacements

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
    fwd, inv, fwd_half = net.velocity_to_displacements(vel)
    assert fwd.shape == inv.shape == (2, 3, *SHAPE) and fwd_half.shape == vel.shape


def test_gradients_reach_both_networks():
    torch.manual_seed(0)
    n_classes = 4
    tnet = TemplateNet(n_attrs=2, shape=SHAPE, n_classes=n_classes, width=8)
    reg = RegNet(int_steps=4)
    with torch.no_grad():  # start away from zero so every term carries gradient
        tnet.base.normal_()
        reg.flow.weight.normal_(std=1e-2)
    memory = CentralityMemory(4, (8, 8, 8), 2)
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
        + memory.loss(low, attrs, torch.tensor([0]), 1.0)
    )
    loss.backward()
    memory.update(torch.tensor([0]), low, attrs)
    assert memory.filled[0] and not memory.fields[0].requires_grad
    assert tnet.base.grad is not None and tnet.base.grad.abs().sum() > 0
    assert tnet.head.weight.grad.abs().sum() > 0  # zero-initialised head still learns
    for name, p in reg.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert reg.down[0][0].weight.grad.abs().sum() > 0 and reg.flow.weight.grad.abs().sum() > 0
