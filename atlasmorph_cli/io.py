"""Reading and writing volumes (NIfTI .nii/.nii.gz and FreeSurfer .mgz), always atomically."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from .errors import AtlasMorphError

SUFFIXES = (".nii.gz", ".nii", ".mgz")


@dataclass
class Volume:
    """A 3D image: voxel data, voxel-to-world (RAS mm) affine, and the header it came with."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.spatialimages.SpatialHeader | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def suffix_of(path: Path | str) -> str:
    """The image suffix of a path (.nii.gz, .nii or .mgz), or an error naming the supported ones."""
    name = str(path).lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    raise AtlasMorphError(f"{path}: unsupported file type (use one of {', '.join(SUFFIXES)})")


def check_affine(affine: np.ndarray, where: str) -> None:
    """Refuse affines that are not finite, singular, or with absurd voxel sizes."""
    if not np.all(np.isfinite(affine)):
        raise AtlasMorphError(f"{where}: the affine (voxel-to-world matrix) has NaN/Inf entries")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 or np.any(zooms < 0.05) or np.any(zooms > 20):
        raise AtlasMorphError(
            f"{where}: implausible voxel-to-world affine (voxel sizes {np.round(zooms, 3).tolist()} mm)"
        )


def load_volume(path: Path | str, *, allow_nonfinite: bool = False) -> Volume:
    """Load a 3D image (a 4D image with a single frame is squeezed) as float32 with its affine."""
    path = Path(path)
    if not path.exists():
        raise AtlasMorphError(f"{path}: no such file")
    suffix_of(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise AtlasMorphError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3:] == (1, 1):
        data = data[..., 0, 0]
    if data.ndim != 3:
        raise AtlasMorphError(f"{path}: expected a 3D image, got shape {data.shape}")
    if min(data.shape) < 2:
        raise AtlasMorphError(f"{path}: image is too small ({data.shape})")
    if not allow_nonfinite and not np.all(np.isfinite(data)):
        raise AtlasMorphError(f"{path}: image contains NaN or Inf voxels")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, str(path))
    return Volume(data=data, affine=affine, header=img.header)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise AtlasMorphError(f"{path}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise AtlasMorphError(f"{path}: output directory {parent} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + _tmp_suffix(path), dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_suffix(path: Path) -> str:
    try:
        return suffix_of(path)
    except AtlasMorphError:
        return path.suffix


def save_volume(
    data: np.ndarray,
    affine: np.ndarray,
    path: Path | str,
    *,
    header: nib.spatialimages.SpatialHeader | None = None,
    dtype: np.dtype | type | None = None,
    xform_code: int = 1,
    intent: tuple[int, str] | None = None,
) -> Path:
    """Write `data` with `affine` (qform and sform both set) to .nii/.nii.gz/.mgz, atomically."""
    path = Path(path)
    suffix = suffix_of(path)
    arr = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    if suffix == ".mgz":
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if arr.dtype not in (np.uint8, np.int16, np.int32, np.float32):
            arr = arr.astype(np.int32 if np.issubdtype(arr.dtype, np.integer) else np.float32)
        img = nib.MGHImage(arr, affine)
    else:
        hdr = nib.Nifti1Header()
        if header is not None and isinstance(header, nib.Nifti1Header):
            hdr = header.copy()
        img = nib.Nifti1Image(arr, affine, header=hdr)
        img.set_data_dtype(arr.dtype)
        img.header.set_slope_inter(1.0, 0.0)
        img.set_qform(affine, code=xform_code)
        img.set_sform(affine, code=xform_code)
        img.header.set_xyzt_units("mm", "sec")
        if intent is not None:
            img.header.set_intent(intent[0], name=intent[1])
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
