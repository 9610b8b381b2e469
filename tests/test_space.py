"""The model grid and resampling between grids, checked on volumes with a known answer."""
from __future__ import annotations

import numpy as np

from atlasmorph_cli.geometry.space import MODEL_GRID, Grid, resample, resample_labels
from conftest import psr_affine


def test_model_grid_is_divisible_by_16_and_covers_mni_brain():
    assert all(n % 16 == 0 for n in MODEL_GRID.shape)
    lo = MODEL_GRID.affine @ np.array([0, 0, 0, 1.0])
    hi = MODEL_GRID.affine @ np.array([*(np.array(MODEL_GRID.shape) - 1), 1.0])
    assert np.all(lo[:3] <= [-70, -106, -69]) and np.all(hi[:3] >= [71, 73, 81])


def _cube_in_native(center_world, half=3):
    """A label cube in a PSR 2 mm native grid, centred on a world point."""
    aff = psr_affine(origin=(-61.0, 81.0, -71.0))  # odd mm like the model grid: voxel centres coincide
    shape = (80, 80, 70)
    ijk = np.round(np.linalg.solve(aff, [*center_world, 1.0])[:3]).astype(int)
    lab = np.zeros(shape, np.int16)
    lab[tuple(slice(c - half, c + half + 1) for c in ijk)] = 7
    return lab, aff


def test_label_cube_moved_by_known_affine_lands_on_the_voxel():
    lab, aff = _cube_in_native((11.0, -21.0, 7.0))
    # world map (model -> native): a translation of (+8, -4, +6) mm
    world = np.eye(4)
    world[:3, 3] = (8.0, -4.0, 6.0)
    out = resample_labels(lab, aff, MODEL_GRID, world=world)
    got = np.argwhere(out == 7).mean(0)
    # the cube sits at native world (11,-21,7) = model world + shift -> model world (3,-17,1)
    expected = np.linalg.solve(MODEL_GRID.affine, [3.0, -17.0, 1.0, 1.0])[:3]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (out == 7).sum() == (lab == 7).sum()


def test_trilinear_roundtrip_native_model_native():
    aff = psr_affine(origin=(-60.0, 80.0, -70.0))
    smooth = np.fromfunction(lambda i, j, k: np.sin(i / 9) + np.cos(j / 7) + k / 50, (80, 80, 70)).astype(np.float32)
    native = Grid((80, 80, 70), aff)
    model = resample(smooth, aff, MODEL_GRID)
    back = resample(model, MODEL_GRID.affine, native)
    inner = (slice(20, 60), slice(20, 60), slice(20, 50))
    np.testing.assert_allclose(back[inner], smooth[inner], atol=0.02)


def test_nearest_and_partial_volume_agree_on_integer_shift():
    lab = np.zeros((20, 20, 20), np.int16)
    lab[5:9, 6:12, 3:15] = 3
    lab[10:14, 6:12, 3:15] = 5
    grid = Grid((20, 20, 20), np.eye(4))
    world = np.eye(4)
    world[:3, 3] = (1, -2, 0)
    pv = resample_labels(lab, np.eye(4), grid, world=world)
    nn = resample_labels(lab, np.eye(4), grid, world=world, partial_volume=False)
    np.testing.assert_array_equal(pv, nn)
    np.testing.assert_array_equal(pv[4:8, 8:14, 3:15], 3)
