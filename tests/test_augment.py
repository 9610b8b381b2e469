"""Training augmentation: known answers on small synthetic volumes."""
import torch

from atlasmorph_cli.training.augment import AugmentSettings, augment, bias_field, renormalize, thick_slices


def _brain(shape=(16, 20, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, *shape, generator=g) * 0.8 + 0.1
    x[..., :3, :, :] = 0  # outside the brain
    return x


def test_renormalize_undoes_any_linear_scaling_inside_the_mask():
    x = _brain()
    mask = x > 0
    a = renormalize(x, mask)
    b = renormalize(3.7 * x + 12.0, mask)  # another scanner's scale and offset
    assert torch.allclose(a, b, atol=1e-5)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0
    assert torch.all(a[~mask] == 0)


def test_thick_slices_averages_along_one_axis_only():
    x = torch.arange(12.0).view(1, 1, 12, 1, 1).expand(1, 1, 12, 4, 4).contiguous()
    assert torch.equal(thick_slices(x, 0, 1), x)
    # constant along axes 1 and 2: thickening them changes nothing
    assert torch.allclose(thick_slices(x, 1, 3), x) and torch.allclose(thick_slices(x, 2, 2), x)
    y = thick_slices(x, 0, 3)
    assert not torch.allclose(y, x)
    assert abs(float(y.mean()) - float(x.mean())) < 0.2  # a resampled average keeps the level


def test_bias_field_is_smooth_and_positive():
    f = bias_field((16, 20, 16), 0.3, (4, 5, 4), torch.Generator().manual_seed(0))
    assert f.shape == (1, 1, 16, 20, 16) and float(f.min()) > 0
    step = (f[..., 1:, :, :] / f[..., :-1, :, :]).log().abs().max()
    assert float(step) < 0.3  # neighbouring voxels differ by far less than the field's range
    assert float(f.log().std()) > 0.05


def test_augment_is_seeded_keeps_the_mask_and_changes_the_image():
    x = _brain()
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.all(a[x == 0] == 0) and torch.all(a[x > 0.2] >= 0)
    assert float((a - renormalize(x, x > 0)).abs().mean()) > 0.01


def test_augment_without_perturbations_is_the_normalised_input():
    x = _brain()
    none = AugmentSettings(bias_std=0.0, gamma_std=0.0, noise_max=0.0, thick_prob=0.0)
    assert torch.allclose(augment(x, torch.Generator().manual_seed(0), none), renormalize(x, x > 0), atol=1e-6)


def test_augment_fraction_shows_some_subjects_clean():
    """fraction 0: every subject comes back untouched; 0.5 over a batch: some perturbed, some exactly clean."""
    x = torch.cat([_brain()] * 8)
    assert torch.equal(augment(x, torch.Generator().manual_seed(1), AugmentSettings(fraction=0.0)), x)
    half = augment(x, torch.Generator().manual_seed(1), AugmentSettings(fraction=0.5))
    clean = [bool(torch.equal(half[b], x[b])) for b in range(8)]
    assert 0 < sum(clean) < 8, clean
