"""Group-wise template construction (`atlasmorph build`): the classical unbiased recipe around a registration.

Each iteration registers every subject to the current template T, averages the subjects moved into
T's space (A = mean_i S_i o phi_i^-1), then corrects the shape: phi_i = exp(v_i) maps the subject's
frame into T, so the mean deformation exp(mean v) is the bias of T's shape relative to the group, and
the new template is A o exp(mean v) (for a group of spheres around a larger template sphere, exp(mean v)
scales the mean radius up to T's, so A o exp(mean v) has the mean radius). The labels follow the same
maps: in the last iteration the subjects' own label probabilities are averaged (the only ones the result
keeps, so earlier iterations do not compute them), otherwise the template's labels are carried along by
exp(mean v). Optionally the last iteration also averages the subjects on a finer grid (their own
resolution), corrected the same way. The registration is expected to keep each subject's affine from
the first iteration: the template stays in the initial template's (MNI) space and size, and only the
nonlinear shape is made central. No sharpening: the measured sharpness is reported instead.

The registration is a callable (`Register`), so the averaging and correction can be tested against
a known answer with any registration; `atlasmorph build` passes the shipped networks + refinement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import AtlasMorphError
from ..geometry.space import Grid, grid_coords, voxel_map
from ..model.layers import sample_at, warp
from ..model.networks import velocity_to_displacements
from .template import Template

ITERATIONS = 3


@dataclass
class Aligned:
    """One subject registered to the current template.

    `image` (X,Y,Z) is the subject moved onto the template grid; `velocity` (3, X/2, Y/2, Z/2) is the
    half-resolution stationary velocity whose exponential pulls the template into the subject's frame
    (networks.velocity_to_displacements' `fwd`). Computed only when build_template asks (last iteration):
    `probs()` the subject's own label probabilities (C,X,Y,Z) moved onto the template grid, when it has a
    segmentation; `on_grid(grid)` the subject moved onto another grid of the template's world space.
    """

    image: np.ndarray
    velocity: torch.Tensor
    probs: Callable[[], np.ndarray] | None = None
    on_grid: Callable[[Grid], np.ndarray] | None = None


Register = Callable[[int, Template], Aligned]  # (subject index, current template) -> Aligned


@dataclass
class Iteration:
    """What one iteration did: subjects averaged, the group's mean displacement to the template it was
    registered to and the size of the shape correction (mm, inside the brain), the new template's
    sharpness (mean intensity gradient in the brain, per mm) and the time taken."""

    index: int
    subjects: int
    mean_displacement_mm: float
    correction_mm: float
    sharpness: float
    seconds: float


@dataclass
class BuildResult:
    """The built template, one record per iteration, the subjects left out (index -> error) and, when
    asked for, the template T1 on the finer grid `fine_grid`."""

    template: Template
    iterations: list[Iteration]
    failed: dict[int, str] = field(default_factory=dict)
    fine: np.ndarray | None = None
    fine_grid: Grid | None = None


def voxel_size_mm(affine: np.ndarray) -> float:
    """Mean voxel edge (mm) of a grid's affine: displacements in voxels times this are in mm."""
    return float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)).mean())


def mean_length_mm(disp: torch.Tensor, brain: np.ndarray, voxel_mm: float) -> float:
    """Mean length (mm) inside `brain` (everywhere if empty) of a displacement field (3,X,Y,Z) in voxels."""
    norm = disp.norm(dim=0).numpy() * voxel_mm
    return float(norm[brain].mean()) if brain.any() else float(norm.mean())


def displacement_norm_mm(velocity: torch.Tensor, brain: np.ndarray, voxel_mm: float, int_steps: int) -> float:
    """Mean length (mm) inside `brain` of the full-resolution displacement exp(velocity) - id."""
    full, _, _ = velocity_to_displacements(velocity[None], int_steps, inverse=False)
    return mean_length_mm(full[0], brain, voxel_mm)


def sharpness(t1: np.ndarray, brain: np.ndarray, voxel_mm: float) -> float:
    """Mean gradient magnitude (intensity per mm) of a template inside its brain: higher is sharper."""
    g = np.gradient(t1.astype(np.float64), voxel_mm)
    mag = np.sqrt(sum(x * x for x in g))
    return float(mag[brain].mean()) if brain.any() else float(mag.mean())


def finer_grid(grid: Grid, voxel_mm: float) -> Grid:
    """A grid of isotropic `voxel_mm` voxels over the field of view of `grid` (same world space and
    orientation; voxel corners at the same outer boundary)."""
    steps = np.sqrt((np.asarray(grid.affine)[:3, :3] ** 2).sum(0))
    shape = tuple(max(1, int(round(n * st / voxel_mm))) for n, st in zip(grid.shape, steps))
    scale = np.array([n / m for n, m in zip(grid.shape, shape)])  # model voxels per fine voxel
    s = np.diag([*scale, 1.0])
    s[:3, 3] = scale / 2 - 0.5
    return Grid(shape, np.asarray(grid.affine) @ s)


def correct_on_grid(image: np.ndarray, correction: torch.Tensor, grid: Grid, fine: Grid) -> np.ndarray:
    """`image` (on `fine`) pulled through the shape correction `correction` (3,X,Y,Z, voxels of `grid`,
    correct_shape's third result): the same map as correct_shape's, evaluated at the fine grid's points."""
    p = grid_coords(voxel_map(grid.affine, fine.affine), fine.shape, torch.float64)
    q = p + sample_at(correction[None].double(), p, padding_mode="border")
    m = torch.as_tensor(voxel_map(fine.affine, grid.affine), dtype=torch.float64)
    c = (torch.einsum("ab,nbxyz->naxyz", m[:3, :3], q) + m[:3, 3].view(1, 3, 1, 1, 1)).float()
    src = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return sample_at(src, c, padding_mode="border")[0, 0].numpy()


def correct_shape(mean_image: np.ndarray, probs: np.ndarray, mean_velocity: torch.Tensor,
                  int_steps: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The unbiased update: the average and the label probabilities (both in the current template's space)
    pulled through exp(mean velocity). Returns (T1, probabilities, the correction's displacement (3,X,Y,Z))."""
    full, _, _ = velocity_to_displacements(mean_velocity[None], int_steps, inverse=False)
    t1 = warp(torch.from_numpy(np.ascontiguousarray(mean_image, dtype=np.float32))[None, None], full)[0, 0]
    p = warp(torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))[None], full)[0]
    p = p / p.sum(0, keepdim=True).clamp_min(1e-6)
    return t1.numpy(), p.numpy(), full[0]


def build_template(n_subjects: int, register: Register, initial: Template, iterations: int = ITERATIONS, *,
                   int_steps: int = 7, on_subject: Callable[[int, int, str | None], None] | None = None,
                   fine_grid: Grid | None = None) -> BuildResult:
    """Build a template of `n_subjects` subjects from `initial` in `iterations` rounds (module docstring).

    `register(i, template)` registers subject i; a subject whose registration raises is recorded in
    `failed` and left out of this and every later round. `on_subject(iteration, i, error)` is called
    after each registration (progress). With `fine_grid`, the last round also averages the subjects on
    it (Aligned.on_grid) and the result carries that template T1 too. Raises AtlasMorphError when fewer
    than two subjects remain.
    """
    if iterations < 1:
        raise AtlasMorphError(f"--iterations must be at least 1, got {iterations}")
    voxel_mm = voxel_size_mm(initial.grid.affine)
    template, records, failed = initial, [], {}
    sum_fine = None
    for it in range(iterations):
        start = time.perf_counter()
        last = it == iterations - 1
        brain = template.probs[0] < 0.5
        sum_image = sum_vel = sum_probs = None
        done = with_probs = 0
        displacement = 0.0
        for i in range(n_subjects):
            if i in failed:
                continue
            error = None
            try:
                a = register(i, template)
                moved = displacement_norm_mm(a.velocity, brain, voxel_mm, int_steps)
                fine = a.on_grid(fine_grid).astype(np.float64) if last and fine_grid is not None else None
                probs = a.probs() if last and a.probs is not None else None
                sum_image = a.image.astype(np.float64) if sum_image is None else sum_image + a.image
                sum_vel = a.velocity.double() if sum_vel is None else sum_vel + a.velocity
                if probs is not None:
                    sum_probs = probs.astype(np.float64) if sum_probs is None else sum_probs + probs
                if fine is not None:
                    sum_fine = fine if sum_fine is None else sum_fine + fine
                with_probs += a.probs is not None
                displacement += moved
                done += 1
            except AtlasMorphError as exc:
                error = str(exc)
            except Exception as exc:  # one broken subject must not stop the build
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                failed[i] = " ".join(error.split())
            if on_subject is not None:
                on_subject(it, i, error)
        if done < 2:
            raise AtlasMorphError(f"a template needs at least 2 subjects; {done} of {n_subjects} could be registered"
                                  + (f" (first error: {next(iter(failed.values()))})" if failed else ""))
        if 0 < with_probs < done:
            raise AtlasMorphError(f"{with_probs} of {done} subjects have a segmentation: give one for every subject "
                                  "or for none")
        labels = sum_probs / done if sum_probs is not None else template.probs
        mean_vel = (sum_vel / done).float()
        t1, probs, corr = correct_shape(sum_image / done, labels, mean_vel, int_steps)
        correction = mean_length_mm(corr, brain, voxel_mm) if brain.any() else 0.0
        template = Template(t1, probs, initial.grid)
        records.append(Iteration(it + 1, done, displacement / done, correction,
                                 sharpness(t1, probs[0] < 0.5, voxel_mm), time.perf_counter() - start))
    fine = None
    if fine_grid is not None:
        fine = correct_on_grid(sum_fine / done, corr, initial.grid, fine_grid)
    return BuildResult(template, records, failed, fine, fine_grid if fine is not None else None)
