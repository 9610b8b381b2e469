"""Reading and writing volumes: formats, affines, refusals, atomic writes."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.io.volumes import atomic_path, check_affine, load_volume, save_volume
from conftest import psr_affine


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mgz"])
def test_roundtrip_keeps_data_and_affine(tmp_path, suffix):
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    aff = psr_affine()
    p = save_volume(data, aff, tmp_path / f"x{suffix}")
    v = load_volume(p)
    np.testing.assert_allclose(v.data, data, rtol=1e-6)
    np.testing.assert_allclose(v.affine, aff, atol=1e-5)
    if suffix != ".mgz":
        img = nib.load(str(p))
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), aff, atol=1e-5)


def test_single_frame_4d_is_squeezed(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5, 1), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    assert load_volume(tmp_path / "a.nii.gz").shape == (5, 5, 5)


@pytest.mark.parametrize(
    "shape,match", [((5, 5, 5, 3), "3D"), ((5, 5), "3D")]
)
def test_non_3d_refused(tmp_path, shape, match):
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    with pytest.raises(AtlasMorphError, match=match):
        load_volume(tmp_path / "a.nii.gz")


def test_refusals(tmp_path):
    with pytest.raises(AtlasMorphError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not an image")
    with pytest.raises(AtlasMorphError, match="not a readable image"):
        load_volume(tmp_path / "text.nii.gz")
    good = save_volume(np.ones((20, 20, 20), np.float32), np.eye(4), tmp_path / "good.nii.gz")
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(AtlasMorphError, match="not a readable image"):
        load_volume(tmp_path / "trunc.nii.gz")
    nan = np.ones((5, 5, 5), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(AtlasMorphError, match="NaN"):
        load_volume(tmp_path / "nan.nii.gz")
    absurd = np.diag([50.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), absurd), tmp_path / "absurd.nii.gz")
    with pytest.raises(AtlasMorphError, match="implausible"):
        load_volume(tmp_path / "absurd.nii.gz")
    singular = np.eye(4)
    singular[:3, 1] = singular[:3, 0]
    with pytest.raises(AtlasMorphError, match="implausible"):
        check_affine(singular, "x")
    with pytest.raises(AtlasMorphError, match="unsupported"):
        save_volume(np.ones((3, 3, 3)), np.eye(4), tmp_path / "x.png")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_or_missing_directory(tmp_path):
    with pytest.raises(AtlasMorphError, match="does not exist"):
        save_volume(np.ones((3, 3, 3)), np.eye(4), tmp_path / "nope" / "a.nii.gz")
