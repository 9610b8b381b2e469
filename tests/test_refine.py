"""Instance optimisation (refine.py) on small synthetic volumes whose answer is known."""
from __future__ import annotations

import pytest
import torch

from atlasmorph_cli.model.layers import integrate_velocity, resize_field, warp
from atlasmorph_cli.model.losses import mse
from atlasmorph_cli.inference.refine import refine_velocity


def _slab(centre: float, shape=(16, 16, 16), sigma: float = 3.0) -> torch.Tensor:
    """A Gaussian profile along x, constant along y and z: only the x shift is observable."""
    x = torch.arange(shape[0], dtype=torch.float32)
    profile = torch.exp(-((x - centre) ** 2) / (2 * sigma**2))
    return profile.view(-1, 1, 1).expand(shape).contiguous()[None, None]


def _moved(template, vel):
    return warp(template, resize_field(integrate_velocity(vel, 7), 2.0))


def test_zero_steps_returns_the_velocity_unchanged():
    vel = torch.randn(1, 3, 8, 8, 8) * 0.1
    out = refine_velocity(vel, _slab(8.0), _slab(8.0), 0)
    assert torch.equal(out, vel)
    assert not out.requires_grad


def test_refinement_recovers_a_known_shift():
    """subject(x) = template(x + 1.5 e_x): the refined forward field points +1.5 voxels along x."""
    template, subject = _slab(8.0), _slab(6.5)
    vel = torch.zeros(1, 3, 8, 8, 8)
    before = mse(subject, _moved(template, vel)).item()
    out = refine_velocity(vel, subject, template, 100, lr=0.05, w_image=100.0, w_smooth=0.01)
    assert torch.equal(vel, torch.zeros_like(vel))  # the input is left as it was
    assert mse(subject, _moved(template, out)).item() < 0.01 * before
    fwd_x = resize_field(integrate_velocity(out, 7), 2.0)[0, 0]
    gx = torch.gradient(subject[0, 0], dim=0)[0].abs()
    edge = gx > 0.5 * gx.max()  # where the image says how far it moved
    assert abs(fwd_x[edge].mean().item() - 1.5) < 0.1
    assert fwd_x[edge].min().item() > 1.3 and fwd_x[edge].max().item() < 1.7


def test_smoothness_weight_restrains_the_field():
    template, subject = _slab(8.0), _slab(6.5)
    vel = torch.zeros(1, 3, 8, 8, 8)
    loose = refine_velocity(vel, subject, template, 30, w_smooth=0.0)
    stiff = refine_velocity(vel, subject, template, 30, w_smooth=1e4)
    assert stiff.abs().mean() < loose.abs().mean()


def test_ncc_refinement_ignores_the_subjects_intensity_scale():
    """Local NCC scores a linearly rescaled subject as well as the original, so refining against a dimmed,
    offset copy of the shifted slab still recovers the +1.5 voxel shift (what --refine-loss ncc is for)."""
    template, subject = _slab(8.0), _slab(6.5)
    out = refine_velocity(torch.zeros(1, 3, 8, 8, 8), 0.4 * subject + 0.3, template, 100, lr=0.05, w_image=1.0,
                          w_smooth=0.01, image_loss="ncc")
    fwd_x = resize_field(integrate_velocity(out, 7), 2.0)[0, 0]
    gx = torch.gradient(subject[0, 0], dim=0)[0].abs()
    edge = gx > 0.5 * gx.max()
    assert abs(fwd_x[edge].mean().item() - 1.5) < 0.25


def test_refinement_loss_names(tmp_path):
    """--refine-loss: 'ncc' (the default) is local NCC at weight 1; 'model' keeps the model's own term; others
    are errors."""
    from synthetic import small_model

    from atlasmorph_cli.errors import AtlasMorphError
    from atlasmorph_cli.inference.registration import refine_weights
    from atlasmorph_cli.model.model_file import load_model

    model = load_model(small_model(tmp_path / "m.safetensors"))
    assert refine_weights(model, "model")["image_loss"] == "mse" and refine_weights(model, "model")["w_image"] == 100.0
    assert refine_weights(model, "ncc")["image_loss"] == "ncc" and refine_weights(model, "ncc")["w_image"] == 1.0
    assert refine_weights(model) == refine_weights(model, "ncc")
    with pytest.raises(AtlasMorphError):
        refine_weights(model, "nmi")


def test_written_out_adam_gives_torch_adams_numbers():
    """refine_velocity's Adam (written out: torch.optim.Adam's construction imports torch._dynamo, ~1.2 s per
    process) takes exactly the steps torch.optim.Adam takes on the same objective."""
    from atlasmorph_cli.model.losses import gradient_l2
    from atlasmorph_cli.model.networks import velocity_to_displacements

    template, subject = _slab(8.0), _slab(6.5)
    start = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.2
    vel = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([vel], lr=0.03)
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        full, _, half = velocity_to_displacements(vel, 7, inverse=False)
        (100.0 * mse(subject, warp(template, full)) + gradient_l2(half)).backward()
        opt.step()
    out = refine_velocity(start, subject, template, 6, lr=0.03, w_image=100.0, w_smooth=1.0)
    assert torch.equal(out, vel.detach())
