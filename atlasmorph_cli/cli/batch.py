"""Batch mode of `atlasmorph register` and `atlasmorph segment`: many subjects, one process, one model load.

The positional input is a batch when it is

* a folder: every ``.nii``/``.nii.gz``/``.mgz`` file directly in it (sorted; hidden files skipped);
* a text list (``.txt``): one image path per line (blank lines and ``#`` comments skipped);
* a cohort CSV (``.csv``): a ``t1`` column, optional ``mask`` (else ``seg``: ``seg > 0`` is the brain
  mask, as in training) and id (``subject``/``id``/``subject_id``/``participant_id``) columns, and
  attribute columns (``age``, ``sex``, ...).

Relative paths in a list or CSV are relative to that file's folder. An image without a mask is
treated as a single image is (whole-head: brain-extracted first; skull-stripped: its non-zero
voxels; ``--skullstripped`` for all; see brain_extraction.py). Attributes: a CSV cell wins over
``--age/--sex/--attr``, which fill in for all
subjects; a subject with no attribute at all gets the population-average template (with a warning),
one with only some of them fails.

Outputs go to ``--out-dir`` with BIDS-derivatives-style names. The subject id is the CSV's id column,
else the file name without its suffix; ``<label>`` is that id without a leading ``sub-`` and with every
character that is not a letter or digit removed (BIDS labels are alphanumeric), e.g.
``IXI012-HH-1211`` -> ``sub-IXI012HH1211``. Letters and digits of any script are kept (``患者01`` ->
``sub-患者01``, ``Müller`` -> ``sub-Müller``, NFC-normalised): dropping them would leave some ids with no
label at all. Two subjects with the same label are refused up front, as is any output path that is an
input (an image, a mask, the list or cohort CSV).

``--skip-existing`` (after an interruption): a subject whose outputs all exist (and, for segment, whose
row is in the existing volumes table) is not redone; the new table keeps those rows. An interrupted
batch (Ctrl-C, SIGTERM) writes the volumes of the subjects it finished and says how far it got.

=========  ==============  ====================================================================
command    --outputs name  file in --out-dir (single-file option)
=========  ==============  ====================================================================
register   moved           ``sub-<label>_space-template_T1w.nii.gz`` (-o)
register   template        ``sub-<label>_desc-template_T1w.nii.gz`` (-O, template in subject space)
register   warp            ``sub-<label>_from-T1w_to-template_mode-image_xfm.nii.gz`` (-t)
register   inverse         ``sub-<label>_from-template_to-T1w_mode-image_xfm.nii.gz`` (-T)
register   affine          ``sub-<label>_from-T1w_to-template_mode-image_desc-affine_xfm.txt`` (--affine)
register   labels          ``sub-<label>_desc-atlasmorph_dseg.nii.gz`` (--labels)
register   jacobian        ``sub-<label>_space-template_desc-logjacobian_map.nii.gz`` (--jacobian)
segment    dseg            ``sub-<label>_desc-atlasmorph_dseg.nii.gz`` (-o)
segment    probseg         ``sub-<label>_desc-atlasmorph_probseg.nii.gz`` (--probs)
both       brainmask       ``sub-<label>_desc-brain_mask.nii.gz`` (--brain-mask, the brain mask used)
both       brain           ``sub-<label>_desc-brain_T1w.nii.gz`` (--brain, the skull-stripped image)
segment    (always)        ``volumes.csv`` in --out-dir, or the path given with --vol: one row per
                           subject that succeeded (``subject`` column: the subject id; then the
                           quality columns qc_score, qc_flagged, qc_reasons)
both       (always)        ``sub-<label>_desc-atlasmorph_qc.json``: the subject's quality (quality.py)
both       qc              ``sub-<label>_desc-atlasmorph_qc.png`` (--qc, the QC picture, qc.py) and
                           ``qc_index.html`` in --out-dir: every picture of the run, flagged first
=========  ==============  ====================================================================

Defaults: register ``moved,warp,labels``; segment ``dseg``. ``--warp-format`` applies to the warps.

A subject that fails is reported in one line and the run goes on; each subject's outputs appear
together or not at all. The exit code is non-zero when any subject failed.
"""
from __future__ import annotations

import csv
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from rich.text import Text

from ..training.cohort import ID_COLUMNS
from ..errors import AtlasMorphError
from ..io.volumes import SUFFIXES, all_or_nothing, check_output_dir, load_volume, save_volume
from .batch_resume import keep_finished, skip_finished
from ..progress import progress_bar
from .safety import check_batch_outputs
from ..io.stream import save_native_probs

LIST_SUFFIXES = (".txt", ".csv")
REGISTER_OUTPUTS = {
    "moved": "space-template_T1w.nii.gz",
    "template": "desc-template_T1w.nii.gz",
    "warp": "from-T1w_to-template_mode-image_xfm.nii.gz",
    "inverse": "from-template_to-T1w_mode-image_xfm.nii.gz",
    "affine": "from-T1w_to-template_mode-image_desc-affine_xfm.txt",
    "labels": "desc-atlasmorph_dseg.nii.gz",
    "jacobian": "space-template_desc-logjacobian_map.nii.gz",
}
SEGMENT_OUTPUTS = {"dseg": "desc-atlasmorph_dseg.nii.gz", "probseg": "desc-atlasmorph_probseg.nii.gz"}
BRAIN_OUTPUTS = {"brainmask": "desc-brain_mask.nii.gz", "brain": "desc-brain_T1w.nii.gz"}
QUALITY_NAME = "desc-atlasmorph_qc.json"  # every subject's quality (quality.py), always written
QC_OUTPUTS = {"qc": "desc-atlasmorph_qc.png"}
REGISTER_OUTPUTS.update(QC_OUTPUTS)
SEGMENT_OUTPUTS.update(QC_OUTPUTS)
QC_INDEX_NAME = "qc_index.html"
REGISTER_OUTPUTS.update(BRAIN_OUTPUTS)
SEGMENT_OUTPUTS.update(BRAIN_OUTPUTS)
DEFAULT_OUTPUTS = {"register": "moved,warp,labels", "segment": "dseg"}
VOLUMES_NAME = "volumes.csv"
MAX_LISTED = 10


@dataclass
class BatchSubject:
    """One subject of a batch: id (as given), BIDS label, image, optional mask and raw attributes."""

    id: str
    label: str
    t1: Path
    mask: Path | None = None
    attrs: dict[str, str | None] = field(default_factory=dict)

    def name(self, suffix: str) -> str:
        return f"sub-{self.label}_{suffix}"


@dataclass
class BatchResult:
    subjects: list[BatchSubject]
    failed: list[tuple[BatchSubject, str]]
    volumes: Path | None = None
    qualities: list = field(default_factory=list)  # quality.Quality of every subject done in this run


def is_batch_input(path: Path) -> bool:
    """A folder, a .txt list or a .csv cohort (anything else is a single image)."""
    return path.is_dir() or path.suffix.lower() in LIST_SUFFIXES


def _image_stem(path: Path) -> str:
    name = path.name
    for s in SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def bids_label(sid: str) -> str:
    """The participant label for a subject id: no 'sub-' prefix, letters and digits (of any script) only."""
    s = unicodedata.normalize("NFC", sid)
    if s.startswith("sub-"):
        s = s[4:].split("_", 1)[0]
    return "".join(c for c in s if c.isalnum())


def read_batch_input(path: Path) -> list[BatchSubject]:
    """The subjects of a folder, a .txt list or a cohort .csv (files are checked when processed)."""
    if not path.exists():
        raise AtlasMorphError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(SUFFIXES))
        if not files:
            raise AtlasMorphError(f"{path}: no {'/'.join(SUFFIXES)} images in this folder")
        subjects = [BatchSubject(_image_stem(f), bids_label(_image_stem(f)), f) for f in files]
    elif path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        if not entries:
            raise AtlasMorphError(f"{path}: the list has no image paths")
        files = [path.parent / e for e in entries]
        subjects = [BatchSubject(_image_stem(f), bids_label(_image_stem(f)), f) for f in files]
    else:
        subjects = _read_csv(path)
    _check_labels(path, subjects)
    return subjects


def _read_csv(path: Path) -> list[BatchSubject]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [(f or "").strip() for f in (reader.fieldnames or [])]
        if "t1" not in fields:
            raise AtlasMorphError(f"{path}: missing required column 't1' (columns: {', '.join(fields)})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if not rows:
        raise AtlasMorphError(f"{path}: the cohort has no rows")
    id_col = next((c for c in ID_COLUMNS if c in fields), None)
    subjects = []
    for n, r in enumerate(rows, start=1):
        if not r.get("t1"):
            raise AtlasMorphError(f"{path}: row {n}: empty 't1'")
        t1 = path.parent / r["t1"]
        sid = r[id_col] if id_col and r.get(id_col) else _image_stem(t1)
        mask_col = "mask" if r.get("mask") else "seg" if r.get("seg") else None
        mask = path.parent / r[mask_col] if mask_col else None
        attrs = {k: (v or None) for k, v in r.items() if k not in ("t1", "seg", "mask", id_col)}
        subjects.append(BatchSubject(sid, bids_label(sid), t1, mask, attrs))
    return subjects


def _check_labels(path: Path, subjects: list[BatchSubject]) -> None:
    seen: dict[str, str] = {}
    for s in subjects:
        if not s.label:
            raise AtlasMorphError(f"{path}: subject '{s.id}' has no letters or digits to make a BIDS label")
        if s.label in seen:
            raise AtlasMorphError(f"{path}: subjects '{seen[s.label]}' and '{s.id}' would both be sub-{s.label}; "
                                  "give unique ids (an id column in a cohort CSV)")
        seen[s.label] = s.id


def parse_outputs(command: str, text: str | None) -> list[str]:
    """The --outputs list, checked against the command's output names."""
    table = REGISTER_OUTPUTS if command == "register" else SEGMENT_OUTPUTS
    names = [n.strip() for n in (text or DEFAULT_OUTPUTS[command]).split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise AtlasMorphError(f"--outputs: unknown output '{','.join(unknown)}' for {command} "
                              f"(choose from {', '.join(table)})")
    if command == "segment" and "dseg" not in names:
        names.insert(0, "dseg")
    return list(dict.fromkeys(names))


def check_single_only(given: dict[str, object]) -> None:
    """Single-file output options make no sense for a batch: say so instead of ignoring them."""
    used = [flag for flag, value in given.items() if value]
    if used:
        raise AtlasMorphError(f"{', '.join(used)}: not used with a batch input (folder, .txt or .csv); "
                              "choose outputs with --outputs and a folder with --out-dir")


def _subject_attrs(subject: BatchSubject, cli_attrs: dict[str, object] | None, names: list[str]):
    merged: dict[str, object] = dict(cli_attrs or {})
    merged.update({k: v for k, v in subject.attrs.items() if v is not None})
    values = {k: v for k, v in merged.items() if k in names}
    return values or None


def run_batch(
    command: str,
    source: Path,
    cli_attrs: dict[str, object] | None,
    out_dir: Path | None,
    outputs: str | None,
    *,
    warp_format: str = "fs",
    vol: Path | None = None,
    model_path: Path | None = None,
    threads: int | None = None,
    refine: int | None = None,
    warn: Callable[[list[str]], None] = lambda m: None,
    on_subject: Callable[[int, BatchSubject, str | None], None] | None = None,
    quiet: bool = False,
    skip_existing: bool = False,
    skullstripped: bool = False,
    strict: bool = False,
) -> BatchResult:
    """Run `register` or `segment` over every subject of `source`; raise if any subject failed.

    `on_subject(i, subject, error)` is called after each subject (error None on success); the
    benchmarks use it to sample memory. `refine`: instance-optimisation steps (None: the default).
    `skullstripped`: every image without a mask is already brain-extracted (no extraction).
    A subject that fails the quality check gets one warning line; with `strict`, the batch then ends
    with exit code 3 (after every subject's outputs are written).
    """
    from ..inference.brain_extraction import resolve_brain
    from .run import (brain_writes, check_quality, qc_write, register_writes, strict_exit, volume_cells,
                           write_volumes)
    from ..inference.quality import write_json as write_quality
    from ..inference.registration import REFINE_STEPS, encode_attributes, load, register
    from ..warpio import WARP_FORMATS

    if command not in DEFAULT_OUTPUTS:
        raise ValueError(command)
    if warp_format not in WARP_FORMATS:
        raise AtlasMorphError(f"--warp-format must be one of {', '.join(WARP_FORMATS)}, got '{warp_format}'")
    if out_dir is None:
        raise AtlasMorphError(f"{source}: a batch input (folder, .txt or .csv) needs --out-dir")
    names = parse_outputs(command, outputs)
    subjects = read_batch_input(source)
    if out_dir.exists() and not out_dir.is_dir():
        raise AtlasMorphError(f"--out-dir {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(out_dir / VOLUMES_NAME)
    if command == "segment":
        vol = vol if vol is not None else out_dir / VOLUMES_NAME
        if vol.suffix.lower() != ".csv":
            raise AtlasMorphError(f"--vol {vol}: the volumes table must be a .csv file")
        check_output_dir(vol)
    table = REGISTER_OUTPUTS if command == "register" else SEGMENT_OUTPUTS

    def outputs_of(s: BatchSubject) -> list[Path]:
        return [out_dir / s.name(table[n]) for n in names]

    check_batch_outputs(source, subjects, out_dir, outputs_of, vol, model_path)  # no output may be an input

    _, model = load(model_path, threads)
    attr_names = model.config.encoder.names
    model.config.encoder.check_names(cli_attrs)
    volumes: list[tuple[str, np.ndarray]] = []
    voxel_mm3: list[float] = []
    failed: list[tuple[BatchSubject, str]] = []
    qualities = []
    if skip_existing:
        subjects, skipped = skip_finished(subjects, outputs_of, vol, volumes, voxel_mm3)
        if skipped:
            warn([f"--skip-existing: {len(skipped)} subject(s) already done, {len(subjects)} to do"])
    with progress_bar(quiet) as bar, keep_finished(vol, volumes, voxel_mm3, subjects, outputs_of):
        task = bar.add_task(command, total=len(subjects))
        for i, s in enumerate(subjects):
            error = None
            try:
                values = _subject_attrs(s, cli_attrs, attr_names)
                vec, warnings = encode_attributes(model, values)
                if values is None:
                    warnings = [*warnings, "no attributes given: using the population-average template"]
                warn([f"sub-{s.label}: {w}" for w in warnings])
                subj = load_volume(s.t1)
                mask = load_volume(s.mask) if s.mask else None
                brain = resolve_brain(subj, mask, skullstripped and mask is None)
                warn([f"sub-{s.label}: {w}" for w in brain.warnings])
                reg = register(model, subj, vec, brain.as_volume(subj),
                               refine=REFINE_STEPS if refine is None else refine)
                q = check_quality(reg, brain, f"sub-{s.label}", warn)
                bpaths = {n: out_dir / s.name(BRAIN_OUTPUTS[n]) for n in names if n in BRAIN_OUTPUTS}
                bwrites = brain_writes(subj, brain, bpaths.get("brainmask"), bpaths.get("brain"))
                bwrites.append(lambda q=q, p=out_dir / s.name(QUALITY_NAME): write_quality(p, [q]))
                if "qc" in names and command == "register":
                    bwrites.append(qc_write(reg, brain, q, out_dir / s.name(QC_OUTPUTS["qc"]), values))
                if command == "register":
                    paths = {n: out_dir / s.name(REGISTER_OUTPUTS[n]) for n in names}
                    writes = register_writes(reg, warp_format, paths.get("moved"), paths.get("template"),
                                             paths.get("warp"), paths.get("inverse"), paths.get("affine"),
                                             paths.get("labels"), paths.get("jacobian")) + bwrites
                    with all_or_nothing():
                        for w in writes:
                            w()
                else:
                    seg, sums = reg.labels_to_native()
                    if "qc" in names:
                        bwrites.append(qc_write(reg, brain, q, out_dir / s.name(QC_OUTPUTS["qc"]), values, seg))
                    probs = out_dir / s.name(SEGMENT_OUTPUTS["probseg"]) if "probseg" in names else None
                    with all_or_nothing():
                        save_volume(seg, subj.affine, out_dir / s.name(SEGMENT_OUTPUTS["dseg"]),
                                    header=subj.header, dtype=np.int32)
                        if probs is not None:  # frame by frame (stream.py)
                            save_native_probs(reg, probs)
                        for w in bwrites:
                            w()
                    volumes.append((s.id, volume_cells(sums, float(np.prod(subj.zooms)), q)))
                    voxel_mm3.append(1.0)
                qualities.append(q)
                del reg, subj, mask, brain
            except AtlasMorphError as exc:
                error = str(exc)
            except Exception as exc:  # one broken subject must not stop a cohort
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                failed.append((s, error))
                where = f"sub-{s.label}" if str(s.t1) in error else f"sub-{s.label} ({s.t1})"
                bar.console.print(Text.assemble(("atlasmorph: error: ", "bold red"), f"{where}: ",
                                                " ".join(error.split())), soft_wrap=True)
            if on_subject is not None:
                on_subject(i, s, error)
            bar.advance(task)

    result = BatchResult(subjects, failed, qualities=qualities)
    if "qc" in names and qualities:
        from ..inference.qc import qc_index

        by_label = {f"sub-{s.label}": s for s in subjects}
        qc_index(out_dir / QC_INDEX_NAME, [(q.subject, by_label[q.subject].name(QC_OUTPUTS["qc"]), q)
                                           for q in qualities if q.subject in by_label])
    if command == "segment" and volumes:
        write_volumes(vol, volumes, voxel_mm3)
        result.volumes = vol
    if failed:
        listed = ", ".join(f"sub-{s.label}" for s, _ in failed[:MAX_LISTED])
        more = f", ... ({len(failed) - MAX_LISTED} more)" if len(failed) > MAX_LISTED else ""
        rest = (f"the others were written to {out_dir}" if len(failed) < len(subjects)
                else "nothing was written" + (f" (the {len(volumes)} rows of subjects done before are kept in {vol})"
                                              if volumes else ""))
        raise AtlasMorphError(f"{len(failed)} of {len(subjects)} subjects failed ({listed}{more}); {rest}")
    strict_exit(strict, qualities)
    return result
