"""Affine registration (atlasmorph_cli.geometry.affine), intensity normalisation and the data-folder lookup.

Synthetic tests (a brain-like ellipsoid phantom with internal structure) always run; tests on the
MNI152 reference and a real IXI subject skip, with the reason, when the data folder is absent.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from atlasmorph_cli.io import datadir
from atlasmorph_cli.geometry.affine import fit_affine
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.geometry.intensity import normalize
from atlasmorph_cli.geometry.space import MODEL_GRID, Grid, resample

# ---------------------------------------------------------------------------------------------
# helpers


def world_points(grid: Grid, mask: np.ndarray) -> np.ndarray:
    """World coordinates (N, 3) of the voxels of `mask` on `grid`."""
    ijk = np.argwhere(mask).astype(np.float64)
    return ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def mean_displacement(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two 4x4 world transforms send `points`."""
    d = points @ (a - b)[:3, :3].T + (a - b)[:3, 3]
    return float(np.linalg.norm(d, axis=1).mean())


def rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def known_affine(seed: int) -> np.ndarray:
    """A random affine: rotations up to 15 deg, translations up to 20 mm, scales 0.9-1.1."""
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = rotation(rng.uniform(-15, 15, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    m[:3, 3] = rng.uniform(-20, 20, 3)
    return m


def scanner_grid(centre_world: np.ndarray, shape=(110, 110, 90), zoom=2.0) -> Grid:
    """An oblique-free 'scanner' grid in PSR orientation (like IXI) whose centre voxel sits at `centre_world`."""
    lin = np.array([[0.0, 0.0, zoom], [-zoom, 0.0, 0.0], [0.0, zoom, 0.0]])  # i -> P, j -> S, k -> R
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = centre_world - lin @ ((np.asarray(shape) - 1) / 2.0)
    return Grid(tuple(shape), aff)


PHANTOM_GRID = Grid((64, 76, 64), np.array([[2.0, 0, 0, -63.0], [0, 2.0, 0, -81.0], [0, 0, 2.0, -55.0], [0, 0, 0, 1]]))


def phantom() -> np.ndarray:
    """A brain-like phantom on PHANTOM_GRID: grey ellipsoid, white-matter core, asymmetric 'ventricles',
    a 'nucleus' and a 'cerebellum', lightly smoothed; zero outside (already brain-extracted)."""
    from scipy.ndimage import gaussian_filter

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in PHANTOM_GRID.shape], indexing="ij"), -1).astype(float)
    x = ijk @ PHANTOM_GRID.affine[:3, :3].T + PHANTOM_GRID.affine[:3, 3]

    def ell(c, r):
        return (((x - np.asarray(c, float)) / np.asarray(r, float)) ** 2).sum(-1) <= 1.0

    img = np.zeros(PHANTOM_GRID.shape, np.float32)
    img[ell((0, 0, 5), (52, 68, 48))] = 0.55
    img[ell((0, 2, 8), (40, 54, 36))] = 0.9
    img[ell((-9, 8, 12), (5, 22, 9))] = 0.15
    img[ell((10, 2, 14), (4, 16, 8))] = 0.15
    img[ell((18, -12, -2), (9, 7, 8))] = 0.6
    img[ell((-20, 30, 0), (6, 6, 6))] = 0.35
    img[ell((0, -52, -30), (24, 14, 12))] = 0.7
    img = gaussian_filter(img, 0.8)
    img[img < 0.05] = 0
    return img.astype(np.float32)


@pytest.fixture(scope="module")
def ph() -> np.ndarray:
    return phantom()


# ---------------------------------------------------------------------------------------------
# synthetic: identity and known affines


def test_phantom_identity(ph):
    T = fit_affine(ph, PHANTOM_GRID.affine, ph, PHANTOM_GRID)
    pts = world_points(PHANTOM_GRID, ph > 0)
    err = mean_displacement(T, np.eye(4), pts)
    assert err < 0.5, f"registering an image to itself moved it by {err:.2f} mm on average"


@pytest.mark.parametrize("seed", [1, 2])
def test_phantom_recovers_known_affine(ph, seed):
    true = known_affine(seed)  # fixed world -> moving world
    grid = scanner_grid(true[:3, 3] + np.array([12.0, -25.0, 30.0]))  # off-centre 'scanner'
    moving = resample(ph, PHANTOM_GRID.affine, grid, world=np.linalg.inv(true))
    T = fit_affine(moving, grid.affine, ph, PHANTOM_GRID)
    err = mean_displacement(T, true, world_points(PHANTOM_GRID, ph > 0))
    assert err < 1.0, f"mean displacement error {err:.2f} mm over the phantom (want < 1 mm)"


def test_phantom_upside_down_and_turned(ph):
    """A head rotated by 180 deg about one axis and 90 deg about another: principal-axes candidates."""
    true = np.eye(4)
    true[:3, :3] = rotation((180.0, 0.0, 90.0)) @ np.diag([1.05, 0.95, 1.0])
    true[:3, 3] = [5.0, -10.0, 15.0]
    grid = scanner_grid(true[:3, 3], shape=(100, 100, 100))
    moving = resample(ph, PHANTOM_GRID.affine, grid, world=np.linalg.inv(true))
    T = fit_affine(moving, grid.affine, ph, PHANTOM_GRID)
    err = mean_displacement(T, true, world_points(PHANTOM_GRID, ph > 0))
    assert err < 1.0, f"mean displacement error {err:.2f} mm after a 180/90 deg rotation"


def test_fit_affine_is_deterministic(ph):
    true = known_affine(3)
    grid = scanner_grid(true[:3, 3])
    moving = resample(ph, PHANTOM_GRID.affine, grid, world=np.linalg.inv(true))
    a = fit_affine(moving, grid.affine, ph, PHANTOM_GRID, threads=1)
    b = fit_affine(moving, grid.affine, ph, PHANTOM_GRID, threads=1)
    np.testing.assert_array_equal(a, b)


def test_fit_affine_rejects_bad_input(ph):
    with pytest.raises(AtlasMorphError, match="no positive"):
        fit_affine(np.zeros((20, 20, 20), np.float32), np.eye(4), ph, PHANTOM_GRID)
    with pytest.raises(AtlasMorphError, match="does not match"):
        fit_affine(ph, PHANTOM_GRID.affine, ph[:-1], PHANTOM_GRID)


# ---------------------------------------------------------------------------------------------
# real data: MNI152 reference and an IXI subject

DATA = datadir.find_data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "mni152").is_dir() or not (DATA / "ixi" / "subjects.csv").exists(),
    reason="real data not found: set ATLASMORPH_DATA or provide ../shared/data (mni152/, ixi/subjects.csv)",
)


@pytest.fixture(scope="module")
def reference():
    from atlasmorph_cli.training.reference import mni_reference

    return mni_reference(DATA)


@needs_data
def test_reference_on_model_grid(reference):
    brain, index = reference
    assert brain.shape == index.shape == MODEL_GRID.shape
    assert brain.dtype == np.float32 and index.dtype == np.uint8
    assert 0.0 <= brain.min() and brain.max() <= 1.0
    assert set(np.unique(index).tolist()) == set(range(35))
    # the brain sits in the grid with a margin (resampled by affine, not by voxel index)
    nz = np.argwhere(brain > 0)
    assert nz.min(0).min() >= 2 and (np.asarray(MODEL_GRID.shape) - 1 - nz.max(0)).min() >= 2
    # labels and brain mask agree
    assert ((index > 0) & (brain > 0)).sum() / (index > 0).sum() > 0.95


@needs_data
def test_reference_to_itself_is_identity(reference):
    brain, _ = reference
    T = fit_affine(brain, MODEL_GRID.affine, brain, MODEL_GRID)
    err = mean_displacement(T, np.eye(4), world_points(MODEL_GRID, brain > 0))
    assert err < 0.5, f"MNI brain registered to itself moved by {err:.2f} mm on average"


@needs_data
def test_ixi_subject_to_mni(reference):
    """A real scan in native scanner space: good overlap with the MNI labels, and the same answer
    when the scan's world frame is turned by 90 degrees (the result then turns with it)."""
    from atlasmorph_cli import labels
    from atlasmorph_cli.training import metrics
    from atlasmorph_cli.io.volumes import load_volume
    from atlasmorph_cli.geometry.space import resample_labels

    brain_ref, index_ref = reference
    with open(DATA / "ixi" / "subjects.csv", newline="") as fh:
        row = sorted((r for r in csv.DictReader(fh) if r["age"]), key=lambda r: r["subject"])[0]
    t1 = load_volume(DATA / "ixi" / row["t1"])
    seg = load_volume(DATA / "ixi" / row["seg"])
    brain = normalize(t1.data, seg.data > 0)
    index = labels.to_index(seg.data, "muse")

    before = metrics.mean_dice(resample_labels(index, seg.affine, MODEL_GRID), index_ref)
    T = fit_affine(brain, t1.affine, brain_ref, MODEL_GRID)
    after = metrics.mean_dice(resample_labels(index, seg.affine, MODEL_GRID, world=T), index_ref)
    assert after > 0.65 and after > before + 0.3, f"mean Dice {before:.3f} unregistered -> {after:.3f} registered"

    turn = np.eye(4)
    turn[:3, :3] = rotation((90.0, 0.0, 0.0))
    turn[:3, 3] = [30.0, -40.0, 10.0]
    T_turned = fit_affine(brain, turn @ t1.affine, brain_ref, MODEL_GRID)
    err = mean_displacement(T_turned, turn @ T, world_points(MODEL_GRID, brain_ref > 0))
    assert err < 1.0, f"turning the scan by 90 deg changed the registration by {err:.2f} mm"


# ---------------------------------------------------------------------------------------------
# intensity.normalize


def test_normalize_percentiles_mask_and_dtype():
    rng = np.random.default_rng(0)
    data = rng.uniform(100, 200, (20, 20, 20)).astype(np.float64)
    mask = np.zeros(data.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    data[~mask] = 1000.0  # outside values must not influence the percentiles
    out = normalize(data, mask)
    assert out.dtype == np.float32 and out.shape == data.shape
    assert np.all(out[~mask] == 0)
    inside = out[mask]
    assert inside.min() == 0.0 and inside.max() == 1.0
    lo, hi = np.percentile(data[mask], [1, 99])
    assert np.mean(inside == 0.0) == pytest.approx(0.01, abs=0.005)
    assert np.mean(inside == 1.0) == pytest.approx(0.01, abs=0.005)
    mid = (data > lo) & (data < hi) & mask
    np.testing.assert_allclose(out[mid], (data[mid] - lo) / (hi - lo), rtol=1e-5, atol=1e-6)


def test_normalize_custom_percentiles_and_no_mask():
    data = np.arange(101, dtype=np.float32).reshape(1, 1, 101)
    out = normalize(data, None, lo=10, hi=90)
    assert out[0, 0, 10] == 0.0 and out[0, 0, 90] == 1.0 and out[0, 0, 50] == pytest.approx(0.5)


def test_normalize_edge_cases():
    data = np.full((4, 4, 4), 7.0)
    mask = np.zeros(data.shape, bool)
    mask[1:3, 1:3, 1:3] = True
    np.testing.assert_array_equal(normalize(data, mask), mask.astype(np.float32))  # constant -> 1 inside
    with pytest.raises(AtlasMorphError, match="empty"):
        normalize(data, np.zeros(data.shape, bool))
    with pytest.raises(ValueError):
        normalize(data, mask, lo=90, hi=10)


# ---------------------------------------------------------------------------------------------
# datadir.find_data_dir


def test_find_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLASMORPH_DATA", str(tmp_path))
    assert datadir.find_data_dir() == tmp_path


def test_find_data_dir_default(monkeypatch):
    monkeypatch.delenv("ATLASMORPH_DATA", raising=False)
    sibling = Path(datadir.__file__).resolve().parents[3] / "shared" / "data"
    expected = sibling if sibling.is_dir() else None
    assert datadir.find_data_dir() == expected


def test_find_data_dir_none_without_sibling(monkeypatch, tmp_path):
    monkeypatch.delenv("ATLASMORPH_DATA", raising=False)
    fake_pkg = tmp_path / "repo" / "atlasmorph_cli" / "io"
    fake_pkg.mkdir(parents=True)
    monkeypatch.setattr(datadir, "__file__", str(fake_pkg / "datadir.py"))
    assert datadir.find_data_dir() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert datadir.find_data_dir() == tmp_path / "shared" / "data"


def test_smoothing_is_a_zero_padded_gaussian_convolution():
    """affine._smooth (shifted-slice sums, for speed) gives the numbers of a separable conv1d over the rows of each
    axis, per-axis sigmas included (the form it replaced); sigma < 0.2 voxels leaves the axis as it is."""
    import math

    import torch
    import torch.nn.functional as F

    from atlasmorph_cli.geometry.affine import _smooth

    vol = torch.rand(1, 1, 13, 11, 9, generator=torch.Generator().manual_seed(2))
    sigmas = (2.0, 0.7, 0.1)
    ref = vol[0, 0]
    for axis, s in enumerate(sigmas):
        if s < 0.2:
            continue
        r = max(1, math.ceil(3 * s))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / s) ** 2)
        moved = ref.movedim(axis, -1)
        out = F.conv1d(moved.reshape(-1, 1, moved.shape[-1]), (k / k.sum()).view(1, 1, -1), padding=r)
        ref = out.reshape(moved.shape).movedim(-1, axis)
    got = _smooth(vol, sigmas)
    assert got.shape == vol.shape
    assert torch.allclose(got[0, 0], ref, atol=1e-6)


def test_mask_moments_of_a_box_and_of_an_oblique_blob():
    """_moments (from the mask's 2-D projections): a 4 x 6 x 10 box on a 2 mm grid has its centre in the middle
    and variances 4 (L^2 - 1) / 12 mm^2 per axis; an irregular mask on an oblique grid matches the moments of
    its voxel list."""
    from atlasmorph_cli.geometry.affine import _moments

    box = np.zeros((10, 12, 16), bool)
    box[2:6, 3:9, 4:14] = True
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-5.0, 1.0, 3.0]
    centre, cov, volume = _moments(box, aff)
    np.testing.assert_allclose(centre, [-5 + 2 * 3.5, 1 + 2 * 5.5, 3 + 2 * 8.5])
    np.testing.assert_allclose(cov, np.diag([4 * (16 - 1) / 12, 4 * (36 - 1) / 12, 4 * (100 - 1) / 12]), atol=1e-12)
    assert volume == pytest.approx(4 * 6 * 10 * 8)

    blob = np.random.default_rng(0).random((9, 11, 7)) > 0.6
    oblique = np.array([[0.9, 0.1, 0.0, -8.0], [-0.1, 1.1, 0.05, 4.0], [0.0, 0.2, 1.3, 2.0], [0, 0, 0, 1]])
    world = np.argwhere(blob) @ oblique[:3, :3].T + oblique[:3, 3]
    centre, cov, volume = _moments(blob, oblique)
    np.testing.assert_allclose(centre, world.mean(0), atol=1e-10)
    np.testing.assert_allclose(cov, np.cov(world.T, bias=True), atol=1e-10)
    np.testing.assert_allclose(volume, blob.sum() * abs(np.linalg.det(oblique[:3, :3])))
