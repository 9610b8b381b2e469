"""Transform files: known answers for each format, read back by our readers, nitransforms and (if installed) ANTs;
inverse consistency of the -t and -T warps of a real registration (shared data).

A constant shift and a rotation about an off-centre point (displacement R(p - c) + c - p) are written
on oblique, LAS and LPS grids; every reader must map world points of the reference grid to the known
moving points. Conventions confirmed with nitransforms 25.1:
- ``itk``: nitransforms' ITK reader (``nonlinear.load(..., fmt="itk")``) negates x and y of the stored
  vectors, i.e. reads them as LPS mm on the NIfTI grid, and maps p -> p + d(p): it agrees with us.
- ``fs``: nitransforms has no FreeSurfer reader (its field formats are afni, fsl, itk, X5). A NIfTI
  given straight to ``DenseFieldTransform`` is read as RAS-mm displacements, p -> p + d(p), which is
  FreeSurfer's documented convention (mri_synthmorph: RAS displacements from fixed to moving), so they
  agree. Its ``itk`` reader accepts our ``fs`` file with only a warning ("Incorrect intent") and gets
  x and y wrong (tested below): the intent is the only mark of the flavour, so our readers enforce it.
- ``itk-txt``: ``nitransforms.linear.load(..., fmt="itk")`` maps reference RAS points to moving RAS
  points with the same matrix as ours.
"""
from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.geometry.space import Grid
from atlasmorph_cli.geometry.transforms import (
    LPS, WARP_FORMATS, AffineTransform, DisplacementField, read_transform, transform_format, write_transform,
)

SHAPE = (7, 6, 5)


def rotation(axis, degrees: float) -> np.ndarray:
    """The 3x3 rotation by `degrees` about `axis` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def affine(m: np.ndarray, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = m, origin
    return a


GRIDS = {  # orthogonal axes only: a NIfTI qform (which ITK may read) cannot hold shear
    "oblique": Grid(SHAPE, affine(rotation((1, 2, 3), 20) @ np.diag([1.5, 2.0, 1.25]), (-4.0, 6.5, -3.0))),
    "LAS": Grid(SHAPE, affine(np.diag([-2.0, 1.5, 2.5]), (6.0, -4.0, 1.0))),
    "LPS": Grid(SHAPE, affine(np.diag([-1.5, -2.0, 1.75]), (4.0, 5.0, -3.0))),
}
R, C = rotation((0.3, -0.5, 0.8), 8), np.array([2.0, -3.0, 1.5])  # rotation about an off-centre point
MAPS = {  # known world maps, reference point -> moving point
    "constant": lambda p: p + np.array([1.5, -2.0, 0.75]),
    "rotation": lambda p: (p - C) @ R.T + C,
}
ON_GRID = np.array([(0, 0, 0), (3, 2, 1), (6, 5, 4), (2, 4, 3)], float)
OFF_GRID = np.array([(2.5, 1.25, 3.7), (4.2, 3.9, 0.6), (0.3, 4.8, 2.1)])


def world(grid: Grid, ijk: np.ndarray) -> np.ndarray:
    return ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def field(grid: Grid, known) -> DisplacementField:
    """The displacement field of the known map, sampled at every voxel of `grid`."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    p = world(grid, ijk.astype(float))
    return DisplacementField((known(p) - p).reshape(*grid.shape, 3), grid)


CASES = [(g, m) for g in GRIDS for m in MAPS]


@pytest.mark.parametrize("fmt", WARP_FORMATS)
@pytest.mark.parametrize("grid_name,map_name", CASES)
def test_field_round_trip_maps_the_known_answer(tmp_path, fmt, grid_name, map_name):
    grid, known = GRIDS[grid_name], MAPS[map_name]
    xfm = field(grid, known)
    path = write_transform(xfm, tmp_path / "w.nii.gz", fmt)
    img = nib.load(str(path))
    assert img.shape == (*SHAPE, 1, 3) and img.get_data_dtype() == np.float32
    assert int(img.header["intent_code"]) == {"fs": 1006, "itk": 1007}[fmt]
    stored = np.asarray(img.dataobj)[:, :, :, 0, :]
    np.testing.assert_array_equal(stored, xfm.disp_ras_mm.astype(np.float32) * ([-1, -1, 1] if fmt == "itk" else 1))
    back = read_transform(path, fmt)
    assert back.reference.shape == SHAPE and back.moving is None
    np.testing.assert_allclose(back.reference.affine, grid.affine, atol=1e-5)
    for ijk in (ON_GRID, OFF_GRID):  # trilinear interpolation is exact for these affine maps
        p = world(grid, ijk)
        np.testing.assert_allclose(back.map(p), known(p), atol=1e-4)
        np.testing.assert_allclose(xfm.map(p), known(p), atol=1e-9)


def test_field_outside_its_grid_is_the_edge_value_then_no_displacement():
    """As ITK: up to half a voxel beyond the outer voxel centres the edge value, further out none."""
    grid = GRIDS["LAS"]
    xfm = field(grid, MAPS["rotation"])
    edge, near, far = world(grid, np.array([(0, 2, 3), (-0.4, 2, 3), (-0.6, 2, 3)], float))
    np.testing.assert_allclose(xfm.map([near, far]), [near + xfm.disp_ras_mm[0, 2, 3], far], atol=1e-12)
    np.testing.assert_allclose(xfm.map(edge), MAPS["rotation"](edge[None]), atol=1e-9)


def nitransforms_field(path, fmt):
    """The file as nitransforms reads it: its ITK reader, or for `fs` a plain NIfTI of RAS deltas."""
    from nitransforms.nonlinear import DenseFieldTransform, load
    return load(str(path), fmt="itk") if fmt == "itk" else DenseFieldTransform(str(path), is_deltas=True)


@pytest.mark.parametrize("fmt", WARP_FORMATS)
@pytest.mark.parametrize("grid_name,map_name", CASES)
def test_nitransforms_maps_our_fields_to_the_known_answer(tmp_path, fmt, grid_name, map_name):
    pytest.importorskip("nitransforms")
    grid, known = GRIDS[grid_name], MAPS[map_name]
    path = write_transform(field(grid, known), tmp_path / "w.nii.gz", fmt)
    p = world(grid, ON_GRID)  # on voxel centres nitransforms reads the field as stored (no spline)
    np.testing.assert_allclose(nitransforms_field(path, fmt).map(p), known(p), atol=1e-3)


def test_nitransforms_itk_reader_gets_an_fs_file_wrong(tmp_path):
    """The two flavours differ only by their intent: read as ITK, a FreeSurfer field flips x and y."""
    pytest.importorskip("nitransforms")
    grid, known = GRIDS["oblique"], MAPS["rotation"]
    path = write_transform(field(grid, known), tmp_path / "w.nii.gz", "fs")
    with pytest.warns(UserWarning, match="Incorrect intent"):
        theirs = nitransforms_field(path, "itk")
    p = world(grid, ON_GRID)
    d = known(p) - p
    np.testing.assert_allclose(theirs.map(p), p + d * [-1, -1, 1], atol=1e-3)
    with pytest.raises(AtlasMorphError, match="intent 1006"):
        read_transform(path, "itk")
    with pytest.raises(AtlasMorphError, match="intent 1007"):
        read_transform(write_transform(field(grid, known), tmp_path / "i.nii.gz", "itk"), "fs")


@pytest.mark.parametrize("grid_name", GRIDS)
def test_affine_round_trip_and_nitransforms(tmp_path, grid_name):
    grid = GRIDS[grid_name]
    xfm = AffineTransform(affine(R, C - R @ C), reference=grid)
    path = write_transform(xfm, tmp_path / "a.txt", "itk-txt")
    p = world(grid, np.r_[ON_GRID, OFF_GRID])
    np.testing.assert_allclose(xfm.map(p), MAPS["rotation"](p), atol=1e-12)
    np.testing.assert_allclose(read_transform(path, "itk-txt").map(p), MAPS["rotation"](p), atol=1e-8)
    linear = pytest.importorskip("nitransforms.linear")
    np.testing.assert_allclose(linear.load(str(path), fmt="itk").map(p), MAPS["rotation"](p), atol=1e-6)


def test_itk_text_known_bytes_and_centre(tmp_path):
    """A RAS map written as LPS text (x and y of rows and columns negated); a centre is honoured on reading."""
    xfm = AffineTransform(np.array([[0, -1, 0, 10], [1, 0, 0, -5], [0, 0, 1, 2.5], [0, 0, 0, 1.0]]))
    path = write_transform(xfm, tmp_path / "a.txt", "itk-txt")
    assert path.read_text() == ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                                "Parameters: 0 -1 0 1 0 0 0 0 1 -10 5 2.5\nFixedParameters: 0 0 0\n")
    a = rotation((1, 1, 0), 30)  # LPS x -> A(x - c) + t + c, as ITK applies it
    t, c = np.array([1.0, -2.0, 3.0]), np.array([10.0, 20.0, -5.0])
    (tmp_path / "c.txt").write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: MatrixOffsetTransformBase_double_3_3\n"
        f"Parameters: {' '.join(map(str, [*a.ravel(), *t]))}\nFixedParameters: {' '.join(map(str, c))}\n")
    x_ras = np.array([[3.0, -7.0, 12.0]])
    expected = ((x_ras @ LPS - c) @ a.T + t + c) @ LPS
    np.testing.assert_allclose(read_transform(tmp_path / "c.txt", "itk-txt").map(x_ras), expected, atol=1e-9)


# Bytes of today's writers for a fixed input, uncompressed (.nii) so zlib's version does not matter:
# the restructure must not change a written warp.
KNOWN_SHA256 = {"fs": "ed237ba3b2d033bdf4411a2c5e21a71d168c36d88da0ea68821cfb63318bdc08",
                "itk": "1a9d0102a3ddc1a8a4574ce9b12c93566c2096e37a60dee03353cb8609bc4ff5"}


def small_field() -> DisplacementField:
    aff = affine(np.diag([-2.0, 1.5, 2.5]), (6.0, -4.0, 1.0))
    return DisplacementField((np.arange(36, dtype=np.float64).reshape(2, 3, 2, 3) - 8) / 4, Grid((2, 3, 2), aff))


@pytest.mark.parametrize("fmt", WARP_FORMATS)
def test_field_bytes_are_unchanged(tmp_path, fmt):
    path = write_transform(small_field(), tmp_path / "w.nii", fmt)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == KNOWN_SHA256[fmt]
    assert [p.name for p in tmp_path.iterdir()] == ["w.nii"]  # written through a temporary, renamed


def test_unknown_or_mismatched_formats_are_errors(tmp_path):
    with pytest.raises(AtlasMorphError, match=r"unknown transform format 'nifti' \(use one of fs, itk, itk-txt\)"):
        read_transform(tmp_path / "w.nii.gz", "nifti")
    with pytest.raises(AtlasMorphError, match=r"unknown transform format 'x' \(use one of fs, itk\)"):
        transform_format("x", DisplacementField)  # what --warp-format checks
    with pytest.raises(AtlasMorphError, match="'itk-txt' holds an affine, not a displacement field"):
        transform_format("itk-txt", DisplacementField)
    with pytest.raises(AtlasMorphError, match="'fs' holds a displacement field, not an affine"):
        write_transform(AffineTransform(np.eye(4)), tmp_path / "w.nii.gz", "fs")
    (tmp_path / "bad.txt").write_text("#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n")
    with pytest.raises(AtlasMorphError, match="expected one ITK transform"):
        read_transform(tmp_path / "bad.txt", "itk-txt")
    assert not (tmp_path / "w.nii.gz").exists()


def test_ants_maps_our_itk_fields_to_the_known_answer(tmp_path):
    """ANTs applies a transform file to points as stored (fixed -> moving), in LPS."""
    ants = pytest.importorskip("ants")
    import pandas as pd
    for grid_name, map_name in CASES:
        grid, known = GRIDS[grid_name], MAPS[map_name]
        path = write_transform(field(grid, known), tmp_path / f"{grid_name}_{map_name}.nii.gz", "itk")
        p = world(grid, np.r_[ON_GRID, OFF_GRID])
        out = ants.apply_transforms_to_points(3, pd.DataFrame(p @ LPS, columns=["x", "y", "z"]), [str(path)])
        np.testing.assert_allclose(out[["x", "y", "z"]].to_numpy() @ LPS, known(p), atol=1e-3)


def test_ants_maps_our_affine_to_the_known_answer(tmp_path):
    ants = pytest.importorskip("ants")
    import pandas as pd
    path = write_transform(AffineTransform(affine(R, C - R @ C)), tmp_path / "a.txt", "itk-txt")
    p = world(GRIDS["oblique"], ON_GRID)
    out = ants.apply_transforms_to_points(3, pd.DataFrame(p @ LPS, columns=["x", "y", "z"]), [str(path)])
    np.testing.assert_allclose(out[["x", "y", "z"]].to_numpy() @ LPS, MAPS["rotation"](p), atol=1e-4)


@pytest.mark.parametrize("fmt", WARP_FORMATS)
def test_t_and_T_warps_of_a_real_registration_are_inverse(tmp_path, subject, fmt):
    """Inverse consistency: a real IXI subject registered with the shipped model; the -T warp (subject ->
    template point) followed by the -t warp (template -> subject point), both read back from their files,
    comes back to within a fraction of a 2 mm voxel of where it started (measured: median 0.18 mm, 95th
    percentile 0.65 mm, for displacements of 17 mm), and so does -t followed by -T."""
    from typer.testing import CliRunner

    from atlasmorph_cli.cli import app

    path, _, row = subject
    r = CliRunner().invoke(app, ["register", str(path), "--age", row["age"], "--sex", row["sex"], "--threads", "1",
                                 "-t", str(tmp_path / "t.nii.gz"), "-T", str(tmp_path / "T.nii.gz"), "--warp-format", fmt])
    assert r.exit_code == 0, (r.output, r.exception)
    to_subject, to_template = (read_transform(tmp_path / n, fmt) for n in ("t.nii.gz", "T.nii.gz"))
    brain = np.asarray(nib.load(str(path)).dataobj) > 0
    p = world(to_template.reference, np.argwhere(brain)[::7])  # subject brain points
    q = to_template.map(p)  # their template points
    assert np.median(np.linalg.norm(q - p, axis=1)) > 5  # a real displacement, not the identity
    for start, there_and_back in ((p, to_subject.map(q)), (q, to_template.map(to_subject.map(q)))):
        err = np.linalg.norm(there_and_back - start, axis=1)
        assert np.median(err) < 0.3 and np.percentile(err, 95) < 1.0, (np.median(err), np.percentile(err, 95))
