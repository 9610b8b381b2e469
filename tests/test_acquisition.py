"""The acquisition blur (inference.acquisition): widths read from the header, the kernel, and the refinement
comparing a thick-slice subject with a template blurred the same way."""
from __future__ import annotations

import numpy as np
import torch

from atlasmorph_cli.geometry.space import MODEL_GRID
from atlasmorph_cli.inference.acquisition import acquisition_blur, blur_kernel, slice_blur_widths
from atlasmorph_cli.inference.refine import refine_velocity

from conftest import psr_affine


def _scaled(affine: np.ndarray, axis: int, factor: float) -> np.ndarray:
    out = np.array(affine, dtype=float)
    out[:3, axis] *= factor
    return out


def test_widths_follow_the_thick_axis_in_any_orientation():
    eye, grid = np.eye(4), MODEL_GRID.affine
    assert slice_blur_widths(np.diag([2.0, 2.0, 2.0, 1.0]), eye, grid) == (1, 1, 1)  # the model's own spacing
    assert slice_blur_widths(np.diag([1.0, 1.0, 1.0, 1.0]), eye, grid) == (1, 1, 1)  # finer: nothing to match
    assert slice_blur_widths(np.diag([1.0, 1.0, 6.0, 1.0]), eye, grid) == (1, 1, 3)  # axial 6 mm: along S-I
    # PSR (the IXI layout): voxel axis 1 runs S-I, so a 6 mm step there blurs the model's z axis
    assert slice_blur_widths(_scaled(psr_affine(), 1, 3.0), eye, grid) == (1, 1, 3)
    # sagittal 5 mm slices in LIA: voxel axis 0 runs L-R, the model's x axis (2.5 voxels -> 3)
    lia = np.array([[-5.0, 0, 0, 90], [0, 0, 1.0, -100], [0, -1.0, 0, 120], [0, 0, 0, 1]])
    assert slice_blur_widths(lia, eye, grid) == (3, 1, 1)
    # 3 mm isotropic: 1.5 model voxels on every axis
    assert slice_blur_widths(np.diag([3.0, 3.0, 3.0, 1.0]), eye, grid) == (2, 2, 2)
    # the affine counts: in a head 1.6 x larger than the template a 6 mm slice spans 1.9 model voxels, in one
    # 1.6 x smaller 4.8
    assert slice_blur_widths(np.diag([1.0, 1.0, 6.0, 1.0]), np.diag([1.6] * 3 + [1.0]), grid) == (1, 1, 2)
    assert slice_blur_widths(np.diag([1.0, 1.0, 6.0, 1.0]), np.diag([1 / 1.6] * 3 + [1.0]), grid) == (1, 1, 5)


def test_kernel_is_a_box_convolved_with_itself():
    torch.testing.assert_close(blur_kernel(3), torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]) / 9)
    torch.testing.assert_close(blur_kernel(2), torch.tensor([1.0, 2.0, 1.0]) / 4)
    torch.testing.assert_close(blur_kernel(1), torch.tensor([1.0]))


def test_blur_acts_along_its_axes_only_and_keeps_constants():
    x = torch.zeros(1, 2, 7, 7, 7)
    x[0, :, 3, 3, 3] = 9.0
    out = acquisition_blur(x, (1, 3, 1))
    assert out[0, 1, 3, :, 3].tolist() == [0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0]
    assert float(out[0, 0].sum()) == 9.0 and float(out[0, 0, 2].abs().sum()) == 0.0
    assert torch.equal(acquisition_blur(x, (1, 1, 1)), x)
    torch.testing.assert_close(acquisition_blur(torch.full((1, 1, 4, 5, 6), 2.5), (2, 3, 2)),
                               torch.full((1, 1, 4, 5, 6), 2.5))


def test_refinement_with_the_matched_blur_recovers_a_known_shift():
    """subject = thick-slice blur (z) of the template shifted 1 voxel along x: refined against the template
    blurred the same way, the field recovers the shift; against the sharp template it must also mimic the blur,
    and lands much further from it."""
    from atlasmorph_cli.model.layers import integrate_velocity, resize_field, warp

    g = torch.Generator().manual_seed(0)
    template = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 24, 24, generator=g), 5, 1, 2)
    template = (template - template.mean()) / template.std()
    shift = torch.zeros(1, 3, 24, 24, 24)
    shift[:, 0] = 1.0
    subject = acquisition_blur(warp(template, shift), (1, 1, 3))
    vel = torch.zeros(1, 3, 12, 12, 12)

    def error(blur):
        out = refine_velocity(vel, subject, template, 50, lr=0.05, w_image=1.0, w_smooth=0.01, image_loss="ncc",
                              blur=blur)
        f = resize_field(integrate_velocity(out, 7), 2.0)[0, :, 6:18, 6:18, 6:18]  # away from the edges
        return float(((f[0] - 1.0) ** 2 + f[1] ** 2 + f[2] ** 2).sqrt().mean())

    matched, sharp = error((1, 1, 3)), error((1, 1, 1))
    assert matched < 0.25 and matched < 0.6 * sharp, (matched, sharp)
