"""Transforms that carry their geometry, and a registry of file formats with one reader and one writer each.

A transform maps points of its reference grid (the fixed image, where the output is resampled) to
the moving image's world, in RAS mm: the pull-back map a resampler uses (as in nitransforms and
FreeSurfer's SynthMorph). Formats (all map reference points to moving points):

- ``fs``: FreeSurfer 8 / SynthMorph NIfTI displacement, RAS mm, shape (X,Y,Z,1,3), intent 1006 (DISPVECT);
- ``itk``: ITK/ANTs NIfTI displacement, LPS mm (x and y negated), shape (X,Y,Z,1,3), intent 1007 (VECTOR);
- ``itk-txt``: ITK text ``AffineTransform_double_3_3`` in LPS (antsApplyTransforms, nitransforms ``fmt="itk"``).

The NIfTI intent is the only mark that tells the two displacement flavours apart, so readers refuse
a file whose intent is not their format's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Union

import nibabel as nib
import numpy as np

from ..errors import AtlasMorphError
from ..io.volumes import atomic_path, check_affine, save_volume
from .space import Grid

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS for vectors; its own inverse
_LPS4 = np.diag([-1.0, -1.0, 1.0, 1.0])  # the same for homogeneous points and 4x4 maps
_ITK_AFFINES = ("AffineTransform_double_3_3", "MatrixOffsetTransformBase_double_3_3")  # same 12 parameters


@dataclass(frozen=True)
class DisplacementField:
    """A dense displacement (X,Y,Z,3) in RAS mm on `reference`: world point p maps to p + disp(p).

    `reference` is the grid the field is defined on (fixed/target); `moving` (source) is the grid of
    the image the mapped points fall in, when known (files do not record it).
    """

    disp_ras_mm: np.ndarray
    reference: Grid
    moving: Grid | None = None
    what: ClassVar[str] = "a displacement field"

    def __post_init__(self) -> None:
        if tuple(np.shape(self.disp_ras_mm)) != (*self.reference.shape, 3):
            raise ValueError(f"displacement of shape {np.shape(self.disp_ras_mm)} on a grid of shape "
                             f"{tuple(self.reference.shape)}; expected (X,Y,Z,3)")

    def map(self, points_ras: np.ndarray) -> np.ndarray:
        """Moving-world points (N,3) for reference-world points, trilinear between voxel centres.

        As in ITK: the edge value up to half a voxel beyond the outer centres, no displacement further out.
        """
        from scipy.ndimage import map_coordinates  # here: importing scipy.ndimage costs `register` 0.2-0.3 s

        p = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
        ijk = (np.linalg.inv(self.reference.affine) @ np.c_[p, np.ones(len(p))].T)[:3]
        d = np.asarray(self.disp_ras_mm, dtype=np.float64)
        inside = np.all((ijk >= -0.5) & (ijk <= np.array(self.reference.shape)[:, None] - 0.5), axis=0)
        return p + inside[:, None] * np.stack([map_coordinates(d[..., k], ijk, order=1, mode="nearest")
                                               for k in range(3)], axis=1)


@dataclass(frozen=True)
class AffineTransform:
    """A 4x4 world map (RAS mm) from reference (fixed/target) points to moving (source) points."""

    world: np.ndarray
    reference: Grid | None = None
    moving: Grid | None = None
    what: ClassVar[str] = "an affine"

    def __post_init__(self) -> None:
        w = np.asarray(self.world, dtype=np.float64)
        if w.shape != (4, 4) or not np.all(np.isfinite(w)) or not np.allclose(w[3], [0, 0, 0, 1]):
            raise ValueError(f"not a finite 4x4 affine map with last row 0 0 0 1: {w.tolist()}")

    def map(self, points_ras: np.ndarray) -> np.ndarray:
        """Moving-world points (N,3) for reference-world points."""
        p = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
        w = np.asarray(self.world, dtype=np.float64)
        return p @ w[:3, :3].T + w[:3, 3]


Transform = Union[DisplacementField, AffineTransform]


# ------------------------------------------------------------------------------------ the formats
def _write_field(xfm: DisplacementField, path: Path, *, intent: int, lps: bool) -> Path:
    """Write the field as (X,Y,Z,1,3) float32 NIfTI with `intent`, its vectors in LPS (ITK) or RAS."""
    d = np.asarray(xfm.disp_ras_mm, dtype=np.float32)
    if lps:
        d = d @ LPS.astype(np.float32)
    return save_volume(d[:, :, :, None, :], xfm.reference.affine, path, dtype=np.float32, intent=(intent, ""))


def _read_field(path: Path, *, intent: int, lps: bool) -> DisplacementField:
    """Read an (X,Y,Z,1,3) or (X,Y,Z,3) NIfTI displacement whose intent is `intent`, vectors in LPS or RAS."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for missing or corrupt files
        raise AtlasMorphError(f"{path}: not a readable displacement field ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image):
        raise AtlasMorphError(f"{path}: displacement fields are read from NIfTI files (.nii, .nii.gz)")
    code = int(img.header["intent_code"])
    if code != intent:
        names = {f.intent: n for n, f in FORMATS.items() if f.intent}
        raise AtlasMorphError(f"{path}: NIfTI intent {code} ({names.get(code, 'no displacement format')}), not "
                              f"{intent} ({names[intent]}); read it with the format that wrote it")
    shape = img.shape
    if len(shape) not in (4, 5) or shape[-1] != 3 or (len(shape) == 5 and shape[3] != 1):
        raise AtlasMorphError(f"{path}: shape {shape} is not a 3D displacement field (X,Y,Z,1,3)")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, str(path))
    d = np.asarray(img.dataobj, dtype=np.float32).reshape(*shape[:3], 3)
    if lps:
        d = d @ LPS.astype(np.float32)
    return DisplacementField(d, Grid(tuple(int(s) for s in shape[:3]), affine))


def _write_itk_affine(xfm: AffineTransform, path: Path) -> Path:
    """Write the world map as ITK text: LPS matrix and translation, centre (FixedParameters) 0."""
    lps = _LPS4 @ np.asarray(xfm.world, dtype=np.float64) @ _LPS4
    params = " ".join(f"{v:.10g}" for v in [*lps[:3, :3].ravel(), *lps[:3, 3]])
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            "Transform: AffineTransform_double_3_3\n"
            f"Parameters: {params}\nFixedParameters: 0 0 0\n")
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _read_itk_affine(path: Path) -> AffineTransform:
    """Read one ITK text affine (x -> A(x - c) + t + c in LPS, c = FixedParameters) as a RAS world map."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasMorphError(f"{path}: not a readable ITK text transform ({exc})") from exc
    fields = [tuple(s.strip() for s in ln.split(":", 1)) for ln in lines if ":" in ln and not ln.startswith("#")]
    kinds = [v for k, v in fields if k == "Transform"]
    if len(kinds) != 1 or kinds[0] not in _ITK_AFFINES:
        raise AtlasMorphError(f"{path}: expected one ITK transform of type {_ITK_AFFINES[0]}, found {kinds}")
    values = dict(fields)
    try:
        params = np.array(values.get("Parameters", "").split(), dtype=np.float64)
        centre = np.array(values.get("FixedParameters", "0 0 0").split(), dtype=np.float64)
    except ValueError as exc:
        raise AtlasMorphError(f"{path}: unreadable transform parameters ({exc})") from None
    if params.size != 12 or centre.size != 3 or not np.all(np.isfinite(params)):
        raise AtlasMorphError(f"{path}: an affine needs 12 finite Parameters and 3 FixedParameters, "
                              f"found {params.size} and {centre.size}")
    a = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = params[9:] + centre - a @ centre
    return AffineTransform(_LPS4 @ lps @ _LPS4)


@dataclass(frozen=True)
class TransformFormat:
    """One file format: the kind of transform it holds, its reader and its writer."""

    kind: type
    read: Callable[[Path], Transform]
    write: Callable[[Transform, Path], Path]
    intent: int = 0  # the NIfTI intent code of a displacement format


FORMATS: dict[str, TransformFormat] = {
    "fs": TransformFormat(DisplacementField, partial(_read_field, intent=1006, lps=False),
                          partial(_write_field, intent=1006, lps=False), intent=1006),
    "itk": TransformFormat(DisplacementField, partial(_read_field, intent=1007, lps=True),
                           partial(_write_field, intent=1007, lps=True), intent=1007),
    "itk-txt": TransformFormat(AffineTransform, _read_itk_affine, _write_itk_affine),
}


def formats_for(kind: type) -> tuple[str, ...]:
    """Names of the formats holding transforms of `kind` (e.g. the choices of --warp-format)."""
    return tuple(name for name, f in FORMATS.items() if f.kind is kind)


WARP_FORMATS = formats_for(DisplacementField)


def transform_format(name: str, kind: type | None = None) -> TransformFormat:
    """The format called `name` (holding `kind`, when given), or an error listing the valid names."""
    names = ", ".join(formats_for(kind) if kind is not None else FORMATS)
    if name not in FORMATS:
        raise AtlasMorphError(f"unknown transform format '{name}' (use one of {names})")
    if kind is not None and FORMATS[name].kind is not kind:
        raise AtlasMorphError(f"format '{name}' holds {FORMATS[name].kind.what}, not {kind.what} (use one of {names})")
    return FORMATS[name]


def read_transform(path: Path | str, fmt: str) -> Transform:
    """Read a transform file written in format `fmt`."""
    return transform_format(fmt).read(Path(path))


def write_transform(xfm: Transform, path: Path | str, fmt: str) -> Path:
    """Write `xfm` in format `fmt`, atomically (inside all_or_nothing(), with the other outputs)."""
    return transform_format(fmt, type(xfm)).write(xfm, Path(path))
