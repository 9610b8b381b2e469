"""`atlasmorph build`: a study-specific template from the user's scans, with the shipped networks (no training).

INPUTS are read as a batch is (cli.batch: a folder, a .txt list or a cohort CSV; a BIDS dataset through
cli.bids_batch, with its filters and, from --seg-derivatives, its segmentations; brain masks and
extraction as for `register`); the group-wise construction itself is inference.build. Every subject
is loaded and brain-extracted once and kept in memory for all iterations (about 4 bytes per input
voxel and subject). Each subject's affine is fitted once, in the first iteration, and kept for the later
ones and the --warps-dir pass. The outputs (template T1, labels, probabilities, --hires T1, report, warps)
are written at the very end, together or not at all, and never over an input (cli.safety).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import typer

from ..bids.layout import BidsSelection
from ..errors import AtlasMorphError
from ..inference.refine_defaults import REFINE_STEPS
from .options import GROUP, BidsOptions, QuietOpt, seg_derivatives_option

Warn = Callable[[list[str]], None]
WARP_NAME = "from-T1w_to-template_mode-image_xfm.nii.gz"  # as a batch's --outputs warp (cli.batch)


@dataclass
class BuildRequest:
    """What one `atlasmorph build` run was asked to do (built by the command line or a caller)."""

    inputs: Path
    output: Path
    labels: Path | None = None
    probs: Path | None = None
    iterations: int = 3
    warps_dir: Path | None = None
    warp_format: str = "fs"
    initial: Path | None = None
    initial_labels: Path | None = None
    attrs: dict[str, object] | None = None
    report: Path | None = None
    skullstripped: bool = False
    refine: int = REFINE_STEPS
    model_path: Path | None = None
    threads: int | None = None
    quiet: bool = False
    bids: BidsSelection | None = None  # --participant-label/--session-label/--bids-filter
    seg_derivatives: str | None = None  # BIDS dataset: the derivatives folder whose dseg files are averaged
    hires: Path | None = None  # the template T1 also at the inputs' resolution


def _check_request(req: BuildRequest, subjects: list) -> None:
    """Options and paths, before any work: outputs valid, distinct and never an input."""
    from .outputs import check_outputs, check_warp_format
    from .safety import check_batch_outputs, check_distinct

    if req.iterations < 1:
        raise AtlasMorphError(f"--iterations must be at least 1, got {req.iterations}")
    if (req.initial is None) != (req.initial_labels is None):
        raise AtlasMorphError("--initial and --initial-labels go together (the T1 and the label map of the "
                              "starting template)")
    if req.initial is not None and req.attrs:
        raise AtlasMorphError("--initial excludes --age/--sex/--attr: they choose the conditional template "
                              "to start from")
    if req.report is not None and req.report.suffix.lower() != ".json":
        raise AtlasMorphError(f"--report {req.report}: the report must be a .json file")
    check_warp_format(req.warp_format)
    if len(subjects) < 2:
        raise AtlasMorphError(f"{req.inputs}: a template needs at least 2 subjects, found {len(subjects)}")
    outputs = {flag: p for flag, p in (("-o", req.output), ("--labels", req.labels), ("--probs", req.probs),
                                       ("--hires", req.hires), ("--report", req.report)) if p is not None}
    check_outputs(list(outputs.values()))
    inputs = {f"the image of subject {s.id}": Path(s.t1) for s in subjects}
    inputs.update({f"the mask of subject {s.id}": Path(s.mask) for s in subjects if s.mask is not None})
    inputs.update({what: Path(p) for what, p in (("the cohort CSV or list", req.inputs), ("the model file",
                  req.model_path), ("the --initial template", req.initial), ("the --initial-labels map",
                  req.initial_labels)) if p is not None and Path(p).is_file()})
    check_distinct(outputs, inputs)
    if req.warps_dir is not None:
        if req.warps_dir.exists() and not req.warps_dir.is_dir():
            raise AtlasMorphError(f"--warps-dir {req.warps_dir}: exists and is not a folder")
        req.warps_dir.mkdir(parents=True, exist_ok=True)
        check_batch_outputs(req.inputs, subjects, req.warps_dir, lambda s: [_warp_path(req, s)], None,
                            req.model_path)


def _read_inputs(req: BuildRequest, warn: Warn) -> list:
    """The group as batch subjects: a BIDS dataset (filtered; what it lacks warned about), else a folder, a
    .txt list or a cohort CSV; the BIDS options are an error for anything but a BIDS dataset."""
    from ..bids import is_bids_root
    from .batch import read_batch_input
    from .bids_batch import bids_subjects

    if is_bids_root(req.inputs):
        return bids_subjects(req.inputs, req.bids or BidsSelection(), warn)
    if (req.bids is not None and req.bids.given) or req.seg_derivatives is not None:
        raise AtlasMorphError("--participant-label, --session-label, --bids-filter and --seg-derivatives are for "
                              "a BIDS dataset")
    return read_batch_input(req.inputs)


def _warp_path(req: BuildRequest, s) -> Path:
    """Where --warps-dir keeps a subject's warp: named after the BIDS image (sessions differ) or sub-<label>."""
    return req.warps_dir / (f"{s.id}_{WARP_NAME}" if s.bids is not None else s.name(WARP_NAME))


def _segmentations(req: BuildRequest, subjects: list) -> dict[str, Path]:
    """Subject id -> its segmentation: a cohort CSV's `seg` column, or a BIDS dataset's dseg files in
    --seg-derivatives (training.bids_cohort finds them); empty for folders and lists."""
    source = req.inputs
    if subjects and subjects[0].bids is not None:
        from ..training.bids_cohort import seg_folder, seg_of

        if req.seg_derivatives is None:
            return {}
        folder = seg_folder(source, req.seg_derivatives, [s.bids for s in subjects])
        found = {s.id: seg_of(folder, source, s.bids) for s in subjects} if folder is not None else {}
        return {sid: path for sid, path in found.items() if path is not None}
    if source.suffix.lower() != ".csv":
        return {}
    from ..training.cohort import read_cohort

    return {c.id: Path(c.seg) for c in read_cohort(source, check_files=False) if c.seg}


def _group_vector(model, subjects: list, cli_attrs: dict | None, warn: Warn):
    """The attribute vector of the starting conditional template: --age/--sex/--attr when given, else the
    mean of the subjects' encoded attributes (the population average for subjects without any)."""
    import torch

    from ..inference.template import encode_attributes
    from .batch import subject_attrs

    if cli_attrs:
        vec, warnings = encode_attributes(model, cli_attrs)
        warn(warnings)
        return vec, cli_attrs
    names = model.config.encoder.names
    vectors, missing = [], 0
    for s in subjects:
        values = subject_attrs(s, None, names)
        missing += values is None
        vectors.append(encode_attributes(model, values)[0])
    if missing:
        warn([f"{missing} of {len(subjects)} subject(s) have no attributes: the population average stands in "
              "for them in the group's mean attributes"])
    return torch.stack(vectors).mean(0), "group mean"


class _Subjects:
    """The group held in memory: each subject's image, brain mask and (optionally) label indices."""

    def __init__(self):
        self.items: list = []  # (BatchSubject, Volume, Brain, index labels or None)
        self.worlds: dict = {}  # subject index -> its affine (4x4) from the first registration

    def load(self, subjects: list, segs: dict[str, Path], skullstripped: bool, warn: Warn,
             on_subject: Callable[[], None]) -> list[tuple[object, str]]:
        from ..inference.brain_extraction import resolve_brain
        from ..io.volumes import load_volume, same_grid
        from ..labels import to_index

        failed = []
        for s in subjects:
            try:
                subj = load_volume(s.t1)
                mask = load_volume(s.mask) if s.mask else None
                brain = resolve_brain(subj, mask, skullstripped and mask is None)
                warn([f"{s.tag}: {w}" for w in brain.warnings])
                index = None
                if s.id in segs:
                    seg = load_volume(segs[s.id])
                    if not same_grid(seg, subj):
                        raise AtlasMorphError(f"{segs[s.id]}: the segmentation is on another grid than the image")
                    index = to_index(seg.data)
                self.items.append((s, subj, brain, index))
            except AtlasMorphError as exc:
                failed.append((s, " ".join(str(exc).split())))
            except Exception as exc:  # noqa: BLE001 - one broken subject must not stop the build
                failed.append((s, f"{type(exc).__name__}: {exc}"))
            on_subject()
        return failed

    def registrar(self, model, vec, refine: int):
        """The inference.build Register callable: the network + refinement to the current template, as
        `register` does, but with each subject's affine from its first registration (fitting it was about
        60 % of a registration's time, and the template stays in the starting template's space); the
        subject's normalised brain moved onto the template grid, and on request its labels or the brain
        on another grid."""
        from ..inference.build import Aligned

        def register(i: int, template) -> Aligned:
            reg = self.register(i, model, vec, refine, template)
            index = self.items[i][3]
            probs = (lambda: _subject_probs(reg, index)) if index is not None else None
            return Aligned(reg.subject_to_template(), reg.velocity, probs, lambda grid: _on_grid(reg, grid))

        return register

    def register(self, i: int, model, vec, refine: int, template):
        """Subject i registered to `template`, with its affine fitted on the first call and kept after."""
        from ..inference.registration import register_subject

        _, subj, brain, _ = self.items[i]
        reg = register_subject(model, subj, vec, brain.as_volume(subj), refine=refine, template=template,
                               world=self.worlds.get(i))
        self.worlds[i] = reg.world
        return reg


def _subject_probs(reg, index):
    """A subject's label probabilities on the template grid; outside the subject's grid is background."""
    import numpy as np

    probs = _labels_to_template(reg, index)
    probs[0] += np.clip(1.0 - probs.sum(0), 0, None)
    return probs


def _on_grid(reg, grid):
    """The subject's normalised brain on `grid` (in the template's world space, e.g. finer): template-grid
    positions of its points, through the subject -> template field and the affine, one interpolation from
    the native image (on the template grid itself, Registration.subject_to_template)."""
    import numpy as np
    import torch

    from ..geometry.space import grid_coords, voxel_map
    from ..model.layers import sample_at

    p = grid_coords(voxel_map(reg.grid.affine, grid.affine), grid.shape, torch.float64)
    z = p + sample_at(reg.subject_to_template_field[None].double(), p, padding_mode="border")
    m = torch.as_tensor(voxel_map(reg.subject.affine, reg.grid.affine, reg.world), dtype=torch.float64)
    c = (torch.einsum("ab,nbxyz->naxyz", m[:3, :3], z) + m[:3, 3].view(1, 3, 1, 1, 1)).float()
    src = torch.from_numpy(np.ascontiguousarray(reg.brain, dtype=np.float32))[None, None]
    return sample_at(src, c, padding_mode="zeros")[0, 0].numpy()


def _labels_to_template(reg, index):
    """A subject's label indices (0..34, native grid) as probabilities (35,X,Y,Z) on the template grid,
    one interpolation through the registration (coordinates computed once, one class at a time)."""
    import numpy as np
    import torch

    from ..labels import N_CLASSES
    from ..model.layers import sample_at

    coords = reg.template_to_native_coords()
    out = np.zeros((N_CLASSES, *reg.grid.shape), dtype=np.float32)
    for c in range(N_CLASSES):
        onehot = torch.from_numpy((index == c).astype(np.float32))[None, None]
        out[c] = sample_at(onehot, coords, padding_mode="zeros")[0, 0].numpy()
    return out


def run_build(req: BuildRequest, warn: Warn) -> dict:
    """Build the template asked for by `req`, write every output together at the end; returns the report."""
    import numpy as np

    from ..inference.build import build_template, voxel_size_mm
    from ..inference.template import load_template, make_template
    from ..io.volumes import all_or_nothing
    from ..model.shipped import load
    from ..progress import progress_bar
    from .outputs import register_writes, save_template

    started = time.perf_counter()
    subjects = _read_inputs(req, warn)
    _check_request(req, subjects)
    segs = _segmentations(req, subjects)
    if segs and len(segs) < len(subjects):
        source = "in --seg-derivatives" if subjects[0].bids is not None else "(seg column)"
        warn([f"{len(segs)} of {len(subjects)} subjects have a segmentation {source}: the labels are the "
              "starting template's, carried along (give one for every subject to average them instead)"])
        segs = {}
    _, model = load(req.model_path, req.threads)
    if req.initial is not None:
        initial, warnings = load_template(req.initial, req.initial_labels, model.config.model_grid)
        warn(warnings)
        vec, start = None, str(req.initial)
    else:
        vec, start = _group_vector(model, subjects, req.attrs, warn)
        initial = make_template(model, vec)
    group = _Subjects()
    failed: list[tuple[object, str]] = []

    def report_failure(s, error: str) -> None:
        failed.append((s, error))
        where = s.tag if str(s.t1) in error else f"{s.tag} ({s.t1})"
        warn([f"{where}: left out: {error}"])

    with progress_bar(req.quiet) as bar:
        task = bar.add_task("loading", total=len(subjects))
        for s, error in group.load(subjects, segs, req.skullstripped, warn, lambda: bar.advance(task)):
            report_failure(s, error)
        tasks = [bar.add_task(f"iteration {k + 1}", total=len(group.items)) for k in range(req.iterations)]

        def progress(it: int, i: int, error: str | None) -> None:
            if error is not None:
                report_failure(group.items[i][0], error)
            bar.advance(tasks[it])

        if len(group.items) < 2:
            raise AtlasMorphError(f"a template needs at least 2 subjects; {len(group.items)} of {len(subjects)} "
                                  "could be read")
        fine = _input_grid(group, initial.grid) if req.hires is not None else None
        result = build_template(len(group.items), group.registrar(model, vec, req.refine), initial,
                                req.iterations, int_steps=model.config.int_steps, on_subject=progress,
                                fine_grid=fine)
        template = result.template
        kept = [k for k in range(len(group.items)) if k not in result.failed]
        with all_or_nothing():
            final_mm = None
            if req.warps_dir is not None:  # one more pass: each subject's warp to the template as built
                from ..inference.build import displacement_norm_mm

                task = bar.add_task("warps", total=len(kept))
                norms = []
                vox = voxel_size_mm(template.grid.affine)
                for k in kept:
                    s = group.items[k][0]
                    reg = group.register(k, model, vec, req.refine, template)
                    norms.append(displacement_norm_mm(reg.velocity, template.probs[0] < 0.5, vox,
                                                      model.config.int_steps))
                    for w in register_writes(reg, req.warp_format, {"warp": _warp_path(req, s)}):
                        w()
                    bar.advance(task)
                final_mm = float(np.mean(norms))
            save_template(template, req.output, req.labels, req.probs)
            if req.hires is not None:
                from ..io.volumes import save_volume
                from .outputs import MNI_XFORM

                save_volume(result.fine.astype(np.float32), result.fine_grid.affine, req.hires, xform_code=MNI_XFORM)
            report = {
                "subjects": len(subjects), "used": len(kept),
                "left_out": [{"subject": s.id, "error": e} for s, e in failed],
                "start": start if isinstance(start, str) else {k: v for k, v in start.items()},
                "labels": "averaged subject segmentations" if segs else "starting template's labels, carried along",
                "iterations": [asdict(r) for r in result.iterations],
                "final_mean_displacement_mm": final_mm,
                "hires": None if fine is None else {"voxel_mm": voxel_size_mm(fine.affine),
                                                    "shape": list(fine.shape)},
                "refine": req.refine, "seconds": time.perf_counter() - started,
                "machine": {"cpu": platform.processor() or platform.machine(), "threads": _threads()},
            }
            if req.report is not None:
                from ..io.volumes import atomic_path

                with atomic_path(req.report) as tmp:
                    tmp.write_text(json.dumps(report, indent=1) + "\n")
    if len(kept) < len(subjects):
        warn([f"{len(subjects) - len(kept)} of {len(subjects)} subject(s) were left out (see above); the template "
              f"was built from {len(kept)}"])
    return report


def _input_grid(group: _Subjects, grid):
    """The grid of --hires: isotropic voxels of the group's median input voxel size (each input's mean
    edge) over the field of view of the model grid `grid`."""
    import numpy as np

    from ..inference.build import finer_grid, voxel_size_mm

    return finer_grid(grid, float(np.median([voxel_size_mm(subj.affine) for _, subj, _, _ in group.items])))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------- command
def build_command(
    inputs: Path = typer.Argument(..., help="The group: a BIDS dataset, a folder of T1 images, a .txt list or a "
                                  "cohort .csv (t1, optional mask/seg and attribute columns), as in batch mode. "
                                  "Whole-head images are brain-extracted (see register --help)."),
    output: Path = typer.Option(..., "-o", "--output", help="Template T1 (model grid, 2 mm, MNI space)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Template label map (FreeSurfer ids): the subjects' "
                                          "segmentations averaged when the cohort CSV has a seg column for every "
                                          "subject, else the starting template's labels carried along."),
    probs: Optional[Path] = typer.Option(None, "--probs", help="4D label probabilities (background + 34)."),
    iterations: int = typer.Option(3, "--iterations", min=1, help="Rounds of register-average-correct."),
    warps_dir: Optional[Path] = typer.Option(None, "--warps-dir", help="Write each subject's warp to the built "
                                             "template here (sub-<label>_from-T1w_to-template_mode-image_xfm.nii.gz; "
                                             "one more registration pass)."),
    warp_format: str = typer.Option("fs", "--warp-format", help="fs (RAS mm, intent 1006) or itk (LPS, 1007)."),
    initial: Optional[Path] = typer.Option(None, "--initial", help="Start from this template T1 (MNI space) "
                                           "instead of the conditional template; needs --initial-labels."),
    initial_labels: Optional[Path] = typer.Option(None, "--initial-labels", help="Label map of --initial "
                                                  "(FreeSurfer ids, or 4D probabilities)."),
    age: Optional[float] = typer.Option(None, "--age", help="Start from the conditional template of this age "
                                        "(default: the group's mean attributes)."),
    sex: Optional[str] = typer.Option(None, "--sex", help="... and this sex (F or M)."),
    attr: Optional[list[str]] = typer.Option(None, "--attr", help="Other model attribute as NAME=VALUE."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report: subjects used and left out, mean "
                                          "displacement, correction and sharpness per iteration, time."),
    skullstripped: bool = typer.Option(False, "--skullstripped", help="Every image without a mask is already "
                                       "brain-extracted."),
    refine: int = typer.Option(REFINE_STEPS, "--refine", min=0, help="Instance-optimisation steps per registration."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model file (default: the shipped model)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all)."),
    bids_select: BidsOptions = GROUP,
    seg_derivatives: Optional[str] = seg_derivatives_option("averaged into --labels (default: the starting "
                                                            "template's labels, carried along)."),
    hires: Optional[Path] = typer.Option(None, "--hires", help="Also write the template T1 at the inputs' "
                                         "resolution: isotropic voxels of the group's median voxel size, MNI "
                                         "space, the model grid's field of view; averaged from the subjects' own "
                                         "images through the last iteration's registrations."),
    quiet: bool = QuietOpt,
) -> None:
    """Build a study-specific template (T1 + labels, MNI space) from a group of scans with the shipped networks."""
    from .app import _warn, err
    from .request import attribute_values

    out = run_build(BuildRequest(inputs, output, labels, probs, iterations, warps_dir, warp_format, initial,
                                 initial_labels, attribute_values(age, sex, attr), report, skullstripped, refine,
                                 model, threads, quiet, bids_select.selection(), seg_derivatives, hires),
                    _warn)
    it = out["iterations"][-1]
    err.print(f"template of {out['used']} subjects written to {output} ({len(out['iterations'])} iterations, "
              f"{out['seconds']:.0f} s; last mean displacement {it['mean_displacement_mm']:.2f} mm)")
