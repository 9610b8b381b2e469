"""Known-answer tests of the spatial layers (warping, integration, composition, resizing, Jacobians)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atlasmorph_cli.model.layers import (
    box_mean,
    identity_grid,
    integrate_velocity,
    jacobian_determinant,
    resize_field,
    sample_at,
    splat_weights,
    warp,
)


def smooth_field(shape, amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random (1, 3, *shape) field: low-res noise upsampled trilinearly."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 3, 4, 4, 4, generator=g)
    field = F.interpolate(low, size=shape, mode="trilinear", align_corners=True)
    return amplitude * field / field.abs().amax()


def test_identity_grid_indexes_voxels():
    g = identity_grid((3, 4, 5))
    assert g.shape == (3, 3, 4, 5)
    assert g[0, 2, 1, 3] == 2 and g[1, 2, 1, 3] == 1 and g[2, 2, 1, 3] == 3


def test_zero_velocity_is_identity():
    vol = torch.rand(2, 4, 8, 10, 12)
    vel = torch.zeros(2, 3, 8, 10, 12)
    disp = integrate_velocity(vel, 7)
    assert torch.count_nonzero(disp) == 0
    torch.testing.assert_close(warp(vol, disp), vol, atol=1e-5, rtol=0)


def test_integer_shift_moves_label_cube_exactly():
    lab = torch.zeros(1, 1, 12, 12, 12)
    lab[:, :, 2:5, 3:6, 4:7] = 7.0
    disp = torch.zeros(1, 3, 12, 12, 12)
    disp[:, 0], disp[:, 1], disp[:, 2] = -2.0, 1.0, -3.0  # out(x) = lab(x + d)
    out = warp(lab, disp, mode="nearest", padding_mode="zeros")
    expected = torch.zeros_like(lab)
    expected[:, :, 4:7, 2:5, 7:10] = 7.0
    assert torch.equal(out, expected)


def test_sample_at_channels_and_batch_broadcast():
    vol = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).view(1, 2, 4, 5, 6)
    coords = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1).expand(3, 3, 1, 1, 1)
    out = sample_at(vol, coords)
    assert out.shape == (3, 2, 1, 1, 1)
    assert torch.allclose(out[:, :, 0, 0, 0], vol[0, :, 1, 2, 3].expand(3, 2))
    mid = sample_at(vol, torch.tensor([1.5, 2.0, 3.0]).view(1, 3, 1, 1, 1))
    assert torch.allclose(mid[0, :, 0, 0, 0], 0.5 * (vol[0, :, 1, 2, 3] + vol[0, :, 2, 2, 3]))


def test_integrate_then_compose_inverse_is_near_zero():
    shape = (24, 24, 24)
    vel = smooth_field(shape, 2.0)
    fwd, inv = integrate_velocity(vel, 7), integrate_velocity(-vel, 7)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert fwd.abs().max() > 1.0
    # phi_a o phi_b as a displacement: x -> x + b(x) + a(x + b(x))
    for err in ((inv + warp(fwd, inv))[inner].abs(), (fwd + warp(inv, fwd))[inner].abs()):
        assert err.mean() < 0.01 and err.max() < 0.15  # trilinear interpolation error only


def test_resize_field_doubles_vectors():
    disp = torch.ones(1, 3, 5, 6, 7) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    up = resize_field(disp, 2.0)
    assert up.shape == (1, 3, 10, 12, 14)
    torch.testing.assert_close(up, 2.0 * torch.ones_like(up) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1))
    torch.testing.assert_close(resize_field(up, shape=(5, 6, 7)), disp)
    assert resize_field(disp, (10, 6, 7))[0, :, 0, 0, 0].tolist() == [2.0, -2.0, 0.5]


def test_resize_field_keeps_the_map_consistent():
    """A linear map x -> 1.1 x stays x -> 1.1 x (voxel-extent convention) after resizing x2."""
    half = (8, 8, 8)
    centre = identity_grid(half) + 0.5  # voxel-extent coordinates
    disp = (0.1 * (centre - 4.0)).unsqueeze(0)
    up = resize_field(disp, 2.0)
    centre_full = identity_grid((16, 16, 16)) + 0.5
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))  # the outer half voxel is clamped
    torch.testing.assert_close(up[0][inner], (0.1 * (centre_full - 8.0))[inner], atol=1e-5, rtol=0)


def test_jacobian_of_identity_and_scaling():
    shape = (6, 7, 8)
    assert torch.allclose(jacobian_determinant(torch.zeros(2, 3, *shape)), torch.ones(2, *shape))
    scale = (0.1 * identity_grid(shape)).unsqueeze(0)
    torch.testing.assert_close(jacobian_determinant(scale), torch.full((1, *shape), 1.331), atol=1e-5, rtol=0)


def test_jacobian_of_integrated_velocity_is_positive():
    vel = smooth_field((20, 20, 20), 3.0, seed=4)
    jac = jacobian_determinant(integrate_velocity(vel, 7))
    assert jac.min() > 0
    assert math.isclose(jac.mean().item(), 1.0, abs_tol=0.1)


def _brute_box_mean(x: torch.Tensor, window: int, border: str) -> torch.Tensor:
    """Box means by direct summation over every box, in float64 (the definition, slowly)."""
    r = window // 2
    v = x.double()
    X, Y, Z = v.shape[-3:]
    out = torch.zeros_like(v)
    for i in range(X):
        for j in range(Y):
            for k in range(Z):
                box = v[..., max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1, max(k - r, 0):k + r + 1]
                count = box.shape[-1] * box.shape[-2] * box.shape[-3] if border == "shrink" else window**3
                out[..., i, j, k] = box.sum((-1, -2, -3)) / count
    return out


def test_box_mean_shrink_and_zero_borders_match_the_definition():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 7, 9, 6, generator=g) * 100.0 + 50.0  # large values: rounding would show
    for window in (1, 3, 5):  # (average pooling, like the 3-D form before, needs every side >= the window)
        for border in ("shrink", "zero"):
            got = box_mean(x, window, border=border)
            assert got.shape == x.shape and got.dtype == x.dtype
            assert torch.allclose(got.double(), _brute_box_mean(x, window, border), rtol=1e-5, atol=1e-4)


def test_box_mean_shrink_equals_3d_average_pooling_with_gradients():
    """The separable form gives avg_pool3d's numbers (float tolerance), unbatched input and gradient included."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 2, 12, 10, 11, generator=g, requires_grad=True)
    ref = F.avg_pool3d(x, 9, stride=1, padding=4, count_include_pad=False)
    got = box_mean(x, 9)
    assert torch.allclose(got, ref, atol=1e-6)
    w = torch.rand(ref.shape, generator=g)
    (gx_ref,) = torch.autograd.grad((ref * w).sum(), x)
    (gx,) = torch.autograd.grad((got * w).sum(), x)
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    assert torch.allclose(box_mean(x[0], 5), F.avg_pool3d(x[0], 5, stride=1, padding=2, count_include_pad=False),
                          atol=1e-6)


def test_splat_weights_of_one_point_are_its_trilinear_weights():
    """A point at (1.5, 2, 0.25) gives its 8 corners 0.5 x 1 x (0.75 or 0.25); a point outside gives nothing."""
    w = splat_weights(torch.tensor([[1.5, 9.0], [2.0, 0.0], [0.25, 0.0]]), (4, 5, 3))
    expect = torch.zeros(4, 5, 3)
    expect[1, 2, 0] = expect[2, 2, 0] = 0.5 * 0.75
    expect[1, 2, 1] = expect[2, 2, 1] = 0.5 * 0.25
    torch.testing.assert_close(w, expect)


def test_splat_weights_is_the_adjoint_of_sampling_with_zero_padding():
    """sum_n sample_at(v, c)[n] = sum_x v(x) W(x) for any volume v, with points inside, on the border and
    outside the grid (a running total added over two calls)."""
    shape = (6, 7, 5)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(3, 500, generator=g, dtype=torch.float64) * torch.tensor([9.0, 10.0, 8.0]).view(3, 1).double()
    coords -= 1.5
    coords[:, :4] = torch.tensor([[0.0, 5.0, -1.0, 5.5], [0.0, 6.0, 3.0, 3.0], [0.0, 4.0, 2.0, 2.0]]).double()
    v = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    sampled = sample_at(v, coords.view(1, 3, -1, 1, 1), padding_mode="zeros").sum()
    total = splat_weights(coords[:, :250], shape)
    splat_weights(coords[:, 250:], shape, out=total)
    torch.testing.assert_close((v[0, 0] * total).sum(), sampled)
