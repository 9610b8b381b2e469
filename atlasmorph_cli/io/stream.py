"""A 4D image written one frame at a time, so memory does not grow with the number of frames.

`segment --probs` on a 1 mm 256 x 256 x 180 image has 35 frames of 11.8 M voxels: 1.65 GB as one
float32 array, held twice while nibabel wrote it (4.1 GB peak). NIfTI and MGH store the frame axis
last in Fortran order, i.e. frame after frame on disk, so `save_frames` writes the header, then each
frame as soon as it is computed, then (MGH) the footer: the same bytes as nibabel writes for the
whole array (checked by a test), through `io.volumes.atomic_path` as every output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from nibabel.volumeutils import seek_tell

from .volumes import atomic_path, suffix_of


def save_frames(path: Path | str, shape: tuple[int, int, int], n_frames: int, affine: np.ndarray,
                frame: Callable[[int], np.ndarray], xform_code: int = 1) -> Path:
    """Write a float32 (X, Y, Z, n_frames) image whose frame c is `frame(c)` (an (X, Y, Z) array)."""
    path = Path(path)
    suffix = suffix_of(path)
    placeholder = np.broadcast_to(np.float32(0), (*shape, n_frames))  # shape only; no memory
    if suffix == ".mgz":
        img = nib.MGHImage(placeholder, affine)
        img.update_header()
    else:
        img = nib.Nifti1Image(placeholder, affine)
        img.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)
        img.set_qform(affine, code=xform_code)
        img.set_sform(affine, code=xform_code)
        img.header.set_xyzt_units("mm", "sec")
        img.update_header()
    hdr = img.header
    dtype = hdr.get_data_dtype()
    with atomic_path(path) as tmp, ImageOpener(str(tmp), "wb") as fh:
        if suffix == ".mgz":
            hdr.writehdr_to(fh)
        else:
            hdr.write_to(fh)
        seek_tell(fh, hdr.get_data_offset(), write0=True)
        for c in range(n_frames):
            data = np.asarray(frame(c))
            if data.shape != tuple(shape):
                raise ValueError(f"frame {c} has shape {data.shape}, expected {tuple(shape)}")
            fh.write(data.astype(dtype, copy=False).tobytes(order="F"))
        if suffix == ".mgz":
            hdr.writeftr_to(fh)
    return path
