"""The model grid (MNI152 world coordinates, 2 mm, RAS) and resampling between any grid and it.

The grid is 80 x 96 x 80 voxels of 2 mm (160 x 192 x 160 mm, every side divisible by 16 for the
U-Net). Its voxel centres run x = -79..79, y = -111..79, z = -73..85 mm, which holds the MNI152 brain
(x -70..71, y -106..73, z -69..81 mm in the DLMUSE mask) with a 4-9 mm margin on every side.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.layers import sample_at


@dataclass(frozen=True)
class Grid:
    """A voxel grid: its shape and voxel-to-world (RAS mm) affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "affine": np.asarray(self.affine).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(int(s) for s in d["shape"]), np.asarray(d["affine"], dtype=np.float64))


MODEL_GRID = Grid(
    shape=(80, 96, 80),
    affine=np.array(
        [[2.0, 0, 0, -79.0], [0, 2.0, 0, -111.0], [0, 0, 2.0, -73.0], [0, 0, 0, 1.0]]
    ),
)


def voxel_map(src_affine: np.ndarray, dst_affine: np.ndarray, world: np.ndarray | None = None) -> np.ndarray:
    """4x4 matrix taking destination voxel indices to source voxel indices.

    `world` (4x4, optional) maps destination world points to source world points (the pull-back
    transform, e.g. an affine registration result); identity when omitted.
    """
    w = np.eye(4) if world is None else np.asarray(world, dtype=np.float64)
    return np.linalg.inv(src_affine) @ w @ dst_affine


def grid_coords(matrix: np.ndarray, shape: tuple[int, int, int], dtype=torch.float32) -> torch.Tensor:
    """Source voxel coordinates (1, 3, X, Y, Z) of every destination voxel under a 4x4 voxel map."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, X, Y, Z)
    m = torch.as_tensor(matrix, dtype=torch.float64)
    coords = torch.einsum("ab,bxyz->axyz", m[:3, :3], ijk) + m[:3, 3].view(3, 1, 1, 1)
    return coords.unsqueeze(0).to(dtype)


def resample(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst: Grid,
    world: np.ndarray | None = None,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Resample a 3D (or 4D, channels last) array onto `dst`; order 1 = trilinear, 0 = nearest."""
    arr = np.asarray(data, dtype=np.float32)
    vol = torch.from_numpy(arr if arr.ndim == 4 else arr[..., None]).permute(3, 0, 1, 2)[None]
    coords = grid_coords(voxel_map(src_affine, dst.affine, world), dst.shape)
    mode = "bilinear" if order == 1 else "nearest"
    out = sample_at(vol - fill, coords, mode=mode, padding_mode="zeros") + fill
    out = out[0].permute(1, 2, 3, 0).numpy()
    return out if arr.ndim == 4 else out[..., 0]


def resample_labels(
    labels: np.ndarray,
    src_affine: np.ndarray,
    dst: Grid,
    world: np.ndarray | None = None,
    partial_volume: bool = True,
) -> np.ndarray:
    """Resample an integer label map; partial volume = the label whose one-hot interpolates highest.

    Classes are processed one at a time so memory stays at a few volumes whatever the label count.
    """
    lab = np.asarray(labels)
    if not partial_volume:
        return np.rint(resample(lab.astype(np.float32), src_affine, dst, world, order=0)).astype(lab.dtype)
    best = np.zeros(dst.shape, dtype=np.float32)
    out = np.zeros(dst.shape, dtype=lab.dtype)
    for value in np.unique(lab):
        if value == 0:
            continue
        p = resample((lab == value).astype(np.float32), src_affine, dst, world, order=1)
        take = p > best
        out[take] = value
        best[take] = p[take]
    bg = resample((lab == 0).astype(np.float32), src_affine, dst, world, order=1, fill=1.0)
    out[bg > best] = 0
    return out
