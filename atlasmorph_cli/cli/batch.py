"""Batch inputs of `register` and `segment`: the subjects of a folder, list or cohort CSV, and their output names.

The positional input is a batch when it is

* a BIDS dataset (a folder with dataset_description.json and sub-* folders): its T1w images, with
  attributes from participants.tsv/sessions.tsv and BIDS-derivatives outputs (cli.bids_batch,
  docs/bids.md; the table below does not apply);
* a folder: every ``.nii``/``.nii.gz``/``.mgz`` file directly in it (sorted; hidden files skipped);
* a text list (``.txt``): one image path per line (blank lines and ``#`` comments skipped);
* a cohort CSV (``.csv``): a ``t1`` column, optional ``mask`` (else ``seg``: ``seg > 0`` is the brain
  mask, as in training) and id (``subject``/``id``/``subject_id``/``participant_id``) columns, and
  attribute columns (``age``, ``sex``, ...).

Relative paths in a list or CSV are relative to that file's folder. An image without a mask is
treated as a single image is (whole-head: brain-extracted first; skull-stripped: its non-zero
voxels; ``--skullstripped`` for all; see inference.brain_extraction). Attributes: a CSV cell wins over
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
both       (always)        ``sub-<label>_desc-atlasmorph_qc.json``: the subject's quality (inference.quality)
both       qc              ``sub-<label>_desc-atlasmorph_qc.png`` (--qc, the QC picture, inference.qc) and
                           ``qc_index.html`` in --out-dir: every picture of the run, flagged first
=========  ==============  ====================================================================

Defaults: register ``moved,warp,labels``; segment ``dseg``. A segment batch may also ask for register's
outputs but labels (its dseg is the same file). ``--warp-format`` applies to the warps.

The batch itself runs in cli.run (`run_batch`, one model load for all subjects). A subject
that fails is reported in one line and the run goes on; each subject's outputs appear
together or not at all. The exit code is non-zero when any subject failed.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AtlasMorphError
from ..io.volumes import SUFFIXES, check_output_dir, image_stem
from ..training.cohort import read_cohort
from .volumes_table import read_volume_rows, write_volumes

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
QUALITY_NAME = "desc-atlasmorph_qc.json"  # every subject's quality (inference.quality), always written
QC_OUTPUTS = {"qc": "desc-atlasmorph_qc.png"}
REGISTER_OUTPUTS.update(QC_OUTPUTS)
SEGMENT_OUTPUTS.update(QC_OUTPUTS)
QC_INDEX_NAME = "qc_index.html"
REGISTER_OUTPUTS.update(BRAIN_OUTPUTS)
SEGMENT_OUTPUTS.update(BRAIN_OUTPUTS)
# a segment batch (and the BIDS-App form) may keep the transforms too: one registration, both kinds of output
SEGMENT_OUTPUTS.update({k: v for k, v in REGISTER_OUTPUTS.items() if k not in SEGMENT_OUTPUTS and k != "labels"})
DEFAULT_OUTPUTS = {"register": "moved,warp,labels", "segment": "dseg"}
VOLUMES_NAME = "volumes.csv"
MAX_LISTED = 10


@dataclass
class BatchSubject:
    """One subject of a batch: id (as given), BIDS label, image, optional mask and raw attributes.

    `bids`: the image's place in a BIDS dataset (bids.BidsInput) when the batch is one; its outputs are
    then named by the derivatives writer (cli.bids_batch), not by `name`.
    """

    id: str
    label: str
    t1: Path
    mask: Path | None = None
    attrs: dict[str, object] = field(default_factory=dict)
    bids: object | None = None

    def name(self, suffix: str) -> str:
        return f"sub-{self.label}_{suffix}"

    @property
    def tag(self) -> str:
        """How messages and the quality records name the subject: sub-<label>, or the BIDS image
        (sub-01_ses-2: one participant may have several images)."""
        return self.id if self.bids is not None else f"sub-{self.label}"


@dataclass
class BatchResult:
    subjects: list[BatchSubject]
    failed: list[tuple[BatchSubject, str]]
    volumes: Path | None = None
    qualities: list = field(default_factory=list)  # quality.Quality of every subject done in this run


class FolderOutputs:
    """Where a folder, list or cohort-CSV batch writes: ``--out-dir/sub-<label>_<suffix>`` and, for
    segment, the volumes CSV (``--out-dir/volumes.csv`` or ``--vol``). cli.bids_batch.BidsOutputs is the
    same interface for a BIDS dataset."""

    def __init__(self, command: str, out_dir: Path, names: list[str], vol: Path | None):
        self.out_dir, self.names, self.vol = out_dir, names, vol
        self._table = output_table(command)

    def paths(self, s: BatchSubject, create: bool = False) -> dict[str, Path]:  # noqa: ARG002 (one folder)
        """{output name: path} of the requested outputs and the quality record (always written)."""
        return {**{n: self.out_dir / s.name(self._table[n]) for n in self.names},
                "quality": self.out_dir / s.name(QUALITY_NAME)}

    def outputs_of(self, s: BatchSubject) -> list[Path]:
        """The requested outputs of a subject (all present: the subject is done)."""
        paths = self.paths(s)
        return [paths[n] for n in self.names]

    def start(self, model_path: Path) -> None:  # noqa: ARG002 (nothing describes a plain folder)
        """Called once, with the model file, before the first subject."""

    def described(self, s: BatchSubject, attrs: dict | None, quality) -> list:  # noqa: ARG002
        """Writers of the files that describe a subject's outputs (none here)."""
        return []

    def write_table(self, rows: list[tuple[str, list[str]]]) -> None:
        """The volumes table of this run: (subject id, cells) rows."""
        write_volumes(self.vol, rows, [1.0] * len(rows))

    def read_table(self, subjects: list[BatchSubject]) -> dict[str, list[str]]:  # noqa: ARG002
        """{subject id: cells} of the existing volumes table (--skip-existing takes them over)."""
        return read_volume_rows(self.vol) if self.vol is not None else {}


def segment_volumes_path(out_dir: Path, vol: Path | None) -> Path:
    """segment's volumes CSV of a folder/list/CSV batch: --vol, else --out-dir/volumes.csv."""
    vol = vol if vol is not None else out_dir / VOLUMES_NAME
    if vol.suffix.lower() != ".csv":
        raise AtlasMorphError(f"--vol {vol}: the volumes table must be a .csv file")
    check_output_dir(vol)
    return vol


def is_batch_input(path: Path) -> bool:
    """A folder, a .txt list or a .csv cohort (anything else is a single image)."""
    return path.is_dir() or path.suffix.lower() in LIST_SUFFIXES


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
        subjects = [BatchSubject(image_stem(f), bids_label(image_stem(f)), f) for f in files]
    elif path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        if not entries:
            raise AtlasMorphError(f"{path}: the list has no image paths")
        files = [path.parent / e for e in entries]
        subjects = [BatchSubject(image_stem(f), bids_label(image_stem(f)), f) for f in files]
    else:
        subjects = _from_cohort(path)
    _check_labels(path, subjects)
    return subjects


def _from_cohort(path: Path) -> list[BatchSubject]:
    """The subjects of a cohort CSV, read by the one cohort reader (training.cohort.read_cohort); files are
    checked when each subject is processed, so one missing image fails that subject, not the batch."""
    subjects = []
    for c in read_cohort(path, check_files=False):
        attrs = {k: (v or None) for k, v in c.attrs.items()}
        subjects.append(BatchSubject(c.id, bids_label(c.id), c.t1, c.mask or c.seg, attrs))
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
    table = output_table(command)
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


def output_table(command: str) -> dict[str, str]:
    """--outputs name -> file-name suffix for `command`."""
    return REGISTER_OUTPUTS if command == "register" else SEGMENT_OUTPUTS


def subject_attrs(subject: BatchSubject, cli_attrs: dict[str, object] | None, names: list[str]) -> dict | None:
    """A subject's attributes for the model: its CSV cells, filled in by --age/--sex/--attr (None if none)."""
    merged: dict[str, object] = dict(cli_attrs or {})
    merged.update({k: v for k, v in subject.attrs.items() if v is not None})
    values = {k: v for k, v in merged.items() if k in names}
    return values or None
