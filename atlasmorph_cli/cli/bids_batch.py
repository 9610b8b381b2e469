"""A BIDS dataset as a batch: its T1w images as batch subjects, their outputs as a BIDS-derivatives dataset.

`bids_batch` reads the dataset (atlasmorph_cli.bids: the walker, participants/sessions attributes),
reports what it found wrong (unreadable attribute values, subjects without a T1w) and returns the
subjects with a `BidsOutputs`, the interface cli.run.run_batch writes through (cli.batch.FolderOutputs is
the one of a plain folder): paths from the derivatives writer, dataset_description.json before the first
subject, each output's sidecar written together with the images, and one volumes.tsv for the dataset
(rows of images not in this run kept, so participant-level runs add up). docs/bids.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..bids import BidsSelection, DerivativesWriter, GeneratedBy, OUTPUTS
from ..bids.derivatives import VOLUMES_TABLE, image_key
from ..errors import AtlasMorphError
from ..inference.quality import CSV_COLUMNS, Quality
from ..labels import STRUCTURES
from .batch import MAX_LISTED, BatchSubject
from .volumes_table import VOLUME_HEADER

Warn = Callable[[list[str]], None]
VOLUME_COLUMNS = VOLUME_HEADER[1:]  # volumes.tsv: the image's entities, then these


def bids_subjects(root: Path, selection: BidsSelection, warn: Warn) -> list[BatchSubject]:
    """The selected T1w images of the dataset as batch subjects; warns about what the dataset lacks."""
    scan = selection.find(root)
    warn(scan.warnings)
    for inp in scan:
        warn(list(inp.warnings))
    if scan.without_t1w:
        listed = ", ".join(f"sub-{s}" for s in scan.without_t1w[:MAX_LISTED])
        more = f", ... ({len(scan.without_t1w) - MAX_LISTED} more)" if len(scan.without_t1w) > MAX_LISTED else ""
        warn([f"{len(scan.without_t1w)} subject(s) have no T1w image{' matching the filters' if selection.given else ''}"
              f" and are skipped: {listed}{more}"])
    return [BatchSubject(inp.id, inp.subject, inp.path, attrs=dict(inp.attrs), bids=inp) for inp in scan]


def check_derivatives_folder(root: Path, out_dir: Path) -> None:
    """The outputs go to a folder of their own: not the raw dataset itself (nor a folder holding it)."""
    raw, out = root.resolve(), out_dir.resolve()
    if out == raw or raw.is_relative_to(out):
        raise AtlasMorphError(f"{out_dir}: this is the BIDS dataset {'itself' if out == raw else 'or holds it'}; "
                              f"write the outputs to a derivatives folder, e.g. {root / 'derivatives' / 'atlasmorph'}")


class BidsOutputs:
    """Where a BIDS batch writes (the interface of cli.batch.FolderOutputs): derivatives names and sidecars."""

    def __init__(self, root: Path, out_dir: Path, names: list[str], subjects: list[BatchSubject], segment: bool):
        check_derivatives_folder(root, out_dir)
        self.out_dir, self.names = out_dir, names
        self.writer = DerivativesWriter(out_dir, GeneratedBy(), root)
        self.vol = out_dir / VOLUMES_TABLE if segment else None
        self._by_id = {s.id: s for s in subjects}

    def paths(self, s: BatchSubject, create: bool = False) -> dict[str, Path]:
        """{output name: path} of the requested outputs and the quality record (always written)."""
        return self.writer.paths_for(s.bids, [*self.names, "quality"], create)

    def outputs_of(self, s: BatchSubject) -> list[Path]:
        paths = self.paths(s)
        return [paths[n] for n in self.names]

    def start(self, model_path: Path) -> None:
        """dataset_description.json (GeneratedBy: AtlasMorph, the model's name and sha256), the label table;
        a folder holding another pipeline's or another model's outputs is refused here, before any work."""
        self.writer.generated_by = GeneratedBy.for_model(model_path)
        self.writer.write_dataset_description()

    def described(self, s: BatchSubject, attrs: dict | None, quality: Quality) -> list[Callable[[], object]]:
        """Writers of the sidecar of every requested output: the model, the attributes the template was
        made for (None: the population average) and the quality check."""
        q = {"Score": quality.to_dict()["score"], "Flagged": quality.flagged, "Reasons": list(quality.reasons)}
        return [lambda n=n: self.writer.write_sidecar(s.bids, n, attrs, q) for n in self.names
                if OUTPUTS[n].has_sidecar]

    def write_table(self, rows: list[tuple[str, list[str]]]) -> None:
        """volumes.tsv with this run's rows; rows of the dataset's other images (earlier runs) are kept."""
        self.writer.write_volumes([(self._by_id[sid].bids, cells) for sid, cells in rows], VOLUME_COLUMNS,
                                  volume_descriptions(), keep_others=True)

    def read_table(self, subjects: list[BatchSubject]) -> dict[str, list[str]]:
        """{subject id: cells} of the existing volumes.tsv (--skip-existing takes them over)."""
        old = self.writer.read_volumes(VOLUME_COLUMNS)
        return {s.id: old[k] for s in subjects if (k := image_key(s.bids.entities)) in old}


def group_summary(root: Path, out_dir: Path, selection: BidsSelection) -> str:
    """The group level of the BIDS-App form: every selected image must have its row in volumes.tsv (written
    by the participant-level runs); returns a one-line summary, or raises naming the images without one."""
    scan = selection.find(root)
    table = out_dir / VOLUMES_TABLE
    if not table.is_file():
        raise AtlasMorphError(f"{table}: no volumes table; run the participant level first")
    rows = DerivativesWriter(out_dir, GeneratedBy(), root).read_volumes(["qc_flagged"])
    missing = [inp.id for inp in scan if image_key(inp.entities) not in rows]
    if missing:
        listed = ", ".join(missing[:MAX_LISTED]) + (f", ... ({len(missing) - MAX_LISTED} more)"
                                                    if len(missing) > MAX_LISTED else "")
        raise AtlasMorphError(f"{table}: {len(missing)} of {len(scan)} selected images have no row (their "
                              f"participant-level run failed or has not run): {listed}")
    flagged = [inp.id for inp in scan if rows[image_key(inp.entities)][0] == "1"]
    note = f"; {len(flagged)} failed the quality check: {', '.join(flagged[:MAX_LISTED])}" if flagged else ""
    return f"{table}: {len(scan)} images of {len({i.subject for i in scan})} participants, all present{note}"


def volume_descriptions() -> dict[str, dict[str, object]]:
    """volumes.json: what each column of volumes.tsv holds (BIDS tabular-file descriptions)."""
    out: dict[str, dict[str, object]] = {
        "total_brain": {"Description": "sum of the 34 structures' volumes", "Units": "mm^3"}}
    for s in STRUCTURES:
        out[s.name] = {"Description": f"volume of {s.name} (soft count: the warped template probabilities)",
                       "Units": "mm^3"}
    descriptions = {"qc_score": "quality score (docs/quality.md)",
                    "qc_flagged": "1: the subject failed the quality check", "qc_reasons": "why it was flagged"}
    out.update({c: {"Description": descriptions.get(c, c)} for c in CSV_COLUMNS})
    return out
