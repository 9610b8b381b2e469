"""Options several commands share, defined once: groups of options that a command takes as one parameter.

A command declares e.g. ``subject: SubjectOptions = GROUP`` among its parameters; `with_option_groups`
shows Typer the group's options in that place (so --help lists them as before) and hands the command
one filled-in `SubjectOptions`. register, segment and bids share `RunOptions`; register and segment
share `SubjectOptions`.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..inference.refine_defaults import REFINE_LOSS, REFINE_STEPS

GROUP: Any = None  # the default of a group parameter (with_option_groups replaces it)

ModelOpt = typer.Option(None, "--model", "-m", help="Model file (.safetensors); default: the shipped model.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores).")
RefineOpt = typer.Option(REFINE_STEPS, "--refine", min=0, help="Instance-optimisation steps on the network's warp "
                         "for this subject (Adam, lr 0.05; about 0.2 s each; 0: the network's warp as is). Where the "
                         "input's voxels are 3 mm or coarser (thick slices, read from the header), the template is "
                         "blurred the same way before the comparison.")
RefineLossOpt = typer.Option(REFINE_LOSS, "--refine-loss", help="Image term of the refinement: 'ncc' (local NCC, "
                             "robust to another scanner's contrast and scaling; docs/ood.md) or 'model' (the term "
                             "the model was trained with, MSE for the shipped model; a little faster).")
AgeOpt = typer.Option(None, "--age", help="Age in years.")
SexOpt = typer.Option(None, "--sex", help="Sex: F or M.")
AttrOpt = typer.Option(None, "--attr", help="Other model attribute as NAME=VALUE (repeatable).")
MaskOpt = typer.Option(None, "--mask", help="Brain mask on the image's grid (> 0 is brain; a probabilistic mask "
                       "with values in [0, 1] is read as >= 0.5). No extraction is run.")
SkullstrippedOpt = typer.Option(False, "--skullstripped", help="The image is already brain-extracted: its non-zero "
                                "voxels are the brain (default: decided from the image; a whole-head scan is "
                                "brain-extracted first).")
BrainMaskOpt = typer.Option(None, "--brain-mask", help="Write the brain mask used (uint8, the input's grid).")
BrainOpt = typer.Option(None, "--brain", help="Write the skull-stripped image (the input's grid).")
QualityOpt = typer.Option(None, "--quality", help="Write the subject's quality check as JSON (score, local NCC, "
                          "brain-mask Dice, affine scale and rotation, flagged, reasons; batch mode writes "
                          "sub-<label>_desc-atlasmorph_qc.json for every subject). See docs/quality.md.")
QcOpt = typer.Option(None, "--qc", help="Write a QC picture (.png): the T1 in three planes with the structure "
                     "outlines and the brain-mask contour, the quality score and attributes in the title (batch "
                     "mode: --outputs ...,qc, one per subject + qc_index.html).")
StrictOpt = typer.Option(False, "--strict", help="Exit with code 3 when a subject fails the quality check (its "
                         "outputs are still written); without it, a one-line warning.")
WarpFormatOpt = typer.Option("fs", "--warp-format", help="Warp outputs: fs (RAS mm, intent 1006) or itk (LPS, 1007).")
SkipExistingOpt = typer.Option(False, "--skip-existing", help="Batch mode: skip subjects whose outputs all exist "
                               "(e.g. rerunning an interrupted batch; segment keeps their rows of the volumes table).")
ParticipantOpt = typer.Option(None, "--participant-label", help="BIDS dataset: only these participants (with or "
                              "without 'sub-'; repeatable or comma-separated).")
SessionOpt = typer.Option(None, "--session-label", help="BIDS dataset: only these sessions (with or without 'ses-').")
BidsFilterOpt = typer.Option(None, "--bids-filter", help="BIDS dataset: only T1w images with this entity value, "
                             "ENTITY=VALUE (e.g. acq=mprage, run=1; repeatable; a repeated entity accepts either).")
OutDirOpt = typer.Option(None, "--out-dir", help="Batch mode (IMAGE is a BIDS dataset, a folder, .txt list or "
                         "cohort .csv): output folder; files get BIDS-derivatives names (a BIDS dataset: a derivatives "
                         "dataset, e.g. BIDS_ROOT/derivatives/atlasmorph; docs/bids.md, docs/scaling.md).")
TemplateOpt = typer.Option(None, "--template", help="Register to this template T1 (MNI space, model grid, e.g. "
                           "written by `atlasmorph build`) instead of the model's conditional template; needs "
                           "--template-labels, excludes --age/--sex/--attr. See docs/build.md.")
TemplateLabelsOpt = typer.Option(None, "--template-labels", help="Label map of --template: FreeSurfer ids of the "
                                 "34 structures, or 4D probabilities (background + 34).")


def _option(info: Any) -> Any:
    """A group field whose command-line form is the Typer option `info` (its default is the field's)."""
    return field(default=info.default, metadata={"option": info})


class OptionGroup:
    """Base of the option groups (dataclasses whose fields carry their Typer option)."""


@dataclass(frozen=True)
class SubjectOptions(OptionGroup):
    """register and segment: the subject's attributes, its brain, its quality check and single-image extras."""

    age: Optional[float] = _option(AgeOpt)
    sex: Optional[str] = _option(SexOpt)
    attr: Optional[list[str]] = _option(AttrOpt)
    mask: Optional[Path] = _option(MaskOpt)
    skullstripped: bool = _option(SkullstrippedOpt)
    brain_mask: Optional[Path] = _option(BrainMaskOpt)
    brain: Optional[Path] = _option(BrainOpt)
    quality: Optional[Path] = _option(QualityOpt)
    qc: Optional[Path] = _option(QcOpt)
    strict: bool = _option(StrictOpt)


@dataclass(frozen=True)
class BidsOptions(OptionGroup):
    """Every command that reads a BIDS dataset: which of its T1w images to take."""

    participant_label: Optional[list[str]] = _option(ParticipantOpt)
    session_label: Optional[list[str]] = _option(SessionOpt)
    bids_filter: Optional[list[str]] = _option(BidsFilterOpt)

    def selection(self):
        """The BIDS selection (bids.BidsSelection) these options make."""
        from ..bids import BidsSelection

        return BidsSelection.from_options(self.participant_label, self.session_label, self.bids_filter)


@dataclass(frozen=True)
class RunOptions(BidsOptions):
    """register, segment and bids: the BIDS selection, the model, compute, warp format and batch resume."""

    model: Optional[Path] = _option(ModelOpt)
    threads: Optional[int] = _option(ThreadsOpt)
    refine: int = _option(RefineOpt)
    refine_loss: str = _option(RefineLossOpt)
    warp_format: str = _option(WarpFormatOpt)
    skip_existing: bool = _option(SkipExistingOpt)


QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def outputs_option(choices: str) -> Any:
    """`--outputs` of a command with batch mode; `choices` lists what it can write and its default."""
    return typer.Option(None, "--outputs", help="Batch mode: comma-separated, from " + choices)


def seg_derivatives_option(use: str) -> Any:
    """`--seg-derivatives` of a command that reads a BIDS dataset's segmentations; `use` ends its help."""
    return typer.Option(None, "--seg-derivatives", help="BIDS dataset: the derivatives folder (a name under "
                        "BIDS_ROOT/derivatives/, or a path) with sub-<s>[_ses-<t>]..._dseg.nii[.gz] segmentations "
                        "of the T1w images; " + use)


def with_option_groups(fn: Callable) -> Callable:
    """Let Typer see each OptionGroup parameter of `fn` as the group's options, in its place; call `fn` with
    the group objects filled in from them."""
    hints = typing.get_type_hints(fn)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for p in inspect.signature(fn).parameters.values():
        kind = hints.get(p.name, p.annotation)
        if isinstance(kind, type) and issubclass(kind, OptionGroup):
            groups[p.name] = kind
            types = typing.get_type_hints(kind)
            params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                         default=f.metadata["option"], annotation=types[f.name]) for f in fields(kind)]
        else:
            params.append(p.replace(annotation=kind))

    def command(**kwargs: Any) -> Any:
        for name, kind in groups.items():
            kwargs[name] = kind(**{f.name: kwargs.pop(f.name) for f in fields(kind)})
        return fn(**kwargs)

    command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    command.__module__ = fn.__module__
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
