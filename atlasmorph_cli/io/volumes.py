"""Reading and writing volumes (NIfTI .nii/.nii.gz and FreeSurfer .mgz), always atomically.

Every output goes through `atomic_path`: it is written to a hidden temporary file beside its
destination, flushed to disk and renamed onto it only when complete. Inside `all_or_nothing()` the
renames wait until the whole block has succeeded, so a command that fails while writing its third
output leaves none of them behind. gzip members carry mtime 0, so the same input gives the same bytes.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from ..errors import AtlasMorphError
from ..limits import check_image_shape

SUFFIXES = (".nii.gz", ".nii", ".mgz")


@dataclass
class Volume:
    """A 3D image: voxel data, voxel-to-world (RAS mm) affine, and the header it came with."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.spatialimages.SpatialHeader | None = None
    source: Path | None = None  # the file it was read from, for messages

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


def image_stem(path: Path | str) -> str:
    """The file name without its image suffix (any case): 'sub-01_T1w.nii.gz' -> 'sub-01_T1w'."""
    name = Path(path).name
    for s in SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def same_grid(a: Volume, b: Volume) -> bool:
    """Whether two volumes lie on one voxel grid (same shape, affines equal within 1e-3)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3)


def check_affine(affine: np.ndarray, where: str) -> None:
    """Refuse affines that are not finite, singular, or with absurd voxel sizes."""
    if not np.all(np.isfinite(affine)):
        raise AtlasMorphError(f"{where}: the affine (voxel-to-world matrix) has NaN/Inf entries")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms < 0.05) or np.any(zooms > 20):
        raise AtlasMorphError(
            f"{where}: implausible voxel-to-world affine (voxel sizes {np.round(zooms, 3).tolist()} mm)"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(zooms)):
        raise AtlasMorphError(f"{where}: implausible voxel-to-world affine (singular: two voxel axes point the same "
                              "way; check the qform/sform)")


def load_volume(path: Path | str, *, allow_nonfinite: bool = False) -> Volume:
    """Load a 3D image (a 4D image with a single frame is squeezed) as float32 with its affine."""
    path = Path(path)
    if not path.exists():
        raise AtlasMorphError(f"{path}: no such file")
    if path.is_dir():
        raise AtlasMorphError(f"{path}: is a directory, not an image file")
    suffix_of(path)
    try:
        with warnings.catch_warnings():  # an absurd header makes nibabel warn (overflow) before it is refused
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            shape = img.shape
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise AtlasMorphError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    check_image_shape(shape, path)  # from the header, before any voxel is read (limits.py)
    if np.dtype(img.get_data_dtype()).kind == "c":  # numpy would drop the imaginary part with a warning
        raise AtlasMorphError(f"{path}: complex-valued voxels ({img.get_data_dtype()}); give a real image, "
                              "e.g. the magnitude (fslcomplex -realabs, or numpy.abs)")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except MemoryError:
        raise AtlasMorphError(f"{path}: not enough memory to read {shape} voxels") from None
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise AtlasMorphError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3:] == (1, 1):
        data = data[..., 0, 0]
    if data.ndim == 4:
        raise AtlasMorphError(
            f"{path}: a 4D image with {data.shape[3]} frames {data.shape}; give a single 3D volume "
            "(e.g. extract one frame with mri_convert --frame 0 or fslroi)"
        )
    if data.ndim != 3:
        raise AtlasMorphError(f"{path}: expected a 3D image, got {data.ndim}D shape {data.shape}")
    if min(data.shape) < 2:
        raise AtlasMorphError(f"{path}: image is too small ({data.shape})")
    if not allow_nonfinite:
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise AtlasMorphError(f"{path}: image contains NaN or Inf voxels ({bad} of {data.size})")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, str(path))
    return Volume(data=data, affine=affine, header=img.header, source=path)


def grid_difference(shape_a, affine_a, shape_b, affine_b) -> str:
    """How two grids differ, for messages: the shapes, else what differs in the voxel-to-world affines."""
    if tuple(shape_a) != tuple(shape_b):
        return f"shape: {tuple(shape_a)} vs {tuple(shape_b)}"
    a, b = np.asarray(affine_a, float), np.asarray(affine_b, float)
    za, zb = np.sqrt((a[:3, :3] ** 2).sum(0)), np.sqrt((b[:3, :3] ** 2).sum(0))
    fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in np.round(v, 3)) + ")"  # noqa: E731
    parts = []
    if not np.allclose(za, zb, atol=1e-3):
        parts.append(f"voxel sizes {fmt(za)} vs {fmt(zb)} mm")
    if not np.allclose(a[:3, :3] / za, b[:3, :3] / zb, atol=1e-3):
        parts.append("axis directions differ (another orientation)")
    if not np.allclose(a[:3, 3], b[:3, 3], atol=1e-3):
        parts.append(f"origin {fmt(a[:3, 3])} vs {fmt(b[:3, 3])} mm")
    return "voxel-to-world affine: " + ("; ".join(parts) or f"{fmt(a.ravel())} vs {fmt(b.ravel())}")


def check_output_dir(path: Path | str) -> None:
    """Refuse an output whose folder is missing, not a folder, or not writable (tried, not guessed)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise AtlasMorphError(f"{path}: file name too long ({len(os.fsencode(path.name))} bytes; file systems allow "
                              f"at most {NAME_MAX})")
    if path.is_dir():
        raise AtlasMorphError(f"{path}: is a directory; give a file name")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise AtlasMorphError(f"{path}: output directory {parent} {what}")
    remove_stale_temporaries([path])
    try:  # os.access is wrong for root, read-only mounts and some network file systems
        fd, tmp = tempfile.mkstemp(prefix=f".{_short(path.name)}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise AtlasMorphError(f"{path}: output directory {parent} is not writable{_reason(exc)}") from None
    os.close(fd)
    os.unlink(tmp)


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def _short(name: str) -> str:
    """The start of a file name, for the hidden temporary name beside it (which must fit in NAME_MAX)."""
    while len(os.fsencode(name)) > 100:
        name = name[:-1]
    return name


_TEMPORARY = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.(?:part|probe)")


def remove_stale_temporaries(paths: list[Path]) -> int:
    """Remove hidden temporary files that a killed earlier run (SIGKILL, power loss) left beside these
    outputs (`.NAME.XXXXXXXX.part...`); only those of these very outputs, so another job writing other
    files into the same folder is not disturbed. One directory listing per folder; returns the count."""
    by_parent: dict[Path, set[str]] = {}
    for p in paths:
        p = Path(p)
        by_parent.setdefault(p.parent if str(p.parent) else Path("."), set()).add(_short(p.name))
    removed = 0
    for parent, names in by_parent.items():
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for e in entries:
            m = _TEMPORARY.match(e.name) if e.name.startswith(".") else None
            if m and m.group(1) in names:
                try:
                    os.unlink(e.path)
                    removed += 1
                except OSError:
                    pass
    return removed


def _reason(exc: OSError) -> str:
    return f" ({exc.strerror})" if exc.strerror and exc.errno != errno.ENOENT else ""


# temporary files whose rename waits for the end of the enclosing all_or_nothing() block
_pending: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("atlasmorph_pending_outputs", default=None)


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Outputs written through `atomic_path` inside the block appear together at its end, or not at all."""
    if _pending.get() is not None:  # nested: the outer block commits
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _pending.set(pending)
    try:
        yield
        while pending:
            tmp, final = pending[0]
            os.replace(tmp, final)
            pending.pop(0)
    finally:
        _pending.reset(token)
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file is flushed to disk before the rename, so after a crash (even SIGKILL or power loss)
    `path` holds either its old content or the complete new one, never a partial file.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise AtlasMorphError(f"{path}: output directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{_short(path.name)}.", suffix=".part" + _tmp_suffix(path), dir=parent)
    except OSError as exc:
        raise AtlasMorphError(f"{path}: output directory {parent} is not writable{_reason(exc)}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    keep = False
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        _fsync(tmp_path)
        group = _pending.get()
        if group is not None:
            group.append((tmp_path, path))
            keep = True
        else:
            os.replace(tmp_path, path)
    except OSError as exc:  # disk full, quota...: name the output, not the hidden temporary file (or nothing)
        if exc.filename in (None, str(tmp_path)):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if not keep and tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def canonical_safetensors(path: Path | str) -> None:
    """Rewrite a safetensors header in place in a fixed order (metadata keys sorted, tensors by offset).

    safetensors serialises its metadata from a hash map whose order changes from one process to the
    next, so the same weights would give different bytes. The rewritten header holds the same JSON
    (padded with spaces to the same length, as safetensors itself pads), so offsets do not move.
    """
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        out: dict = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
        out.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
        text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # always, unless a JSON escaping differs; then the file stays as written
            fh.seek(8)
            fh.write(text + b" " * (n - len(text)))


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
    arr = np.asarray(data if dtype is None else np.asarray(data).astype(dtype, copy=False))  # no copy if it is one
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
