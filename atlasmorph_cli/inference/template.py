"""The template a subject is registered to: attribute-matched (attributes -> template network -> T1, labels,
probabilities) or read from files (--template/--template-labels)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..errors import AtlasMorphError
from ..geometry.intensity import normalize
from ..geometry.space import Grid, resample
from ..io.volumes import Volume, load_volume, suffix_of
from ..limits import check_image_shape
from ..labels import FS_IDS, N_CLASSES, to_freesurfer, to_index
from ..model.model_file import AtlasMorph


def encode_attributes(model: AtlasMorph, values: dict[str, object] | None) -> tuple[torch.Tensor, list[str]]:
    """(1, A) attribute vector (population average when `values` is None) and any warnings."""
    enc = model.config.encoder
    if values is None or all(v is None for v in values.values()):
        return torch.from_numpy(enc.encode_average())[None], []
    enc.check_names({k: v for k, v in values.items() if v is not None})
    parsed, warnings = enc.parse(values)
    return torch.from_numpy(enc.encode(parsed))[None], warnings


@dataclass
class Template:
    """A template on the model grid: T1 (X,Y,Z), label probabilities (C,X,Y,Z), hard FreeSurfer labels."""

    t1: np.ndarray
    probs: np.ndarray
    grid: Grid

    @property
    def labels(self) -> np.ndarray:
        # torch's max(0).indices = numpy's argmax(0) (the first maximum), about 3x faster
        return to_freesurfer(torch.from_numpy(self.probs).max(0).indices.numpy()).astype(np.int32)


@torch.no_grad()
def make_template(model: AtlasMorph, attrs: torch.Tensor) -> Template:
    """Run the template network for one attribute vector."""
    t1, logits = model.template(attrs)
    probs = torch.softmax(logits, 1)
    return Template(t1[0, 0].clamp(0, 1).numpy(), probs[0].numpy(), model.config.model_grid)


# ----------------------------------------------------------------------------------------- from files
def load_template(t1_path: Path, labels_path: Path, grid: Grid) -> tuple[Template, list[str]]:
    """A template read from files (--template/--template-labels, e.g. written by `atlasmorph build`) and warnings.

    The T1 is a 3D image in MNI space; the labels a 3D map of FreeSurfer ids (the 34 structures of
    labels.py, 0 background) or a 4D map of their probabilities (background + 34, channels last, as
    `template --probs` writes it). Both are resampled onto the model grid `grid` by world coordinates
    when they lie on another grid (with a warning). Every problem is one AtlasMorphError line.
    """
    t1 = load_volume(t1_path)
    labels = _load_labels(Path(labels_path))
    warnings: list[str] = []
    if t1.data.ndim != 3:
        raise AtlasMorphError(f"--template {t1_path}: the template T1 must be a 3D image, got shape {t1.data.shape}")
    data = t1.data.astype(np.float32)
    if not _on_grid(t1, grid):
        warnings.append(f"--template {t1_path}: not on the model grid {grid.shape} (2 mm, MNI); resampled onto it")
        data = resample(data, t1.affine, grid)
    probs = _label_probs(labels, labels_path, grid, warnings)
    brain = probs[0] < 0.5
    if brain.sum() < 1000:
        raise AtlasMorphError(f"--template-labels {labels_path}: fewer than 1000 brain voxels on the model grid "
                              "(is it in MNI space?)")
    inside = data[brain]
    if not np.any(data) or float(inside.max() - inside.min()) <= 0:
        raise AtlasMorphError(f"--template {t1_path}: the template is empty or constant inside its labels' brain "
                              "(is it in MNI space?)")
    if data.min() < -1e-3 or data.max() > 1.0 + 1e-3:  # not the model's 0..1 scale: brought onto it
        data = normalize(data, brain) * brain
    return Template(np.ascontiguousarray(data, dtype=np.float32), probs, grid), warnings


def _on_grid(vol: Volume, grid: Grid) -> bool:
    return tuple(vol.shape[:3]) == tuple(grid.shape) and np.allclose(vol.affine, grid.affine, atol=1e-3)


def _load_labels(path: Path) -> Volume:
    """A 3D label map (io.volumes.load_volume's checks) or a 4D probability map (read here: load_volume takes 3D)."""
    try:
        shape = nib.load(str(path)).shape if path.is_file() else ()
    except Exception:  # unreadable: load_volume words the error
        shape = ()
    if len(shape) != 4 or shape[3] == 1:
        return load_volume(path)
    suffix_of(path)
    check_image_shape(shape[:3], path)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise AtlasMorphError(f"--template-labels {path}: the map contains NaN or Inf values")
    return Volume(data, np.asarray(img.affine, dtype=np.float64), img.header, path)


def _label_probs(labels: Volume, path: Path, grid: Grid, warnings: list[str]) -> np.ndarray:
    """(C, X, Y, Z) probabilities on `grid` of a FreeSurfer-id map or a 4D probability map."""
    flag = f"--template-labels {path}"
    data = labels.data
    if data.ndim == 4:
        if data.shape[3] != N_CLASSES:
            raise AtlasMorphError(f"{flag}: a 4D label map must have {N_CLASSES} frames (background + 34 "
                                  f"structures), got {data.shape[3]}")
        if data.min() < -1e-3 or data.max() > 1 + 1e-3:
            raise AtlasMorphError(f"{flag}: a 4D label map holds probabilities in [0, 1], got values in "
                                  f"[{data.min():g}, {data.max():g}]")
        probs = data.astype(np.float32)
    elif data.ndim == 3:
        ids = np.unique(data)
        if not np.allclose(ids, np.rint(ids)):
            raise AtlasMorphError(f"{flag}: a 3D label map must hold integer FreeSurfer ids, got fractional values")
        unknown = sorted(set(np.rint(ids).astype(int).tolist()) - {0, *FS_IDS})
        if unknown:
            shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
            raise AtlasMorphError(f"{flag}: ids {shown} are not among the 34 structures (FreeSurfer ids of "
                                  "atlasmorph_cli/labels.py, as `atlasmorph template --labels` writes them)")
        index = to_index(data, "freesurfer")
        probs = np.stack([(index == c) for c in range(N_CLASSES)], -1).astype(np.float32)
    else:
        raise AtlasMorphError(f"{flag}: a label map must be 3D (FreeSurfer ids) or 4D (probabilities), "
                              f"got shape {data.shape}")
    if not _on_grid(labels, grid):
        warnings.append(f"{flag}: not on the model grid {grid.shape} (2 mm, MNI); resampled onto it")
        probs = resample(probs, labels.affine, grid)
        probs[..., 0] += np.clip(1.0 - probs.sum(-1), 0, None)  # outside the map is background
    total = probs.sum(-1, keepdims=True)
    probs = probs / np.where(total > 0, total, 1.0)
    return np.ascontiguousarray(np.moveaxis(probs, -1, 0), dtype=np.float32)
