"""The one orchestration path of the commands: template; register and segment of one subject or a batch.

`run_request` takes a SubjectRequest (single image or batch) and `process_subject` does one subject for
both: register to the attribute-matched template, check its quality, then write every requested output
(cli.outputs) as hidden temporary files renamed into place together at the end
(io.volumes.all_or_nothing), so a failure, even while writing, never leaves a partial set behind. Large
outputs are computed one at a time as they are written, so memory holds one of them, not all.
The nipype interfaces run the same commands (interfaces.nodes), hence this same path.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
from rich.text import Text

from ..errors import AtlasMorphError
from ..inference.brain_extraction import Brain, resolve_brain
from ..inference.quality import Quality, QualityError, assess
from ..inference.quality import write_json as write_quality
from ..inference.registration import register_subject, save_native_probs
from ..inference.template import Template, encode_attributes, load_template, make_template
from ..io.volumes import Volume, all_or_nothing, check_output_dir, load_volume, save_volume, suffix_of
from ..model.model_file import AtlasMorph
from ..model.shipped import load
from ..progress import progress_bar
from .batch import (MAX_LISTED, QC_INDEX_NAME, VOLUMES_NAME, BatchResult, BatchSubject, FolderOutputs,
                    is_batch_input, parse_outputs, read_batch_input, segment_volumes_path, subject_attrs)
from .batch_resume import keep_finished, skip_finished
from .outputs import (REGISTER_FLAGS, SEGMENT_FLAGS, SUBJECT_FLAGS, brain_writes, check_outputs, check_warp_format,
                      qc_write, register_writes, save_template)
from .request import SubjectRequest, attribute_values
from .safety import check_batch_outputs, check_distinct, outputs_not_inputs
from .volumes_table import volume_cells, write_volumes

Warn = Callable[[list[str]], None]
MAX_AGES = 1000  # templates one `template --age START:STOP:STEP` may write (each is written, then freed)
MONTAGE_AGES = 25  # columns of a --png montage at most (evenly spaced over the ages, first and last included)
NO_ATTRIBUTES = "no attributes given: using the population-average template"


# ----------------------------------------------------------------------------------------- template
def parse_ages(age: str | None) -> list[float] | None:
    """'70' -> [70]; '20:80:10' -> [20, 30, ..., 80] (stop included); None -> None."""
    if age is None:
        return None
    try:
        parts = [float(p) for p in age.split(":")]
    except ValueError:
        raise AtlasMorphError(f"--age must be a number or START:STOP:STEP, got '{age}'") from None
    if not all(np.isfinite(parts)):
        raise AtlasMorphError(f"--age must be finite numbers, got '{age}'")
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise AtlasMorphError(f"--age range must be START:STOP:STEP with STEP > 0, got '{age}'")
    n = int(np.floor((parts[1] - parts[0]) / parts[2] + 0.5)) + 1  # counted before anything is allocated
    if n > MAX_AGES:
        raise AtlasMorphError(f"--age {age} asks for {n} templates; at most {MAX_AGES} per command "
                              "(use a larger STEP)")
    return [float(a) for a in np.arange(parts[0], parts[1] + parts[2] / 2, parts[2])]


def _with_age(path: Path, age: float) -> Path:
    suffix = suffix_of(path)
    return path.with_name(f"{path.name[: -len(suffix)]}_age-{age:g}{suffix}")


def montage_ages(ages: list) -> list:
    """The ages a --png montage shows: all of them, or MONTAGE_AGES evenly spaced (first and last included)."""
    if len(ages) <= MONTAGE_AGES:
        return list(ages)
    return [ages[i] for i in sorted({int(round(j)) for j in np.linspace(0, len(ages) - 1, MONTAGE_AGES)})]


@outputs_not_inputs
def run_template(output, age, sex, attr, labels, probs, png, model_path, threads, warn: Warn) -> None:
    check_outputs([output, labels, probs, png])
    ages = parse_ages(age)
    _, model = load(model_path, threads)
    series = ages if ages and len(ages) > 1 else None
    vectors = []
    for a in ages or [None]:  # every age's attributes are checked before anything is computed
        vec, warnings = encode_attributes(model, attribute_values(a, sex, attr))
        warn(warnings)
        vectors.append((a, vec))
    shown = montage_ages([a for a, _ in vectors]) if png else []
    kept = []
    # one template at a time: computed, written (to temporary files, renamed together at the end), freed;
    # memory does not grow with the number of ages
    with all_or_nothing():
        for a, vec in vectors:
            t = make_template(model, vec)
            name = (lambda p: _with_age(p, a)) if series else (lambda p: p)
            save_template(t, name(output), name(labels) if labels else None, name(probs) if probs else None)
            if a in shown:
                kept.append((a, SimpleNamespace(t1=t.t1)))
            del t
        if png:
            from ..inference.report import template_montage

            template_montage(kept, png, sex)


# ----------------------------------------------------------------------------------------- one subject
def encode_request(model: AtlasMorph, values: dict[str, object] | None, warn: Warn, prefix: str = ""):
    """The (1, A) attribute vector of `values`; its warnings (and the population-average notice) go to `warn`."""
    vec, warnings = encode_attributes(model, values)
    if values is None:
        warnings = [*warnings, NO_ATTRIBUTES]
    warn([f"{prefix}{w}" for w in warnings])
    return vec


def request_template(req: SubjectRequest, model: AtlasMorph, warn: Warn) -> Template | None:
    """The --template/--template-labels template on the model grid (None: the model's conditional template)."""
    if req.template is None:
        return None
    template, warnings = load_template(req.template, req.template_labels, model.config.model_grid)
    warn(warnings)
    return template


def check_quality(reg, brain: Brain, name: str, warn: Warn) -> Quality:
    """The subject's quality (inference.quality); one warning line naming it and the reasons when it is flagged."""
    q = assess(reg, brain.mask, name, brain.source)
    if q.flagged:
        warn([q.warning()])
    return q


def strict_exit(strict: bool, qualities: list[Quality]) -> None:
    """With --strict, a flagged subject makes the command fail (exit code 3) after its outputs are written."""
    bad = [q for q in qualities if q.flagged]
    if strict and bad:
        names = ", ".join(q.subject for q in bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise QualityError(f"--strict: {len(bad)} of {len(qualities)} subject(s) failed the quality check ({names}); "
                           "their outputs were written")


def process_subject(model: AtlasMorph, vec, subj: Volume, brain: Brain, req: SubjectRequest, paths: dict[str, Path],
                    name: str, attrs: dict | None, warn: Warn, table: Path | None = None,
                    described: Callable[[Quality], list] | None = None,
                    template: Template | None = None) -> tuple[Quality, list | None]:
    """Register one subject, check its quality and write the outputs in `paths` (output name -> path) together.

    `name` names the subject in warnings, its quality record and (segment) its row of the volumes table
    `table` (a one-row table; a batch writes its table at the end). Returns the quality and, for segment,
    the row's cells. `template` (--template) replaces the model's conditional template (`vec` is then unused).
    """
    reg = register_subject(model, subj, vec, brain.as_volume(subj), refine=req.refine, template=template,
                           refine_loss=req.refine_loss)
    q = check_quality(reg, brain, name, warn)
    seg = cells = None
    if req.command == "segment":
        seg, sums = reg.labels_to_native()
        cells = volume_cells(sums, float(np.prod(subj.zooms)), q)
        writes = [lambda: save_volume(seg, subj.affine, paths["dseg"], header=subj.header, dtype=np.int32)]
        if paths.get("probseg"):  # frame by frame: the 35 native frames are never held together
            writes.append(lambda: save_native_probs(reg, paths["probseg"]))
    else:
        writes = []
    writes += register_writes(reg, req.warp_format, paths)  # segment: a batch's --outputs warp, moved, ...
    writes += brain_writes(subj, brain, paths)
    if paths.get("quality"):
        writes.append(lambda: write_quality(paths["quality"], [q]))
    if paths.get("qc"):
        writes.append(qc_write(reg, brain, q, paths["qc"], attrs, seg))
    if table is not None:
        writes.append(lambda: write_volumes(table, [(name, cells)], [1.0]))
    if described is not None:  # a BIDS batch: each output's sidecar, written with the images
        writes += described(q)
    with all_or_nothing():
        for w in writes:
            w()
    return q, cells


def run_request(req: SubjectRequest, warn: Warn, **batch_options) -> BatchResult | None:
    """Run `register` or `segment` as asked: over a batch (folder, .txt, .csv) or on one image."""
    req.check_template()
    if is_batch_input(req.image):
        return run_batch(req, warn, **batch_options)
    run_single(req, warn)
    return None


def run_single(req: SubjectRequest, warn: Warn) -> None:
    """One image: check the request, then load, extract the brain, register and write (process_subject)."""
    flags = {**(REGISTER_FLAGS if req.command == "register" else SEGMENT_FLAGS), "vol": "--vol", **SUBJECT_FLAGS}
    paths = req.requested()
    outputs = {flag: paths[n] if n != "vol" else req.vol for n, flag in flags.items()
               if (req.vol if n == "vol" else paths.get(n)) is not None}
    inputs = {what: Path(p) for what, p in (("the input image", req.image), ("the --mask image", req.mask),
                                            ("the model file", req.model_path), ("the --template image", req.template),
                                            ("the --template-labels map", req.template_labels)) if p is not None}
    if inputs and outputs:  # no output may replace an input (cli.safety)
        check_distinct(outputs, inputs)
    if req.command == "register":
        check_warp_format(req.warp_format)
    check_outputs(list(outputs.values()))
    if req.command == "register" and not outputs:
        raise AtlasMorphError("no output requested: give at least one of -o, -O, -t, -T, --affine, --labels, "
                              "--jacobian, --brain-mask, --brain, --quality, --qc")
    subj = load_volume(req.image)
    mask = load_volume(req.mask) if req.mask else None
    brain = resolve_brain(subj, mask, req.skullstripped)
    warn(brain.warnings)
    _, model = load(req.model_path, req.threads)
    template = request_template(req, model, warn)
    vec = encode_request(model, req.attrs, warn) if template is None else None
    q, _ = process_subject(model, vec, subj, brain, req, paths, Path(req.image).name, req.attrs, warn, table=req.vol,
                           template=template)
    strict_exit(req.strict, [q])


# ----------------------------------------------------------------------------------------- a batch
def batch_inputs(req: SubjectRequest, names: list[str], warn: Warn):
    """(subjects, outputs layout) of a batch: a BIDS dataset (cli.bids_batch), or a folder, list or cohort CSV."""
    from ..bids import BidsSelection, is_bids_root

    source, out_dir = req.image, req.out_dir
    selection = req.bids or BidsSelection()
    if out_dir.exists() and not out_dir.is_dir():
        raise AtlasMorphError(f"--out-dir {out_dir}: exists and is not a folder")
    if is_bids_root(source):
        from .bids_batch import BidsOutputs, bids_subjects

        if req.vol is not None:
            raise AtlasMorphError("--vol: not used with a BIDS dataset (the volumes go to volumes.tsv in --out-dir)")
        subjects = bids_subjects(source, selection, warn)
        return subjects, BidsOutputs(source, out_dir, names, subjects, req.command == "segment")
    if selection.given:
        raise AtlasMorphError(f"{source}: --participant-label, --session-label and --bids-filter are for a BIDS "
                              "dataset (a folder with dataset_description.json and sub-* folders)")
    subjects = read_batch_input(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(out_dir / VOLUMES_NAME)
    vol = segment_volumes_path(out_dir, req.vol) if req.command == "segment" else None
    return subjects, FolderOutputs(req.command, out_dir, names, vol)


def run_batch(req: SubjectRequest, warn: Warn = lambda m: None, *,
              on_subject: Callable[[int, BatchSubject, str | None], None] | None = None,
              quiet: bool = False) -> BatchResult:
    """Run `register` or `segment` over every subject of the batch `req.image`; raise if any subject failed.

    `on_subject(i, subject, error)` is called after each subject (error None on success); the
    benchmarks use it to sample memory. `req.skullstripped`: every image without a mask is already
    brain-extracted (no extraction). A subject that fails the quality check gets one warning line; with
    `req.strict`, the batch then ends with exit code 3 (after every subject's outputs are written).
    """
    command, source, out_dir = req.command, req.image, req.out_dir
    check_warp_format(req.warp_format)
    if out_dir is None:
        raise AtlasMorphError(f"{source}: a batch input (folder, .txt or .csv) needs --out-dir")
    names = parse_outputs(command, req.output_names)
    subjects, layout = batch_inputs(req, names, warn)
    vol = layout.vol
    check_batch_outputs(source, subjects, out_dir, layout.outputs_of, vol, req.model_path)  # no output is an input

    model_path, model = load(req.model_path, req.threads)
    layout.start(model_path)
    attr_names = model.config.encoder.names
    model.config.encoder.check_names(req.attrs)
    template = request_template(req, model, warn)
    volumes: list[tuple[str, object]] = []
    failed: list[tuple[BatchSubject, str]] = []
    qualities: list[Quality] = []
    if req.skip_existing:
        subjects, skipped = skip_finished(subjects, layout, volumes)
        if skipped:
            warn([f"--skip-existing: {len(skipped)} subject(s) already done, {len(subjects)} to do"])
    with progress_bar(quiet) as bar, keep_finished(layout, volumes, subjects):
        task = bar.add_task(command, total=len(subjects))
        for i, s in enumerate(subjects):
            error = None
            try:
                values = subject_attrs(s, req.attrs, attr_names)
                vec = encode_request(model, values, warn, prefix=f"{s.tag}: ") if template is None else None
                subj = load_volume(s.t1)
                mask = load_volume(s.mask) if s.mask else None
                brain = resolve_brain(subj, mask, req.skullstripped and mask is None)
                warn([f"{s.tag}: {w}" for w in brain.warnings])
                paths = layout.paths(s, create=True)  # with the quality record, always written
                q, cells = process_subject(model, vec, subj, brain, req, paths, s.tag, values, warn,
                                           described=lambda q: layout.described(s, values, q), template=template)
                if command == "segment":
                    volumes.append((s.id, cells))
                qualities.append(q)
                del subj, mask, brain
            except AtlasMorphError as exc:
                error = str(exc)
            except Exception as exc:  # one broken subject must not stop a cohort
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                failed.append((s, error))
                where = s.tag if str(s.t1) in error else f"{s.tag} ({s.t1})"
                bar.console.print(Text.assemble(("atlasmorph: error: ", "bold red"), f"{where}: ",
                                                " ".join(error.split())), soft_wrap=True)
            if on_subject is not None:
                on_subject(i, s, error)
            bar.advance(task)

    result = BatchResult(subjects, failed, qualities=qualities)
    if "qc" in names and qualities:
        from ..inference.qc import qc_index

        by_tag = {s.tag: s for s in subjects}
        qc_index(out_dir / QC_INDEX_NAME, [(q.subject, layout.paths(by_tag[q.subject])["qc"].relative_to(out_dir)
                                            .as_posix(), q) for q in qualities if q.subject in by_tag])
    if command == "segment" and volumes:
        layout.write_table(volumes)
        result.volumes = vol
    if failed:
        listed = ", ".join(s.tag for s, _ in failed[:MAX_LISTED])
        more = f", ... ({len(failed) - MAX_LISTED} more)" if len(failed) > MAX_LISTED else ""
        rest = (f"the others were written to {out_dir}" if len(failed) < len(subjects)
                else "nothing was written" + (f" (the {len(volumes)} rows of subjects done before are kept in {vol})"
                                              if volumes else ""))
        raise AtlasMorphError(f"{len(failed)} of {len(subjects)} subjects failed ({listed}{more}); {rest}")
    strict_exit(req.strict, qualities)
    return result
