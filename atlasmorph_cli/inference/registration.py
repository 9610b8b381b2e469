"""One subject registered to its template, and every output computed from that registration.

Data flow of `register_subject`: brain mask + normalise -> affine fit to the attribute-matched
template -> RegNet (-> refinement) -> integrate -> compose the deformable field with the affine ->
resample ONCE into whichever grid an output lives on (`Registration`'s methods).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..geometry.affine import fit_affine
from ..geometry.intensity import brain_mask, normalize
from ..io.volumes import Volume
from ..io.stream import save_frames
from ..labels import to_freesurfer
from ..model.loss_weights import LossWeights
from ..model.model_file import AtlasMorph
from ..model.layers import jacobian_determinant, sample_at, splat_weights
from ..model.networks import velocity_to_displacements
from ..errors import AtlasMorphError
from .acquisition import slice_blur_widths
from .refine import refine_velocity
from .refine_defaults import NCC_REFINE_WEIGHT, REFINE_LOSS, REFINE_LOSSES, REFINE_LR, REFINE_STEPS
from .template import Template, make_template
from ..geometry.space import Grid, grid_coords, resample, voxel_map

if TYPE_CHECKING:  # imported where used: geometry.transforms imports scipy (0.2-0.3 s), which segment does not need
    from ..geometry.transforms import AffineTransform, DisplacementField

CHUNK_VOXELS = 1 << 20  # native outputs are computed in slabs of about a million voxels
BACKGROUND_SURE = 0.501  # labels_to_native: background wins wherever every corner is this sure (0.5 + float slack)


# ----------------------------------------------------------------------------------------- register
@dataclass
class Registration:
    """Subject <-> template: affine world map and deformable fields, all on the model grid.

    `world` maps model-grid world points (RAS mm) to the subject's world. The two displacements (3,X,Y,Z,
    model voxels, the network's `fwd` and `inv`) are named for what they move: `template_to_subject_field`
    pulls the template into the subject's affinely aligned frame (sampled at subject-frame points, it
    points into the template: the -T warp), `subject_to_template_field` pulls the subject onto the
    template grid (sampled at template points, it points into the subject's frame: the -t warp).
    """

    template: Template
    world: np.ndarray
    template_to_subject_field: torch.Tensor
    subject_to_template_field: torch.Tensor
    subject: Volume
    brain: np.ndarray
    velocity: torch.Tensor | None = None  # (3, X/2, Y/2, Z/2): fwd = exp(velocity); build averages it

    @property
    def grid(self) -> Grid:
        return self.template.grid

    @property
    def subject_grid(self) -> Grid:
        return Grid(self.subject.shape, self.subject.affine)

    # -- maps from an output grid into the grid we sample from, applied once --------------------
    def native_to_template_coords(self, native_shape, native_affine, rows: slice) -> torch.Tensor:
        """Template-grid voxel coordinates (1,3,n,Y,Z) for native voxels in `rows` of axis 0."""
        m = voxel_map(self.grid.affine, native_affine, np.linalg.inv(self.world))
        m = m @ _row_offset(rows.start)
        y = grid_coords(m, (rows.stop - rows.start, *native_shape[1:]))  # aligned-frame positions
        return y + sample_at(self.template_to_subject_field[None], y, padding_mode="border")

    def template_to_native_coords(self) -> torch.Tensor:
        """Subject voxel coordinates (1,3,X,Y,Z) for every template-grid voxel (inverse field + affine)."""
        z = grid_coords(np.eye(4), self.grid.shape) + self.subject_to_template_field[None]
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
        """Hard FreeSurfer labels and per-class probability sums (for volumes) in native space.

        The same numbers as sampling all 35 classes at every native voxel, at a fraction of the cost:
        a voxel whose trilinear corners all have background probability >= BACKGROUND_SURE is background
        (no class can outscore it), so only the others are sampled in every class; and the sums, by
        linearity of the sampling, are sum_x p(x) W(x) over the template grid, W the native voxels'
        summed weights (layers.splat_weights).
        """
        probs = torch.from_numpy(self.template.probs)
        unsure = (probs[0] < BACKGROUND_SURE).float()[None, None]  # corners where a structure could win
        probs_cl = probs[None].contiguous(memory_format=torch.channels_last_3d)  # classes of a voxel together
        shape = self.subject.shape
        labels = np.zeros(shape, dtype=np.int32)
        weight = torch.zeros(probs.shape[1:])
        for rows in _slabs(shape):
            c = self.native_to_template_coords(shape, self.subject.affine, rows)
            splat_weights(c[0].reshape(3, -1), probs.shape[1:], out=weight)
            at = (sample_at(unsure, c, padding_mode="zeros")[0, 0] > 0).nonzero(as_tuple=True)
            if len(at[0]) == 0:
                continue
            points = c[0][:, at[0], at[1], at[2]][None, :, :, None, None]  # (1, 3, n, 1, 1)
            p = sample_at(probs_cl, points, padding_mode="zeros")[0, :, :, 0, 0]
            p[0] += 1.0 - p.sum(0)  # outside the template grid counts as background
            labels[rows][tuple(i.numpy() for i in at)] = to_freesurfer(p.max(0).indices.numpy())  # argmax, 3x faster
        # in float64: a float32 product of these 600k-long rows is off by up to 1e-3 (relative)
        sums = (probs.reshape(len(probs), -1).double() @ weight.reshape(-1).double()).numpy()
        sums[0] += float(np.prod(shape)) - sums.sum()  # what falls outside the grid is background
        return labels, sums

    def probs_to_native(self) -> np.ndarray:
        """Template label probabilities (C, X, Y, Z) in native space."""
        p = self.to_native(self.template.probs)
        p[0] += 1.0 - p.sum(0)
        return p

    def subject_to_template(self, image: np.ndarray | None = None) -> np.ndarray:
        """The subject (normalised brain by default; or any native (X,Y,Z) or (C,X,Y,Z) image) moved onto the
        template grid, one interpolation."""
        vol = self.brain if image is None else image
        src = torch.from_numpy(np.ascontiguousarray(vol if vol.ndim == 4 else vol[None], dtype=np.float32))
        out = sample_at(src[None], self.template_to_native_coords(), padding_mode="zeros")[0].numpy()
        return out if vol.ndim == 4 else out[0]

    def subject_to_template_transform(self) -> DisplacementField:
        """The -t warp, which pulls the subject onto the template: on the template grid (RAS mm),
        template point -> subject point."""
        from ..geometry.transforms import DisplacementField

        c = self.template_to_native_coords()[0].double()
        aff = torch.as_tensor(self.subject.affine, dtype=torch.float64)
        world_subj = torch.einsum("ab,bxyz->axyz", aff[:3, :3], c) + aff[:3, 3].view(3, 1, 1, 1)
        world_tmpl = grid_coords(self.grid.affine, self.grid.shape, torch.float64)[0]
        return DisplacementField((world_subj - world_tmpl).permute(1, 2, 3, 0).numpy(), self.grid, self.subject_grid)

    def template_to_subject_transform(self) -> DisplacementField:
        """The -T warp, which pulls the template onto the subject: on the subject grid (RAS mm),
        subject point -> template point."""
        from ..geometry.transforms import DisplacementField

        shape, aff = self.subject.shape, self.subject.affine
        out = np.zeros((*shape, 3), dtype=np.float32)  # computed in float64 slab by slab, stored as written
        g = torch.as_tensor(self.grid.affine, dtype=torch.float64)
        for rows in _slabs(shape):
            c = self.native_to_template_coords(shape, aff, rows)[0].double()
            world_t = torch.einsum("ab,bxyz->axyz", g[:3, :3], c) + g[:3, 3].view(3, 1, 1, 1)
            world_s = grid_coords(aff @ _row_offset(rows.start), (rows.stop - rows.start, *shape[1:]), torch.float64)[0]
            out[rows] = (world_t - world_s).permute(1, 2, 3, 0).numpy()
        return DisplacementField(out, self.subject_grid, self.grid)

    def affine_transform(self) -> AffineTransform:
        """The affine part (--affine): template-grid world point -> subject world point."""
        from ..geometry.transforms import AffineTransform

        return AffineTransform(self.world, self.grid, self.subject_grid)

    def log_jacobian(self) -> np.ndarray:
        """log det of the deformable template -> subject map on the template grid (affine excluded)."""
        det = jacobian_determinant(self.subject_to_template_field[None])[0].numpy()
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
    """Brain mask (given mask, else the non-zero voxels of a brain-extracted T1; checked by
    geometry.intensity.brain_mask) and the normalised brain."""
    m = brain_mask(subject, mask, str(subject.source) if subject.source is not None else None)
    return m, normalize(subject.data, m)


@torch.no_grad()
def register_subject(model: AtlasMorph, subject: Volume, attrs: torch.Tensor | None, mask: Volume | None = None,
             refine: int = REFINE_STEPS, refine_lr: float = REFINE_LR, template: Template | None = None,
             refine_loss: str = REFINE_LOSS, world: np.ndarray | None = None,
             acquisition_blur: bool = True) -> Registration:
    """Affine + deformable registration of a subject to its attribute-matched template (or to `template`,
    e.g. one read by --template or one being built); `refine` > 0 adds that many instance-optimisation
    steps (Adam, `refine_lr`, image term `refine_loss`) on the RegNet's velocity (inference.refine), comparing
    the subject with the template blurred as the subject's voxels blur it (thick slices; inference.acquisition;
    `acquisition_blur=False` compares with the sharp template, for benchmarks).
    `world` (template grid world -> subject world), when given, is used instead of fitting the affine
    (build keeps each subject's first-round affine)."""
    tmpl = template if template is not None else make_template(model, attrs)
    m, brain = subject_brain(subject, mask)
    if world is None:
        world = fit_affine(brain, subject.affine, tmpl.t1 * (tmpl.probs[0] < 0.5), tmpl.grid)
    x = torch.from_numpy(resample(brain, subject.affine, tmpl.grid, world=world))[None, None]
    t1 = torch.from_numpy(tmpl.t1)[None, None]
    vel = model.reg_net(x, t1)
    if refine:
        blur = slice_blur_widths(subject.affine, world, tmpl.grid.affine) if acquisition_blur else (1, 1, 1)
        vel = refine_velocity(vel, x, t1, refine, lr=refine_lr, blur=blur, **refine_weights(model, refine_loss))
    fwd, inv, _ = velocity_to_displacements(vel, model.config.int_steps)
    return Registration(tmpl, world, fwd[0], inv[0], subject, brain, vel[0])


def refine_weights(model: AtlasMorph, loss: str = REFINE_LOSS) -> dict:
    """Refinement terms: local NCC at weight NCC_REFINE_WEIGHT ("ncc"), or the image loss and weights the model
    was trained with ("model"; defaults if unrecorded), with the model's smoothness weight."""
    if loss not in REFINE_LOSSES:
        raise AtlasMorphError(f"unknown refinement loss '{loss}' (choose from {', '.join(REFINE_LOSSES)})")
    w = {**asdict(LossWeights()), **(model.config.loss_weights or {})}
    if loss == "ncc":
        return {"w_image": NCC_REFINE_WEIGHT, "w_smooth": float(w["smooth"]), "image_loss": "ncc",
                "int_steps": model.config.int_steps}
    return {"w_image": float(w["image"]), "w_smooth": float(w["smooth"]),
            "image_loss": model.config.training.get("image_loss", "mse"), "int_steps": model.config.int_steps}


def save_native_probs(reg, path: Path | str) -> Path:
    """The template's label probabilities in the subject's space (background + 34 frames), streamed.

    The native-to-template coordinates are computed once (12 bytes per native voxel); each frame is
    then sampled slab by slab and written. Frame 0 (background) also takes what lies outside the
    template grid: 1 - the sum of the structure frames, as `Registration.probs_to_native` does.
    """
    shape, aff = reg.subject.shape, reg.subject.affine
    coords = torch.empty((1, 3, *shape), dtype=torch.float32)
    for rows in _slabs(shape):
        coords[:, :, rows] = reg.native_to_template_coords(shape, aff, rows)
    probs = torch.from_numpy(np.ascontiguousarray(reg.template.probs, dtype=np.float32))
    structures = probs[1:].sum(0)

    def frame(c: int) -> np.ndarray:
        src = (probs[c] if c else structures)[None, None]
        out = np.empty(shape, dtype=np.float32)
        for rows in _slabs(shape):
            out[rows] = sample_at(src, coords[:, :, rows], padding_mode="zeros")[0, 0].numpy()
        return out if c else 1.0 - out

    return save_frames(path, shape, probs.shape[0], aff, frame)
