"""The `atlasmorph` command: train | template | register | segment (parsing, messages, exit codes).

Every command is a thin shell: it builds a request and hands it to cli.run (template, register,
segment) or training.loop (train); an AtlasMorphError becomes one line on stderr and exit code 1
(`--debug` shows the traceback instead).
"""
from __future__ import annotations

import os

# Idle OpenMP workers that spin make torch several times slower when another process shares the
# cores (measured on 2 cores); sleeping workers cost nothing. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .. import __version__
from ..errors import AtlasMorphError
from ..model.loss_weights import LossWeights
from .options import (GROUP, AttrOpt, BidsOptions, ModelOpt, QuietOpt, RunOptions, SexOpt, SkullstrippedOpt, StrictOpt,
                      SubjectOptions, ThreadsOpt, OutDirOpt, TemplateLabelsOpt, TemplateOpt, outputs_option, seg_derivatives_option,
                      with_option_groups)
from .request import SubjectRequest, attribute_values

err = Console(stderr=True)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="AtlasMorph: conditional deformable brain templates (T1 + 34-structure label map) for any "
    "age and sex, registration of a subject to its template, and atlas-based segmentation.",
)

ImageArg = typer.Argument(..., help="T1 image, any orientation: whole-head (more than 2.5 L of non-zero voxels: "
                          "the brain is extracted first, with deepbet), skull-stripped (at most 2.5 L, or "
                          "--skullstripped: its non-zero voxels are the brain), or any T1 with --mask; or a batch: a "
                          "BIDS dataset (its T1w images, age and sex from participants.tsv), a folder of images, a "
                          ".txt list or a cohort .csv. See docs/bids.md and docs/brain-extraction.md.")


def _version(value: bool) -> None:
    if value:
        from ..model.shipped import resolve_model, shipped_models

        found = shipped_models()
        models = ", ".join(p.stem for p in found) + f"; default {resolve_model(None).stem}" if found else "none"
        typer.echo(f"atlasmorph {__version__} (shipped models: {models})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """AtlasMorph command line."""



def _batch(image: Path, out_dir: Path | None, outputs: str | None, run: RunOptions) -> bool:
    """Whether IMAGE is a batch (BIDS dataset, folder, .txt, .csv); batch-only options with a single image are
    an error."""
    from .batch import is_batch_input

    if is_batch_input(image):
        return True
    if out_dir is not None or outputs is not None or run.skip_existing:
        raise AtlasMorphError("--out-dir, --outputs and --skip-existing are for a batch input (a BIDS dataset, a "
                              "folder, a .txt list or a cohort .csv)")
    if run.participant_label or run.session_label or run.bids_filter:
        raise AtlasMorphError("--participant-label, --session-label and --bids-filter are for a BIDS dataset")
    return False


def _request(command: str, image: Path, subject: SubjectOptions, run: RunOptions, outputs: dict[str, Path | None],
             **batch: object) -> SubjectRequest:
    """The SubjectRequest of a register/segment command line."""
    from ..inference.refine_defaults import REFINE_LOSSES

    if run.refine_loss not in REFINE_LOSSES:
        raise AtlasMorphError(f"--refine-loss must be one of {', '.join(REFINE_LOSSES)}, got '{run.refine_loss}'")
    return SubjectRequest(
        command, image, attribute_values(subject.age, subject.sex, subject.attr),
        {**outputs, "brainmask": subject.brain_mask, "brain": subject.brain, "quality": subject.quality,
         "qc": subject.qc},
        mask=subject.mask, skullstripped=subject.skullstripped, refine=run.refine, refine_loss=run.refine_loss,
        warp_format=run.warp_format,
        model_path=run.model, threads=run.threads, strict=subject.strict, skip_existing=run.skip_existing,
        bids=run.selection(), **batch)


def _warn(messages: list[str]) -> None:
    for m in messages:
        err.print(Text.assemble(("warning: ", "yellow"), m), soft_wrap=True)


# ----------------------------------------------------------------------------------------- train
@app.command("train")
@with_option_groups
def train_command(
    data: Path = typer.Option(..., "--data", help="Cohort CSV (t1, optional seg/mask, attribute columns) or a BIDS "
                              "dataset (T1w images, age/sex from participants.tsv, dseg from a derivatives "
                              "folder; docs/bids.md)."),
    out: Path = typer.Option(..., "--out", help="Output folder: checkpoint, model.safetensors, history, split."),
    attributes: str = typer.Option("age,sex", help="Comma-separated attribute columns, or 'none' (unconditional)."),
    steps: int = typer.Option(1500, min=1, help="Training steps."),
    batch_size: int = typer.Option(1, min=1, help="Subjects per step."),
    lr: float = typer.Option(1e-3, min=0.0, help="Adam learning rate."),
    warmup: int = typer.Option(0, min=0, help="Steps over which the learning rate rises linearly to --lr, counted "
                               "from the run's first step (use with --init: a fresh Adam's first steps are large)."),
    image_loss: str = typer.Option("mse", help="Image similarity: mse or ncc."),
    w_image: float = typer.Option(LossWeights.image, help="Weight: subject vs warped template (MSE: 1/sigma^2 with sigma 0.1; use ~1 with ncc)."),
    w_image_inverse: float = typer.Option(LossWeights.image_inverse, help="Weight: template vs subject warped to template."),
    w_seg: float = typer.Option(LossWeights.seg, help="Weight: soft Dice of warped template labels."),
    w_smooth: float = typer.Option(LossWeights.smooth, help="Weight: gradient L2 of the displacement."),
    w_centrality: float = typer.Option(
        LossWeights.centrality, help="Weight: kernel-weighted mean of the registration network's displacements "
                                     "toward zero (v1 used 1; off with the deformable template, which is refitted "
                                     "to the centre itself)."),
    w_magnitude: float = typer.Option(LossWeights.magnitude, help="Weight: mean squared displacement."),
    w_volume: float = typer.Option(
        LossWeights.volume, min=0.0,
        help="Weight: the change of the template's structure volumes (sums of label probabilities) with the "
             "numeric attributes (age) against the training subjects' volumes regressed on their attributes, "
             "so each template carries the volume trend of its attributes (needs label maps; 0 = off)."),
    shape_every: int = typer.Option(
        25, min=1, help="Steps between closed-form refits of the deformable template: the regression of the "
                        "subjects' stored warps on their attributes (each template moves to the centre of its "
                        "sub-population)."),
    template_deform: bool = typer.Option(
        True, "--template-deform/--no-template-deform",
        help="Template = base deformed by an attribute-dependent diffeomorphism + residual (v2; --init from a v1 "
             "model adds the branch at the identity). --no-template-deform trains the v1 architecture."),
    augment: bool = typer.Option(
        True, "--augment/--no-augment",
        help="Show the registration network subjects perturbed by smooth bias fields, gamma, noise and thick "
             "slices (losses are scored on the clean subject), so it copes with other scanners."),
    augment_fraction: float = typer.Option(
        1.0, min=0.0, max=1.0,
        help="With --augment: the fraction of subjects shown perturbed; the rest are shown clean (the network "
             "keeps its in-distribution accuracy)."),
    stage: str = typer.Option(
        "joint", help="joint: train both networks. template: fine-tune the template network of --init alone, its "
                      "registration frozen and every loss at full resolution (a short last stage: v3's; "
                      "docs/training.md). registration: fine-tune the registration network of --init alone, "
                      "toward its frozen templates (the template's deformation is not refitted)."),
    bandwidth: float = typer.Option(0.5, help="Centrality kernel bandwidth in normalised attribute units."),
    val_fraction: float = typer.Option(0.15, min=0.0, max=0.9, help="Fraction of subjects held out (by subject)."),
    split: Optional[Path] = typer.Option(None, "--split", help="Reuse the train/validation subjects of this split.json "
                                         "(from an earlier run) instead of a new split; --val-fraction is ignored."),
    val_every: int = typer.Option(100, min=1, help="Validate every N steps."),
    checkpoint_every: int = typer.Option(50, min=1, help="Checkpoint every N steps."),
    seed: int = typer.Option(0, help="Random seed (split, sampling)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.safetensors (same options; a lower --lr anneals, the same --lr continues exactly)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this model (fine-tuning)."),
    reference: Optional[Path] = typer.Option(None, help="Affine target: brain T1 in MNI space, or 'mni152' for the "
                                             "MNI152 brain of $ATLASMORPH_DATA (default: MNI152 "
                                             "from $ATLASMORPH_DATA, or the --init model's template)."),
    cache: Optional[Path] = typer.Option(None, help="Cache of prepared subjects (default: OUT/cache)."),
    name: str = typer.Option("atlasmorph-custom", help="Model name stored in the file (with --init, default: "
                                                      "the --init model's name)."),
    threads: Optional[int] = ThreadsOpt,
    workers: int = typer.Option(2, min=1, help="Processes for cohort preparation."),
    device: str = typer.Option("cpu", help="cpu or cuda (the first GPU, or the LOCAL_RANK one under torchrun)."),
    quiet: bool = QuietOpt,
    bids_select: BidsOptions = GROUP,
    seg_derivatives: Optional[str] = seg_derivatives_option("default: the one folder that has them; 'none': no "
                                                            "labels."),
) -> None:
    """Train a conditional template + registration model on a cohort."""
    from ..bids import is_bids_root
    from ..model.losses import IMAGE_LOSSES
    from ..training.loop import TrainSettings, train as run_train
    from ..training.reference import training_reference

    if device not in ("cpu", "cuda"):
        raise AtlasMorphError(f"--device must be cpu or cuda, got '{device}'")
    bids = is_bids_root(data)
    if not data.is_file() and not bids:
        what = " (a folder, but not a BIDS dataset: no dataset_description.json or sub-* folders)"
        raise AtlasMorphError(f"{data}: no such cohort file" + (what if data.is_dir() else ""))
    selection = bids_select.selection()
    if not bids and (selection.given or seg_derivatives is not None):
        raise AtlasMorphError("--participant-label, --session-label, --bids-filter and --seg-derivatives are for a "
                              "BIDS dataset")
    if split is not None and not split.is_file():
        raise AtlasMorphError(f"--split {split}: no such file")
    if image_loss not in IMAGE_LOSSES:
        raise AtlasMorphError(f"--image-loss must be {' or '.join(IMAGE_LOSSES)}, got '{image_loss}'")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise AtlasMorphError("--device cuda: no CUDA device is available")
    names = [] if attributes.strip().lower() == "none" else [a.strip() for a in attributes.split(",") if a.strip()]
    settings = TrainSettings(
        data=data, out=out, attributes=names, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
        weights=LossWeights(w_image, w_image_inverse, w_seg, w_smooth, w_centrality, w_magnitude, w_volume),
        image_loss=image_loss, val_fraction=val_fraction, split=split, val_every=val_every,
        checkpoint_every=checkpoint_every, seed=seed, resume=resume, init=init, reference=reference,
        cache=cache, threads=threads, workers=workers, device=device, bandwidth=bandwidth, name=name, quiet=quiet,
        template_deform=template_deform, augment=augment, augment_fraction=augment_fraction, shape_every=shape_every,
        bids=selection if bids else None, seg_derivatives=seg_derivatives, stage=stage,
    )
    final = run_train(settings, training_reference(reference, init))
    err.print(f"model written to {final}")


# ----------------------------------------------------------------------------------------- template
@app.command("template")
def template_command(
    output: Path = typer.Option(..., "-o", "--output", help="Template T1 (.nii.gz/.mgz); with an age range, "
                                "one file per age named OUTPUT_age-<A>."),
    age: Optional[str] = typer.Option(None, "--age", help="Age in years, or START:STOP:STEP for a trajectory "
                                    "(stop included; at most 1000 ages)."),
    sex: Optional[str] = SexOpt,
    attr: Optional[list[str]] = AttrOpt,
    labels: Optional[Path] = typer.Option(None, "--labels", help="Hard label map (FreeSurfer ids)."),
    probs: Optional[Path] = typer.Option(None, "--probs", help="4D label probabilities (background + 34)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Montage of slices (across ages for a trajectory; at "
                                  "most 25 of them, evenly spaced)."),
    model: Optional[Path] = ModelOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Write the template (T1, labels, probabilities) for given attributes, in MNI space."""
    from .run import run_template

    run_template(output, age, sex, attr, labels, probs, png, model, threads, _warn)


# ----------------------------------------------------------------------------------------- register
def _single_only(subject: SubjectOptions, given: dict[str, object]) -> None:
    """A batch takes no single-file output option (nor --mask): say so instead of ignoring them."""
    from .batch import check_single_only

    check_single_only({**given, "--mask": subject.mask, "--brain-mask": subject.brain_mask, "--brain": subject.brain,
                       "--quality": subject.quality, "--qc": subject.qc})


@app.command("register")
@with_option_groups
def register_command(
    image: Path = ImageArg,
    subject: SubjectOptions = GROUP,
    template: Optional[Path] = TemplateOpt,
    template_labels: Optional[Path] = TemplateLabelsOpt,
    moved: Optional[Path] = typer.Option(None, "-o", "--moved", help="Subject moved into template space."),
    template_out: Optional[Path] = typer.Option(None, "-O", "--template-out", help="Template moved into subject space."),
    trans: Optional[Path] = typer.Option(None, "-t", "--trans", help="Subject->template warp (on the template grid)."),
    inverse: Optional[Path] = typer.Option(None, "-T", "--inverse", help="Template->subject warp (on the subject grid)."),
    affine_out: Optional[Path] = typer.Option(None, "--affine", help="Affine part, ITK/ANTs text (.txt)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Template labels in subject space."),
    jacobian: Optional[Path] = typer.Option(None, "--jacobian", help="log-Jacobian determinant (template grid)."),
    out_dir: Optional[Path] = OutDirOpt,
    outputs: Optional[str] = outputs_option("moved, template, warp, inverse, affine, labels, jacobian, brainmask, "
                                            "brain, qc (default moved,warp,labels)."),
    run: RunOptions = GROUP,
) -> None:
    """Register a subject to its attribute-matched template; writes only the outputs asked for."""
    from .run import run_request

    given = {"-o": moved, "-O": template_out, "-t": trans, "-T": inverse, "--affine": affine_out, "--labels": labels,
             "--jacobian": jacobian}
    if _batch(image, out_dir, outputs, run):
        _single_only(subject, given)
    run_request(_request("register", image, subject, run, {
        "moved": moved, "template": template_out, "warp": trans, "inverse": inverse, "affine": affine_out,
        "labels": labels, "jacobian": jacobian}, out_dir=out_dir, output_names=outputs, template=template,
        template_labels=template_labels), _warn)


# ----------------------------------------------------------------------------------------- segment
@app.command("segment")
@with_option_groups
def segment_command(
    ctx: typer.Context,
    image: Path = ImageArg,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Segmentation (34 structures, FreeSurfer "
                                          "ids); required for a single image."),
    subject: SubjectOptions = GROUP,
    template: Optional[Path] = TemplateOpt,
    template_labels: Optional[Path] = TemplateLabelsOpt,
    probs: Optional[Path] = typer.Option(None, "--probs", help="4D label probabilities in subject space."),
    vol: Optional[Path] = typer.Option(None, "--vol", help="CSV of structure volumes in mm3 (batch mode: one "
                                       "row per subject, default OUT_DIR/volumes.csv; a BIDS dataset: "
                                       "OUT_DIR/volumes.tsv)."),
    out_dir: Optional[Path] = OutDirOpt,
    outputs: Optional[str] = outputs_option("dseg, probseg, brainmask, brain, qc, and register's moved, template, "
                                            "warp, inverse, affine, jacobian (default dseg)."),
    run: RunOptions = GROUP,
) -> None:
    """Segment a subject with the label map of its conditional template (subject's own grid); the label
    map is the template's, carried by the same warp that `register` writes."""
    from .run import run_request

    if _batch(image, out_dir, outputs, run):
        _single_only(subject, {"-o": output, "--probs": probs})
    elif output is None:
        ctx.fail("Missing option '-o' / '--output'.")
    run_request(_request("segment", image, subject, run, {"dseg": output, "probseg": probs}, vol=vol, out_dir=out_dir,
                         output_names=outputs, template=template, template_labels=template_labels), _warn)


# ----------------------------------------------------------------------------------------- bids
@app.command("bids")
@with_option_groups
def bids_command(
    bids_dir: Path = typer.Argument(..., help="The BIDS dataset (T1w images; age and sex from participants.tsv "
                                    "and sessions.tsv)."),
    output_dir: Path = typer.Argument(..., help="Output folder: a BIDS-derivatives dataset, e.g. "
                                      "BIDS_DIR/derivatives/atlasmorph."),
    analysis_level: str = typer.Argument(..., help="participant: segment the selected T1w images (dseg, sidecars, "
                                         "their rows of volumes.tsv); group: check that volumes.tsv has a row for "
                                         "every selected image and summarise it."),
    outputs: Optional[str] = typer.Option(None, "--outputs", help="Comma-separated, from dseg, probseg, brainmask, "
                                          "brain, qc, moved, template, warp, inverse, affine, jacobian (default "
                                          "dseg)."),
    skullstripped: bool = SkullstrippedOpt,
    strict: bool = StrictOpt,
    run: RunOptions = GROUP,
) -> None:
    """BIDS-App form: atlasmorph bids BIDS_DIR OUTPUT_DIR participant [--participant-label ...] (docs/bids.md)."""
    from ..bids.layout import check_bids_root
    from .bids_batch import group_summary
    from .run import run_request

    check_bids_root(bids_dir)  # not a folder of images: this form takes a BIDS dataset only
    if analysis_level == "group":
        typer.echo(group_summary(bids_dir, output_dir, run.selection()))
        return
    if analysis_level != "participant":
        raise typer.BadParameter(f"'{analysis_level}': the analysis level is participant or group",
                                 param_hint="ANALYSIS_LEVEL")
    run_request(_request("segment", bids_dir, SubjectOptions(skullstripped=skullstripped, strict=strict), run, {},
                         out_dir=output_dir, output_names=outputs), _warn)


# ----------------------------------------------------------------------------------------- build
from .build import build_command  # noqa: E402  (cli.build: a study template from the user's scans)

app.command("build")(with_option_groups(build_command))


def _one_line(text: str) -> str:
    """Messages are one line on stderr, whatever the exception text holds."""
    return " ".join(str(text).split())


def _fail(prefix: str, message: str, code: int) -> None:
    err.print(Text.assemble((prefix, "bold red"), _one_line(message)), soft_wrap=True)
    sys.exit(code)


def _click_errors() -> tuple[tuple, tuple, tuple, tuple]:
    """(no-args-help, usage, other click, abort) exception classes: Typer >= 0.20 vendors Click as
    typer._click, older Typer uses click itself; catch both."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["x"]))
        except ImportError:
            pass

    def get(attr: str) -> tuple:
        return tuple(getattr(m, attr) for m in mods if hasattr(m, attr))

    return get("NoArgsIsHelpError"), get("UsageError"), get("ClickException"), get("Abort")


def main() -> None:
    """Console entry point: run the app, turning errors into one line on stderr and a non-zero exit.

    Exit codes: 0 success, 1 bad input or failure, 2 bad command line (unknown option, bad option
    value, missing argument), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; 129 for SIGHUP).
    `--debug` prints the traceback before the line. SIGTERM is handled like Ctrl-C (safety.py), so
    temporary files are removed and a batch keeps what it finished.
    """
    from .safety import terminate_as_interrupt

    with terminate_as_interrupt():
        _main()


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep what is freed (mallopt: no mmap, no trim).

    A command allocates and frees volume-sized tensors (tens of MB) hundreds of times; by default each is a
    fresh mmap whose pages the kernel must fault in and zero again: 0.4-0.6 s of system time per `segment`
    here. The price is memory held for reuse: a batch plateaus about 30 % higher (docs/benchmarks.md,
    section 3). Not for `train` (long runs, not measured). False where there is no glibc (macOS, musl):
    nothing changes there.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def console_entry() -> None:
    """The `atlasmorph` executable (and `python -m atlasmorph_cli`): main(), then leave at once.

    Every output is written and closed by then, so the process ends with os._exit after flushing stdout and
    stderr: the interpreter's teardown of the imported torch takes about 0.7 s, a quarter of a `template` run.
    main() itself returns normally (tests and embedding code call it in-process)."""
    code: object = 0
    if next((a for a in sys.argv[1:] if not a.startswith("-")), "") != "train":
        keep_freed_memory()
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): print it, as the interpreter would
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (atlasmorph ... | head): nothing left to deliver
            pass
    os._exit(code)


def _main() -> None:
    no_args, usage, click_error, abort = _click_errors()
    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)
    except no_args as exc:  # `atlasmorph` alone: the help, as Click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except usage as exc:
        if debug:
            traceback.print_exc()
        ctx = getattr(exc, "ctx", None)
        cmd = ctx.command_path.split()[-1] if ctx is not None and ctx.parent is not None else ""
        where = f"{cmd}: " if cmd else ""
        _fail("atlasmorph: error: ", f"{where}{exc.format_message()} (see atlasmorph {cmd + ' ' if cmd else ''}--help)",
              exc.exit_code)
    except click_error as exc:
        if debug:
            traceback.print_exc()
        _fail("atlasmorph: error: ", exc.format_message(), exc.exit_code)
    except AtlasMorphError as exc:
        if debug:
            traceback.print_exc()
        _fail("atlasmorph: error: ", str(exc), getattr(exc, "exit_code", 1))  # 3: failed quality check (--strict)
    except OSError as exc:  # disk full, permission denied, file vanished: the environment, not a bug
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _fail("atlasmorph: error: ", f"{where}{exc.strerror or exc}", 1)
    except (KeyboardInterrupt, *abort):
        from .safety import interruption_message

        message, exit_code = interruption_message()
        err.print(message, highlight=False)
        sys.exit(exit_code)
    except Exception as exc:  # anything unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        _fail("atlasmorph: internal error: ", f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)
    if code == 130:  # Typer turns Ctrl-C (and SIGTERM, safety.py) into Exit(130)
        from .safety import interruption_message

        message, code = interruption_message()
        err.print(message, highlight=False)
    if isinstance(code, int) and code != 0:  # typer.Exit(code) from a command
        sys.exit(code)
