"""BIDS-derivatives output: file names, dataset_description.json, sidecar JSONs, label table, volumes TSV.

Layout (docs/bids.md has the reasons and the spec sections they follow)::

    <out_dir>/dataset_description.json           DatasetType derivative, GeneratedBy (+ model, sha256)
    <out_dir>/desc-atlasmorph_dseg.tsv           index/name/color of the 34 structures (inherited)
    <out_dir>/descriptions.tsv                   what each desc-<label> means
    <out_dir>/volumes.tsv (+ volumes.json)       one row per input image
    <out_dir>/sub-<s>/[ses-<t>/]anat/<source entities>_desc-atlasmorph_dseg.nii.gz (+ .json) ...

A derivative keeps all entities of its source T1w (``sub-01_ses-2_run-1``) and adds its own. Outputs
in the T1w's own grid carry no ``space`` entity (as sMRIPrep writes them) and point at the source image
with ``SpatialReference``; outputs on the template grid carry ``space-template``. Every file is written
through `atomic_path` and must resolve inside the output folder.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
from contextlib import contextmanager, nullcontext as _no_lock
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from .. import __version__
from ..errors import AtlasMorphError
from ..io.volumes import atomic_path
from ..labels import STRUCTURES
from .attributes import MISSING, read_tsv
from .layout import ANAT_ENTITIES, BidsInput

BIDS_VERSION = "1.10.0"
PIPELINE = "AtlasMorph"
LABEL_TABLE = "desc-atlasmorph_dseg.tsv"
VOLUMES_TABLE = "volumes.tsv"
LOCK_NAME = ".volumes.tsv.lock"  # hidden: the validator and the walker skip it
DESCRIPTIONS = {
    "atlasmorph": "AtlasMorph atlas segmentation: the conditional template's labels warped onto the subject",
    "brain": "brain extraction used for registration (mask, or the T1w with non-brain voxels zeroed)",
    "template": "the subject's conditional template (age/sex-matched) warped into the subject's T1w grid",
    "affine": "the affine part of the subject-to-template registration",
    "logjacobian": "log of the Jacobian determinant of the subject-to-template deformation",
}


@dataclass(frozen=True)
class OutputKind:
    """How one output is named and described: its entities after the source's, suffix, extension."""

    entities: tuple[tuple[str, str], ...]
    suffix: str
    extension: str
    native: bool  # on the source T1w's grid (SpatialReference: the source image)
    metadata: Mapping[str, object] = field(default_factory=dict)
    datatype: str = "anat"

    @property
    def has_sidecar(self) -> bool:
        """JSON files describe themselves; figures are for people (as fMRIPrep's, no sidecar)."""
        return self.extension != ".json" and self.datatype != "figures"


def _label_map() -> list[str]:
    return ["Background", *(s.name for s in STRUCTURES)]


# Keys are batch mode's --outputs names (cli/batch.py), so the CLI can name its outputs either way.
OUTPUTS: dict[str, OutputKind] = {
    "dseg": OutputKind((("desc", "atlasmorph"),), "dseg", ".nii.gz", True, {"Manual": False}),
    "probseg": OutputKind((("desc", "atlasmorph"),), "probseg", ".nii.gz", True, {"LabelMap": _label_map()}),
    "brainmask": OutputKind((("desc", "brain"),), "mask", ".nii.gz", True, {"Type": "Brain"}),
    "brain": OutputKind((("desc", "brain"),), "T1w", ".nii.gz", True, {"SkullStripped": True}),
    "moved": OutputKind((("space", "template"),), "T1w", ".nii.gz", False, {"SkullStripped": True}),
    "template": OutputKind((("desc", "template"),), "T1w", ".nii.gz", True, {"SkullStripped": True}),
    "warp": OutputKind((("from", "T1w"), ("to", "template"), ("mode", "image")), "xfm", ".nii.gz", True),
    "inverse": OutputKind((("from", "template"), ("to", "T1w"), ("mode", "image")), "xfm", ".nii.gz", False),
    "affine": OutputKind((("from", "T1w"), ("to", "template"), ("mode", "image"), ("desc", "affine")), "xfm",
                         ".txt", True),
    "jacobian": OutputKind((("space", "template"), ("desc", "logjacobian")), "map", ".nii.gz", False),
    "quality": OutputKind((("desc", "atlasmorph"),), "qc", ".json", True),
    "qc": OutputKind((("desc", "atlasmorph"),), "qc", ".png", True, datatype="figures"),
}
OUTPUTS["labels"] = OUTPUTS["dseg"]  # register's name for the same file


@dataclass(frozen=True)
class GeneratedBy:
    """The pipeline entry of dataset_description.json: AtlasMorph's version and the model it ran."""

    model_name: str | None = None
    model_sha256: str | None = None
    version: str = __version__

    @classmethod
    def for_model(cls, model_path: Path | str) -> "GeneratedBy":
        """Name (file name without .safetensors) and sha256 of the model file the run uses."""
        from ..model.shipped import sha256  # the digest printed in the model card

        path = Path(model_path)
        return cls(path.name.removesuffix(".safetensors"), sha256(path))

    def as_json(self) -> dict[str, object]:
        entry: dict[str, object] = {"Name": PIPELINE, "Version": self.version}
        if self.model_name:
            entry["Description"] = f"Conditional-template registration and atlas segmentation with the model " \
                                   f"{self.model_name}"
            entry["ModelName"] = self.model_name
        if self.model_sha256:
            entry["ModelSHA256"] = self.model_sha256
        return entry


def derivative_name(source: BidsInput, output: str) -> str:
    """The file name of `output` for this source: ``sub-01_ses-2_desc-atlasmorph_dseg.nii.gz``."""
    kind = _kind(output)
    parts = [f"{k}-{v}" for k, v in source.entities.items()] + [f"{k}-{v}" for k, v in kind.entities]
    return "_".join(parts) + f"_{kind.suffix}{kind.extension}"


def _kind(output: str) -> OutputKind:
    if output not in OUTPUTS:
        raise AtlasMorphError(f"unknown output '{output}' (choose from {', '.join(OUTPUTS)})")
    return OUTPUTS[output]


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar beside an output (same name, .json instead of .nii.gz/.nii/.txt)."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".txt", ".png"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    raise AtlasMorphError(f"{path}: no sidecar for this kind of file")


def _uri(dataset: str, relative: str) -> str:
    return f"bids:{dataset}:{relative}"


class DerivativesWriter:
    """Names and writes one BIDS-derivatives dataset for the inputs of one raw dataset.

    `out_dir`: the derivatives folder (created); `source_root`: the raw dataset, linked as ``raw`` in
    DatasetLinks so sidecars can say ``"Sources": ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]``.
    """

    def __init__(self, out_dir: Path | str, generated_by: GeneratedBy, source_root: Path | str):
        self.out_dir = Path(out_dir)
        self.generated_by = generated_by
        self.source_root = Path(source_root)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise AtlasMorphError(f"{self.out_dir}: exists and is not a folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._root = self.out_dir.resolve()

    # ------------------------------------------------------------------------------------ names
    def path_for(self, source: BidsInput, output: str, create: bool = True) -> Path:
        """Where `output` of this source goes (its folder is created unless `create` is False)."""
        kind = _kind(output)
        folder = self.out_dir / f"sub-{source.subject}"
        if source.session is not None:
            folder = folder / f"ses-{source.session}"
        path = self._inside(folder / kind.datatype / derivative_name(source, output))
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def paths_for(self, source: BidsInput, outputs: Iterable[str], create: bool = True) -> dict[str, Path]:
        """{output: path} for the outputs asked for (batch mode's names: dseg, probseg, warp, ...)."""
        return {o: self.path_for(source, o, create) for o in outputs}

    def _inside(self, path: Path) -> Path:
        """Refuse a path that would leave the output folder (through '..' or a symbolic link)."""
        try:
            path.resolve().relative_to(self._root)
        except ValueError:
            raise AtlasMorphError(f"{path}: outside the output folder {self.out_dir}; refusing to write it") from None
        return path

    # ------------------------------------------------------------------------------ dataset files
    def write_dataset_description(self) -> Path:
        """dataset_description.json, the label table and descriptions.tsv (idempotent).

        An existing description written by another pipeline, or by AtlasMorph with another model, is an
        error: mixing two models' outputs in one derivatives folder would make the folder lie.
        """
        path = self._inside(self.out_dir / "dataset_description.json")
        ours = self.generated_by.as_json()
        if path.is_file():
            try:
                old = json.loads(path.read_text())
                previous = old.get("GeneratedBy", [{}])[0]
            except (ValueError, AttributeError, IndexError, KeyError):
                raise AtlasMorphError(f"{path}: not a readable dataset_description.json; choose another output "
                                      "folder") from None
            if previous.get("Name") != PIPELINE or previous.get("ModelSHA256") != ours.get("ModelSHA256"):
                what = previous.get("ModelName") or previous.get("Name") or "another pipeline"
                raise AtlasMorphError(f"{self.out_dir}: holds outputs of {what}; write these to another folder")
        raw_desc = self._source_description()
        source: dict[str, object] = {"URL": "bids:raw:"}
        if raw_desc.get("DatasetDOI"):
            source["DOI"] = raw_desc["DatasetDOI"]
        description = {
            "Name": f"AtlasMorph outputs for {raw_desc.get('Name') or self.source_root.name}",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [ours],
            "SourceDatasets": [source],
            "DatasetLinks": {"raw": os.path.relpath(self.source_root.resolve(), self._root)},
        }
        _write_json(path, description)
        self.write_label_table()
        self._write_tsv(self.out_dir / "descriptions.tsv", ["desc_id", "description"],
                        [[k, v] for k, v in DESCRIPTIONS.items()])
        return path

    def _source_description(self) -> dict:
        try:
            d = json.loads((self.source_root / "dataset_description.json").read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_label_table(self) -> Path:
        """desc-atlasmorph_dseg.tsv: index (FreeSurfer id, as in the dseg images), name, colour."""
        rows = [[str(s.fs_id), s.name, "#{:02x}{:02x}{:02x}".format(*s.rgb)] for s in STRUCTURES]
        return self._write_tsv(self.out_dir / LABEL_TABLE, ["index", "name", "color"], rows)

    # ---------------------------------------------------------------------------------- sidecars
    def sidecar(self, source: BidsInput, output: str, attributes: Mapping[str, object] | None,
                quality: Mapping[str, object] | None = None, extra: Mapping[str, object] | None = None) -> dict:
        """The sidecar content of one output (see write_sidecar)."""
        kind = _kind(output)
        raw = _uri("raw", source.relative_path(self.source_root))
        meta: dict[str, object] = {"Sources": [raw]}
        if kind.native:
            meta["SpatialReference"] = raw
        meta.update(kind.metadata)
        if self.generated_by.model_name:
            meta["Model"] = self.generated_by.model_name
        if self.generated_by.model_sha256:
            meta["ModelSHA256"] = self.generated_by.model_sha256
        meta["Attributes"] = dict(attributes) if attributes else None
        if quality is not None:
            meta["Quality"] = dict(quality)
        meta.update(extra or {})
        return meta

    def write_sidecar(self, source: BidsInput, output: str, attributes: Mapping[str, object] | None,
                      quality: Mapping[str, object] | None = None, extra: Mapping[str, object] | None = None) -> Path:
        """Write the JSON beside an output: Sources, SpatialReference (native outputs), the output kind's
        BIDS fields (LabelMap, Type, SkullStripped, ...), Model, ModelSHA256, the Attributes the template
        was made for (None: the population average), and Quality when the caller gives it."""
        kind = _kind(output)
        if not kind.has_sidecar:
            raise AtlasMorphError(f"output '{output}' has no sidecar (a JSON file itself, or a figure)")
        path = sidecar_path(self.path_for(source, output))
        _write_json(path, self.sidecar(source, output, attributes, quality, extra))
        return path

    # ----------------------------------------------------------------------------------- volumes
    def write_volumes(self, rows: Sequence[tuple[BidsInput, Sequence[str]]], columns: Sequence[str],
                      descriptions: Mapping[str, Mapping[str, object]] | None = None,
                      keep_others: bool = False) -> Path:
        """volumes.tsv: participant_id, session_id (if any image has a session), the other entities that
        tell two images of a session apart (acq, run, ...), then `columns` (e.g. total_brain, the 34
        structures in mm3, the quality columns); empty cells become 'n/a'. `descriptions` go to
        volumes.json (BIDS column descriptions: LongName, Description, Units).

        `keep_others`: the rows of the existing volumes.tsv for images not in `rows` are kept (a run on
        some participants adds to the table of earlier runs); the read-merge-write holds a lock on the
        folder, so participant-level jobs running at the same time do not drop each other's rows.
        """
        new: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for source, cells in rows:
            if len(cells) != len(columns):
                raise AtlasMorphError(f"{source.id}: {len(cells)} volume cells for {len(columns)} columns")
            new[image_key(source.entities)] = [*cells]
        with _locked(self._inside(self.out_dir / LOCK_NAME)) if keep_others else _no_lock():
            merged = {**self.read_volumes(columns), **new} if keep_others else new
            keys = sorted(merged) if keep_others else list(merged)
            sessions = any(k == "ses" for key in keys for k, _ in key)
            extra = [k for k in dict.fromkeys(k for key in keys for k, _ in key) if k not in ("sub", "ses")]
            header = ["participant_id", *(["session_id"] if sessions else []), *extra, *columns]
            table = []
            for key in keys:
                ents = dict(key)
                ids = [f"sub-{ents['sub']}", *([f"ses-{ents['ses']}" if "ses" in ents else ""] if sessions else []),
                       *(ents.get(k, "") for k in extra)]
                table.append([*ids, *merged[key]])
            path = self._write_tsv(self.out_dir / VOLUMES_TABLE, header, table)
        if descriptions:
            _write_json(self._inside(path.with_suffix(".json")), {k: dict(v) for k, v in descriptions.items()})
        return path

    def read_volumes(self, columns: Sequence[str]) -> dict[tuple[tuple[str, str], ...], list[str]]:
        """The rows of the existing volumes.tsv, {image key: cells of `columns` as written ('n/a' where the
        table lacks a column)}; {} when there is no readable table. Keys: `image_key(entities)`."""
        path = self.out_dir / VOLUMES_TABLE
        if not path.is_file():
            return {}
        try:
            old = read_tsv(path)
        except AtlasMorphError:
            return {}
        out = {}
        for row in old:
            ents = {"sub": row.get("participant_id", "").removeprefix("sub-")}
            if row.get("session_id", "n/a") not in MISSING:
                ents["ses"] = row["session_id"].removeprefix("ses-")
            ents.update({k: v for k, v in row.items() if k in ANAT_ENTITIES and k not in ("sub", "ses")
                         and v not in MISSING})
            if ents["sub"]:
                out[image_key(ents)] = [row.get(c) or "n/a" for c in columns]
        return out

    def _write_tsv(self, path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> Path:
        path = self._inside(path)
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, delimiter="\t", lineterminator="\n")
            w.writerow(header)
            for row in rows:
                w.writerow([_cell(c) for c in row])
        return path


def image_key(entities: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """One image's identity in volumes.tsv: its entities in BIDS order (the same whatever the column order)."""
    order = {e: i for i, e in enumerate(ANAT_ENTITIES)}
    return tuple(sorted(entities.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created) for the block: one writer of the shared table at a time."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\t", " ").replace("\n", " ").strip()
    return text or "n/a"


def _write_json(path: Path, content: Mapping[str, object]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
