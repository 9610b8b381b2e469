"""The perturbations of benchmarks/ood_benchmark.py do what they claim (synthetic volumes, no ANTs, no data)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from atlasmorph_cli import labels

import ood_benchmark as ood  # benchmarks/, on pytest's pythonpath (pyproject.toml)
from conftest import psr_affine


def _world(affine, ijk):
    return (np.asarray(affine) @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


def _centroid_world(mask, affine):
    return _world(affine, np.argwhere(mask).mean(0))


# ------------------------------------------------------------------------------------ bias field
def test_bias_field_bounded_smooth_deterministic():
    shape = (40, 48, 36)
    f = ood.smooth_bias_field(shape, 0.4, seed=3)
    assert f.shape == shape and f.dtype == np.float32
    assert f.min() == pytest.approx(0.6, abs=1e-6) and f.max() == pytest.approx(1.4, abs=1e-6)  # both bounds reached
    # smooth: neighbouring voxels differ by a small fraction of the range (at most 2 half-periods per axis)
    for ax in range(3):
        assert np.abs(np.diff(f, axis=ax)).max() < 0.1
    # and low-frequency: a 3-voxel box average changes it very little
    from scipy.ndimage import uniform_filter

    assert np.abs(uniform_filter(f, 3, mode="nearest") - f)[2:-2, 2:-2, 2:-2].max() < 0.01
    np.testing.assert_array_equal(f, ood.smooth_bias_field(shape, 0.4, seed=3))
    assert not np.allclose(f, ood.smooth_bias_field(shape, 0.4, seed=4))
    g = ood.smooth_bias_field(shape, 0.1, seed=3)
    assert g.min() >= 0.9 - 1e-6 and g.max() <= 1.1 + 1e-6
    # with a mask the full range is reached inside it, and the field stays bounded outside
    mask = np.zeros(shape, bool)
    mask[10:30, 12:36, 8:28] = True
    h = ood.smooth_bias_field(shape, 0.4, seed=3, mask=mask)
    assert h[mask].min() == pytest.approx(0.6, abs=1e-6) and h[mask].max() == pytest.approx(1.4, abs=1e-6)
    assert h.min() >= 0.6 - 1e-6 and h.max() <= 1.4 + 1e-6
    assert np.abs(np.diff(h[mask].reshape(20, 24, 20), axis=0)).max() < 0.15


def test_seed_is_stable_and_specific():
    a = ood.seed_for(0, "IXI034-HH-1260", "bias40")
    assert a == ood.seed_for(0, "IXI034-HH-1260", "bias40")
    assert a != ood.seed_for(0, "IXI092-HH-1436", "bias40") and a != ood.seed_for(1, "IXI034-HH-1260", "bias40")


def test_bias_perturbation_multiplies_inside_mask():
    rng = np.random.default_rng(0)
    brain = rng.uniform(10, 100, (20, 22, 18)).astype(np.float32)
    mask = np.zeros(brain.shape, bool)
    mask[3:17, 4:18, 3:15] = True
    brain *= mask
    idx = mask.astype(np.uint8)
    out, m, i, aff = ood.perturb(brain, mask, idx, psr_affine(), ood.PERTURBATIONS["bias40"], seed=5)
    ratio = out[mask] / brain[mask]
    assert ratio.min() == pytest.approx(0.6, abs=1e-5) and ratio.max() == pytest.approx(1.4, abs=1e-5)  # in the brain
    assert np.all(out[~mask] == 0)
    assert m is mask or np.array_equal(m, mask)
    np.testing.assert_array_equal(i, idx)


# ------------------------------------------------------------------------------------ gamma
@pytest.mark.parametrize("gamma", [0.6, 1.6])
def test_gamma_monotone_keeps_ends(gamma):
    data = np.linspace(0.0, 250.0, 8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    mask = np.ones(data.shape, bool)
    mask[0, 0, :3] = False  # outside the mask: zero
    out = ood.gamma_change(data, mask, gamma)
    order = np.argsort(data[mask])
    assert np.all(np.diff(out[mask][order]) >= 0)  # monotone
    assert out[mask].max() == pytest.approx(250.0)  # the maximum stays
    assert np.all(out[~mask] == 0)
    inner = mask & (data > 0) & (data < 250)
    if gamma < 1:  # brighter in between
        assert np.all(out[inner] > data[inner])
    else:
        assert np.all(out[inner] < data[inner])


# ------------------------------------------------------------------------------------ conform
def test_conform_affine_is_lia_1mm_centred():
    aff = psr_affine()
    shape = (120, 120, 90)
    c = ood.conform_affine(aff, shape)
    assert nib.aff2axcodes(c) == ("L", "I", "A")
    np.testing.assert_allclose(np.sqrt((c[:3, :3] ** 2).sum(0)), 1.0)
    # FreeSurfer's c_ras: the input's voxel shape/2 and the conformed voxel 128 are the same world point
    np.testing.assert_allclose(_world(c, (128, 128, 128)), _world(aff, np.array(shape) / 2.0))


def _blob_subject(shape=(40, 44, 36), zoom=2.0):
    """A PSR 2 mm brain: a bright ellipsoid (cerebral white matter) with a dark off-centre blob
    (index 5) at a known voxel position, so world positions of anatomy can be followed."""
    aff = psr_affine(origin=(-30.0, 40.0, -35.0), zoom=zoom)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2.0
    mask = ((ii - c[0]) / 15) ** 2 + ((jj - c[1]) / 17) ** 2 + ((kk - c[2]) / 13) ** 2 <= 1
    blob = ((ii - 26) ** 2 + (jj - 16) ** 2 + (kk - 12) ** 2) <= 9
    index = np.zeros(shape, np.uint8)
    wm = 1 + [x.name for x in labels.STRUCTURES].index("Left-Cerebral-White-Matter")
    index[mask] = wm
    index[blob & mask] = 5
    brain = np.where(mask, 80.0, 0.0).astype(np.float32)
    brain[blob & mask] = 30.0
    return brain, mask, index, aff, blob & mask


def test_conform_grid_orientation_world_and_scaling():
    brain, mask, index, aff, blob = _blob_subject()
    img, m, idx, caff = ood.conform(brain, mask, index, aff)
    assert img.shape == (256, 256, 256) and img.dtype == np.uint8
    assert nib.aff2axcodes(caff) == ("L", "I", "A")
    np.testing.assert_allclose(np.sqrt((caff[:3, :3] ** 2).sum(0)), 1.0)
    # the same anatomy sits at the same world position: the blob's centroid and the brain's
    np.testing.assert_allclose(_centroid_world(idx == 5, caff), _centroid_world(blob, aff), atol=0.6)
    np.testing.assert_allclose(_centroid_world(m, caff), _centroid_world(mask, aff), atol=0.6)
    # a world point: the value at a voxel of the input == the value at the same world point of the output
    for ijk in [(26, 16, 12), (20, 22, 18), (10, 30, 20)]:
        w = _world(aff, ijk)
        out_ijk = np.rint(np.linalg.solve(caff, np.r_[w, 1.0])[:3]).astype(int)
        assert idx[tuple(out_ijk)] == index[ijk]
    # volumes kept (1 mm^3 voxels vs 8 mm^3 voxels)
    assert m.sum() == pytest.approx(mask.sum() * 8, rel=0.03)
    # white matter median scaled to 110, uint8, zero outside the mask
    wm = np.isin(idx, ood.WM_INDICES) & m
    assert np.median(img[wm]) == pytest.approx(110, abs=1)
    centre = np.rint(np.linalg.solve(caff, np.r_[_world(aff, (26, 16, 12)), 1.0])[:3]).astype(int)
    assert img[tuple(centre)] == pytest.approx(30 * 110 / 80, abs=1)  # the dark blob, scaled like the rest
    assert np.all(img[~m] == 0)


def test_conform_float_control_keeps_intensities():
    brain, mask, index, aff, _ = _blob_subject()
    params = {**ood.PERTURBATIONS["conform-float"], "size": 128}  # a smaller grid keeps the test fast
    img, m, idx, caff = ood.perturb(brain, mask, index, aff, params, seed=0)
    assert img.dtype == np.float32 and img.shape == (128, 128, 128)
    assert np.median(img[np.isin(idx, ood.WM_INDICES) & m]) == pytest.approx(80.0, abs=0.5)


def test_conform_works_from_any_orientation():
    # the same subject stored RAS 2 mm (flipped axes) gives the same conformed volume
    brain, mask, index, aff, _ = _blob_subject()
    img = nib.Nifti1Image(brain, aff)
    ras = nib.as_closest_canonical(img)
    tr = nib.orientations.ornt_transform(nib.io_orientation(aff), nib.io_orientation(ras.affine))
    idx_ras = nib.orientations.apply_orientation(index, tr)
    mask_ras = nib.orientations.apply_orientation(mask, tr)
    a = ood.conform(brain, mask, index, aff, size=128)  # (a smaller grid keeps the test fast)
    b = ood.conform(np.asarray(ras.dataobj), mask_ras, idx_ras, ras.affine, size=128)
    assert nib.aff2axcodes(b[3]) == ("L", "I", "A")
    # FreeSurfer's c_ras is the input's voxel shape/2, which depends on the storage order (here one input
    # voxel apart); the grids may differ by a whole-voxel shift, the anatomy stays at the same world position
    np.testing.assert_allclose(a[3][:3, :3], b[3][:3, :3])
    shift = a[3][:3, 3] - b[3][:3, 3]
    np.testing.assert_allclose(shift, np.rint(shift), atol=1e-6)
    # (1 mm points half-way between 2 mm voxel centres are nearest-neighbour ties, broken by storage order)
    for k in (5, ood.WM_INDICES[0]):
        np.testing.assert_allclose(_centroid_world(a[2] == k, a[3]), _centroid_world(b[2] == k, b[3]), atol=0.6)
    assert int(a[0].sum(dtype=np.int64)) == pytest.approx(int(b[0].sum(dtype=np.int64)), rel=0.002)


# ------------------------------------------------------------------------------------ thick slices
def test_slice_axis_is_superior_inferior():
    assert ood.slice_axis(psr_affine()) == 1  # PSR: j -> S
    assert ood.slice_axis(np.diag([2.0, 2.0, 2.0, 1.0])) == 2  # RAS
    assert ood.slice_axis(ood.conform_affine(psr_affine(), (10, 10, 10))) == 1  # LIA: j -> I


def test_thick_slices_average_and_interpolate():
    n = 30
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32)[None, :, None], (4, n, 5)).copy()
    out = ood.thick_slices(ramp, axis=1, factor=3)
    assert out.shape == ramp.shape
    # a linear ramp is kept between the first and last block centres (1 and 28)
    np.testing.assert_allclose(out[:, 1:29], ramp[:, 1:29], atol=1e-5)
    # slice-to-slice detail (period 2) is averaged away; in-plane detail is untouched
    alt = np.broadcast_to(((-1.0) ** np.arange(n)).astype(np.float32)[None, :, None], (4, n, 5)).copy()
    assert np.abs(ood.thick_slices(alt, 1, 3)).max() <= 1 / 3 + 1e-6
    inplane = np.random.default_rng(0).normal(size=(6, 1, 7)).astype(np.float32).repeat(n, axis=1)
    np.testing.assert_allclose(ood.thick_slices(inplane, 1, 3), inplane, atol=1e-5)
    # each block of 3 slices averages to the input's block average (means kept where the ramp is linear)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 9, 3)).astype(np.float32)
    y = ood.thick_slices(x, 1, 3)
    np.testing.assert_allclose(y[:, 1], x[:, 0:3].mean(1), atol=1e-5)  # block centre = block mean
    np.testing.assert_allclose(y[:, 4], x[:, 3:6].mean(1), atol=1e-5)
    # a length not divisible by the factor, and a single block
    assert ood.thick_slices(np.ones((2, 10, 2)), 1, 3).shape == (2, 10, 2)
    np.testing.assert_allclose(ood.thick_slices(x[:, :2], 1, 3), np.repeat(x[:, :2].mean(1, keepdims=True), 2, 1), atol=1e-6)


# ------------------------------------------------------------------------------------ files and summary
def test_write_case_truth_is_34_structures(tmp_path):
    brain, mask, index, aff, _ = _blob_subject((12, 14, 10))
    f = ood.write_case(tmp_path, "s1", brain, mask, index, aff, {"x": 1})
    seg = nib.load(str(f["seg"]))
    np.testing.assert_array_equal(labels.to_index(np.asarray(seg.dataobj), "freesurfer"), index)
    np.testing.assert_allclose(seg.affine, aff)
    assert np.asarray(nib.load(str(f["mask"])).dataobj).sum() == mask.sum()
    assert json.loads(f["manifest"].read_text()) == {"x": 1}


def test_summary_drops_checks_and_refinement():
    def rec(d):
        return {"dice": d}

    results = {
        "clean": {"a": {"atlasmorph": rec(0.80), "atlasmorph-refine0": rec(0.78), "ants-syn": rec(0.75), "ants-affine": rec(0.70)},
                  "b": {"atlasmorph": rec(0.82), "atlasmorph-refine0": rec(0.80), "ants-syn": rec(0.77), "ants-affine": rec(0.72)}},
        "bias40": {"a": {"atlasmorph": rec(0.70), "atlasmorph-refine0": rec(0.74), "ants-syn": rec(0.74), "ants-affine": rec(0.69)},
                   "b": {"atlasmorph": rec(0.72), "atlasmorph-refine0": rec(0.76), "ants-syn": rec(0.76), "ants-affine": rec(0.71)}},
        "mni152": {"MNI152": {"atlasmorph": rec(0.805), "atlasmorph-refine0": rec(0.79)}},
    }
    methods = list(ood.METHODS)
    s = ood.summarise(results, methods, ["clean", "bias40", "mni152"])
    assert s["bias40"]["atlasmorph"]["drop_from_clean"] == pytest.approx(-0.10)
    assert s["bias40"]["atlasmorph"]["checks"]["within_0.01_of_clean"] is False
    assert s["bias40"]["atlasmorph"]["checks"]["ahead_of_ants-syn"] is False
    assert s["bias40"]["atlasmorph"]["checks"]["ahead_of_ants-affine"] is True
    assert s["bias40"]["refinement"]["lowers_mean_dice"] is True and s["bias40"]["refinement"]["lower_on"] == 2
    assert s["clean"]["refinement"]["lowers_mean_dice"] is False
    assert s["mni152"]["atlasmorph"]["drop_from_clean"] == pytest.approx(0.805 - 0.81)
    assert s["mni152"]["atlasmorph"]["checks"]["within_0.01_of_clean"] is True
    assert s["mni152"]["ants-syn"]["n"] == 0
    md = ood.markdown({"command": "x", "model": "m", "model_sha256": "0" * 64, "subjects": ["a", "b"], "split": "s",
                       "seed": 0, "threads": 1, "machine": "here", "versions": {"torch": "1"}, "methods": methods,
                       "perturbations": ["clean", "bias40", "mni152"], "summary": s, "notes": ["note"]})
    assert "bias field ±40 %" in md and "**no**" in md and "note" in md


def test_dice_on_grid_carries_a_conformed_map_back():
    brain, mask, index, aff, _ = _blob_subject()
    _, _, idx, caff = ood.conform(brain, mask, index, aff, size=128)
    assert ood.dice_on_grid(idx, caff, index, aff) == pytest.approx(1.0)  # 2 mm centres are 1 mm centres
    shifted = np.roll(idx, 3, axis=0)
    assert ood.dice_on_grid(shifted, caff, index, aff) < 0.99


def test_summary_counts_the_clean_grid_dice_when_there():
    results = {"clean": {"a": {"atlasmorph": {"dice": 0.80}}},
               "conform": {"a": {"atlasmorph": {"dice": 0.75, "dice_clean_grid": 0.795}}}}
    s = ood.summarise(results, ["atlasmorph"], ["clean", "conform"])
    assert s["conform"]["atlasmorph"]["dice"] == pytest.approx(0.795)
    assert s["conform"]["atlasmorph"]["dice_on_input_grid"] == pytest.approx(0.75)
    assert s["conform"]["atlasmorph"]["drop_from_clean"] == pytest.approx(-0.005)
    assert s["conform"]["atlasmorph"]["checks"]["within_0.01_of_clean"] is True
    assert s["conform"]["atlasmorph"]["scored_on"] == "clean 2 mm grid"


def test_thick_refine_probe_blur_is_the_thick_slice_kernel_along_one_axis():
    """thick_refine_probe.thick_blur: a point becomes [1, 2, 3, 2, 1] / 9 along the chosen axis only; a constant
    stays constant (replicated edges)."""
    import torch

    import thick_refine_probe

    x = torch.zeros(1, 1, 7, 7, 7)
    x[0, 0, 3, 3, 3] = 9.0
    out = thick_refine_probe.thick_blur(x, axis=2)[0, 0]
    assert out[3, 3].tolist() == [0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0]
    assert float(out.sum()) == 9.0 and float(out[3, 2].abs().sum()) == 0.0
    torch.testing.assert_close(thick_refine_probe.thick_blur(torch.full((1, 1, 4, 5, 6), 2.5), axis=0),
                               torch.full((1, 1, 4, 5, 6), 2.5))


def test_a_failed_run_is_named_and_its_mean_marked():
    """A (method, subject) that failed is left out of the mean, and the report says so next to the figure and
    below the table, so a mean over fewer subjects cannot pass for the full one."""
    results = {"clean": {"a": {"atlasmorph": {"dice": 0.80}, "atlasmorph-refine0": {"error": "boom"}},
                         "b": {"atlasmorph": {"dice": 0.82}, "atlasmorph-refine0": {"dice": 0.78}}}}
    methods = ["atlasmorph", "atlasmorph-refine0"]
    s = ood.summarise(results, methods, ["clean"])
    assert s["clean"]["atlasmorph-refine0"]["n"] == 1 and s["clean"]["atlasmorph-refine0"]["failed"] == ["a"]
    assert s["clean"]["atlasmorph"]["failed"] == []
    md = ood.markdown({"command": "x", "model": "m", "model_sha256": "0" * 64, "subjects": ["a", "b"], "split": "s",
                       "seed": 0, "threads": 1, "machine": "here", "versions": {"torch": "1"}, "methods": methods,
                       "perturbations": ["clean"], "summary": s, "notes": []})
    assert "0.780 (n = 1)" in md and "Failed runs" in md and ": a." in md


def test_thick_grid_is_the_block_means_on_a_grid_of_block_centres():
    """thick6grid: one voxel per block of 3 slices along S-I holding the block's mean, the labels of its middle
    slice, and an affine whose voxel centres are the blocks' centres in world space."""
    rng = np.random.default_rng(0)
    aff = psr_affine()
    brain = rng.normal(size=(4, 10, 5)).astype(np.float32)  # PSR: axis 1 is S-I; 10 slices -> 3 blocks
    mask = np.ones_like(brain, dtype=bool)
    mask[:, 9] = False
    index = rng.integers(0, 35, size=brain.shape)
    image, m, idx, new = ood.thick_grid(brain, mask, index, aff, 3)
    assert image.shape == m.shape == idx.shape == (4, 3, 5)
    np.testing.assert_allclose(image[:, 1], brain[:, 3:6].mean(1), atol=1e-6)
    np.testing.assert_array_equal(idx[:, 2], index[:, 7])
    for k in range(3):
        np.testing.assert_allclose(_world(new, (0, k, 0)), _world(aff, (0, 3 * k + 1, 0)), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), np.linalg.norm(aff[:3, :3], axis=0) * [1, 3, 1])
    assert ood.PERTURBATIONS["thick6grid"]["kind"] in ood.REGRIDDED and "atlasmorph-noblur" not in ood.DEFAULT_METHODS
