"""Writers for transforms: NIfTI displacement fields (FreeSurfer or ITK/ANTs flavour) and ITK affines.

FreeSurfer 8 (`mri_synthmorph`) writes displacements in RAS mm, shape (X,Y,Z,1,3), intent 1006
(NIFTI_INTENT_DISPVECT). ITK/ANTs read displacement fields in LPS mm with intent 1007
(NIFTI_INTENT_VECTOR). Both map a point of the fixed (output) grid to the moving (input) image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import AtlasMorphError
from .io.volumes import atomic_path, save_volume

LPS = np.diag([-1.0, -1.0, 1.0])
WARP_FORMATS = ("fs", "itk")


def save_displacement(disp_ras_mm: np.ndarray, affine: np.ndarray, path: Path, fmt: str = "fs") -> Path:
    """Write a (X,Y,Z,3) RAS-mm displacement field on the grid `affine` in the chosen convention."""
    if fmt not in WARP_FORMATS:
        raise AtlasMorphError(f"unknown warp format '{fmt}' (use one of {', '.join(WARP_FORMATS)})")
    d = np.asarray(disp_ras_mm, dtype=np.float32)
    if fmt == "itk":
        d = d @ LPS.astype(np.float32)
        intent = (1007, "")
    else:
        intent = (1006, "")
    return save_volume(d[:, :, :, None, :], affine, path, dtype=np.float32, intent=intent)


def save_itk_affine(world: np.ndarray, path: Path) -> Path:
    """Write a 4x4 RAS world map (fixed point -> moving point) as an ITK/ANTs text transform (LPS)."""
    m = np.eye(4)
    m[:3, :3] = LPS
    lps = m @ world @ m
    params = " ".join(f"{v:.10g}" for v in [*lps[:3, :3].ravel(), *lps[:3, 3]])
    text = (
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {params}\nFixedParameters: 0 0 0\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
