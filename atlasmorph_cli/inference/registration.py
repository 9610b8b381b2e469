"""template(), register(), segment(): native image in -> model space -> networks -> native outputs.

Data flow of `register`: load -> brain mask + normalise -> affine fit to the attribute-matched
template -> RegNet -> integrate -> compose the deformable field with the affine -> resample ONCE
into whichever grid an output lives on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..geometry.affine import fit_affine
from ..errors import AtlasMorphError
from ..geometry.intensity import normalize
from ..io.volumes import Volume, grid_difference
from ..labels import to_freesurfer
from ..model.loss_weights import LossWeights
from ..limits import check_model_config
from ..model.model_file import AtlasMorph, load_model, read_config, verify_shipped
from ..model.layers import jacobian_determinant, sample_at
from ..model.networks import velocity_to_displacements
from .refine import REFINE_LR, REFINE_STEPS, refine_velocity
from ..geometry.space import Grid, grid_coords, resample, voxel_map

MODEL_GLOB = "atlasmorph-*.safetensors"
CHUNK_VOXELS = 1 << 20  # native outputs are computed in slabs of about a million voxels


# ----------------------------------------------------------------------------------------- the model
def shipped_models() -> list[Path]:
    """Model files installed with the package (or, from a source checkout, in ./models)."""
    found: list[Path] = []
    try:
        found = sorted(Path(str(p)) for p in resources.files("atlasmorph_cli.models").iterdir()
                       if p.name.endswith(".safetensors"))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    if not found:
        found = sorted((Path(__file__).resolve().parents[2] / "models").glob(MODEL_GLOB))
    return found


def is_shipped(path: Path) -> bool:
    """Whether `path` is one of the model files installed with the package."""
    try:
        p = path.resolve()
        return any(p == m.resolve() for m in shipped_models())
    except OSError:
        return False


def resolve_model(path: Path | None) -> Path:
    """The model to use: the one asked for, else the newest shipped model."""
    if path is not None:
        return path
    models = shipped_models()
    if not models:
        raise AtlasMorphError("no shipped model found; pass --model PATH (e.g. a model from `atlasmorph train`)")
    return models[-1]


def encode_attributes(model: AtlasMorph, values: dict[str, object] | None) -> tuple[torch.Tensor, list[str]]:
    """(1, A) attribute vector (population average when `values` is None) and any warnings."""
    enc = model.config.encoder
    if values is None or all(v is None for v in values.values()):
        return torch.from_numpy(enc.encode_average())[None], []
    enc.check_names({k: v for k, v in values.items() if v is not None})
    parsed, warnings = enc.parse(values)
    return torch.from_numpy(enc.encode(parsed))[None], warnings


# ----------------------------------------------------------------------------------------- template
@dataclass
class Template:
    """A template on the model grid: T1 (X,Y,Z), label probabilities (C,X,Y,Z), hard FreeSurfer labels."""

    t1: np.ndarray
    probs: np.ndarray
    grid: Grid

    @property
    def labels(self) -> np.ndarray:
        return to_freesurfer(self.probs.argmax(0)).astype(np.int32)


@torch.no_grad()
def make_template(model: AtlasMorph, attrs: torch.Tensor) -> Template:
    """Run the template network for one attribute vector."""
    t1, logits = model.template(attrs)
    probs = torch.softmax(logits, 1)
    return Template(t1[0, 0].clamp(0, 1).numpy(), probs[0].numpy(), model.config.model_grid)


# ----------------------------------------------------------------------------------------- register
@dataclass
class Registration:
    """Subject <-> template: affine world map and deformable fields, all on the model grid.

    `world` maps model-grid world points (RAS mm) to the subject's world; `fwd` (3,X,Y,Z, model
    voxels) warps the template into the subject's affinely aligned frame, `inv` the other way.
    """

    template: Template
    world: np.ndarray
    fwd: torch.Tensor
    inv: torch.Tensor
    subject: Volume
    brain: np.ndarray

    @property
    def grid(self) -> Grid:
        return self.template.grid

    # -- maps from an output grid into the grid we sample from, applied once --------------------
    def native_to_template_coords(self, native_shape, native_affine, rows: slice) -> torch.Tensor:
        """Template-grid voxel coordinates (1,3,n,Y,Z) for native voxels in `rows` of axis 0."""
        m = voxel_map(self.grid.affine, native_affine, np.linalg.inv(self.world))
        m = m @ _row_offset(rows.start)
        y = grid_coords(m, (rows.stop - rows.start, *native_shape[1:]))  # aligned-frame positions
        return y + sample_at(self.fwd[None], y, padding_mode="border")

    def template_to_native_coords(self) -> torch.Tensor:
        """Subject voxel coordinates (1,3,X,Y,Z) for every template-grid voxel (inverse field + affine)."""
        z = grid_coords(np.eye(4), self.grid.shape) + self.inv[None]
        m = torch.as_tensor(voxel_map(self.subject.affine, self.grid.affine, self.world), dtype=torch.float64)
        zz = z.double()
        out = torch.einsum("ab,nbxyz->naxyz", m[:3, :3], zz) + m[:3, 3].view(1, 3, 1, 1, 1)
        return out.float()

    # -- outputs ---------------------------------------------------------------------------------
    def to_native(self, vol: np.ndarray, mode: str = "bilinear") -> np.ndarray:
        """A model-grid volume (X,Y,Z) or (C,X,Y,Z) pulled into the subject's native grid."""
        src = torch.from_numpy(np.ascontiguousarray(vol if vol.ndim == 4 else vol[None], dtype=np.float32))[None]
        out = np.zeros((src.shape[1], *self.subject.shape), dtype=np.float32)
        for rows in _slabs(self.subject.shape):
            c = self.native_to_template_coords(self.subject.shape, self.subject.affine, rows)
            out[:, rows] = sample_at(src, c, mode=mode, padding_mode="zeros")[0].numpy()
        return out if vol.ndim == 4 else out[0]

    def labels_to_native(self) -> tuple[np.ndarray, np.ndarray]:
        """Hard FreeSurfer labels and per-class probability sums (for volumes) in native space."""
        probs = torch.from_numpy(self.template.probs)[None]
        labels = np.zeros(self.subject.shape, dtype=np.int32)
        sums = np.zeros(probs.shape[1])
        for rows in _slabs(self.subject.shape, probs.shape[1]):
            c = self.native_to_template_coords(self.subject.shape, self.subject.affine, rows)
            p = sample_at(probs, c, padding_mode="zeros")[0]
            p[0] += 1.0 - p.sum(0)  # outside the template grid counts as background
            labels[rows] = to_freesurfer(p.argmax(0).numpy())
            sums += p.sum((1, 2, 3)).double().numpy()
        return labels, sums

    def probs_to_native(self) -> np.ndarray:
        """Template label probabilities (C, X, Y, Z) in native space."""
        p = self.to_native(self.template.probs)
        p[0] += 1.0 - p.sum(0)
        return p

    def subject_to_template(self, image: np.ndarray | None = None) -> np.ndarray:
        """The subject (normalised brain by default) moved onto the template grid, one interpolation."""
        src = torch.from_numpy(np.ascontiguousarray(self.brain if image is None else image, dtype=np.float32))
        return sample_at(src[None, None], self.template_to_native_coords(), padding_mode="zeros")[0, 0].numpy()

    def warp_subject_to_template_mm(self) -> np.ndarray:
        """Displacement (X,Y,Z,3) in RAS mm on the template grid: template point -> subject point."""
        c = self.template_to_native_coords()[0].double()
        aff = torch.as_tensor(self.subject.affine, dtype=torch.float64)
        world_subj = torch.einsum("ab,bxyz->axyz", aff[:3, :3], c) + aff[:3, 3].view(3, 1, 1, 1)
        world_tmpl = grid_coords(self.grid.affine, self.grid.shape, torch.float64)[0]
        return (world_subj - world_tmpl).permute(1, 2, 3, 0).numpy()

    def warp_template_to_subject_mm(self) -> np.ndarray:
        """Displacement (X,Y,Z,3) in RAS mm on the subject grid: subject point -> template point."""
        shape, aff = self.subject.shape, self.subject.affine
        out = np.zeros((*shape, 3), dtype=np.float32)  # computed in float64 slab by slab, stored as written
        g = torch.as_tensor(self.grid.affine, dtype=torch.float64)
        for rows in _slabs(shape):
            c = self.native_to_template_coords(shape, aff, rows)[0].double()
            world_t = torch.einsum("ab,bxyz->axyz", g[:3, :3], c) + g[:3, 3].view(3, 1, 1, 1)
            world_s = grid_coords(aff @ _row_offset(rows.start), (rows.stop - rows.start, *shape[1:]), torch.float64)[0]
            out[rows] = (world_t - world_s).permute(1, 2, 3, 0).numpy()
        return out

    def log_jacobian(self) -> np.ndarray:
        """log det of the deformable template -> subject map on the template grid (affine excluded)."""
        det = jacobian_determinant(self.inv[None])[0].numpy()
        return np.log(np.clip(det, 1e-6, None))


def _row_offset(start: int) -> np.ndarray:
    m = np.eye(4)
    m[0, 3] = start
    return m


def _slabs(shape: tuple[int, ...], channels: int = 1) -> list[slice]:
    per_row = int(np.prod(shape[1:])) * max(1, channels // 8)
    step = max(1, CHUNK_VOXELS // max(per_row, 1))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


def subject_brain(subject: Volume, mask: Volume | None) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask (given mask, else the non-zero voxels of a brain-extracted T1) and the normalised brain."""
    name = f"{subject.source}: " if subject.source is not None else ""
    if mask is not None:
        if mask.shape != subject.shape or not np.allclose(mask.affine, subject.affine, atol=1e-3):
            raise AtlasMorphError(
                f"{name}the mask is on another grid than the image "
                f"({grid_difference(mask.shape, mask.affine, subject.shape, subject.affine)}); "
                "resample it to the image first"
            )
        m = mask.data > 0
    else:
        m = subject.data != 0
    if not np.any(subject.data):
        raise AtlasMorphError(f"{name}the image is all zeros")
    if m.sum() < 1000:
        raise AtlasMorphError(f"{name}the image (or its mask) has no brain: fewer than 1000 non-zero voxels")
    vals = subject.data[m]
    if float(vals.max() - vals.min()) <= 0:
        raise AtlasMorphError(f"{name}the image is constant inside the brain")
    return m, normalize(subject.data, m)


@torch.no_grad()
def register(model: AtlasMorph, subject: Volume, attrs: torch.Tensor, mask: Volume | None = None,
             refine: int = REFINE_STEPS, refine_lr: float = REFINE_LR) -> Registration:
    """Affine + deformable registration of a subject to its attribute-matched template; `refine` > 0
    adds that many instance-optimisation steps (Adam, `refine_lr`) on the RegNet's velocity (refine.py)."""
    tmpl = make_template(model, attrs)
    m, brain = subject_brain(subject, mask)
    fixed = tmpl.t1 * (tmpl.probs[0] < 0.5)
    world = fit_affine(brain, subject.affine, fixed, tmpl.grid)
    x = torch.from_numpy(resample(brain, subject.affine, tmpl.grid, world=world))[None, None]
    t1 = torch.from_numpy(tmpl.t1)[None, None]
    vel = model.reg_net(x, t1)
    if refine:
        vel = refine_velocity(vel, x, t1, refine, lr=refine_lr, **refine_weights(model))
    fwd, inv, _ = velocity_to_displacements(vel, model.config.int_steps)
    return Registration(tmpl, world, fwd[0], inv[0], subject, brain)


def refine_weights(model: AtlasMorph) -> dict:
    """Image and smoothness weights and image loss the model was trained with (defaults if unrecorded)."""
    w = {**asdict(LossWeights()), **(model.config.loss_weights or {})}
    return {"w_image": float(w["image"]), "w_smooth": float(w["smooth"]),
            "image_loss": model.config.training.get("image_loss", "mse"), "int_steps": model.config.int_steps}


def load(path: Path | None, threads: int | None = None) -> tuple[Path, AtlasMorph]:
    """Resolve and load a model (the shipped one by default, checksum-verified), setting torch's threads."""
    if threads:
        torch.set_num_threads(threads)
    p = resolve_model(path)
    if is_shipped(p):
        verify_shipped(p)  # its sha256 must match models/<name>.sha256
    check_model_config(read_config(p), p)  # before building it: int_steps, grid and widths in range
    model = load_model(p)
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AtlasMorphError(f"{p}: the model has NaN/Inf weights ({len(bad)} tensors, e.g. {bad[0]}); "
                              "it cannot give meaningful outputs (a diverged training run?)")
    return p, model
