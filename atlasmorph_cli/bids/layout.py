"""The BIDS dataset walker: every T1w image of a raw BIDS dataset, its entities, filters and attributes.

A BIDS root is a folder with ``dataset_description.json`` and ``sub-*`` folders. The walker looks only
where T1w images live, ``sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]``, so a 150-subject dataset is
indexed in milliseconds (docs/bids.md: why not pybids). ``derivatives/``, ``sourcedata/`` and hidden
folders are never entered; a subject with no T1w (after the filters) is reported, not silently dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import AtlasMorphError
from .attributes import DatasetAttributes, read_dataset_attributes

T1W_EXTENSIONS = (".nii.gz", ".nii")
# Entities a raw anatomical file name may carry, in BIDS order (appendix: entity table).
ANAT_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "run", "echo", "flip", "inv", "mt", "part", "chunk")
INDEX_ENTITIES = frozenset({"run", "echo", "flip", "inv", "chunk"})  # values are numbers: run-01 == run-1
_PAIR = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


@dataclass(frozen=True)
class BidsInput:
    """One T1w image of the dataset: its path, its entities (BIDS order, no suffix) and its attributes.

    `attrs` is the dict batch mode takes (``{'age': 41.5, 'sex': 'F', ...}``; a missing value is absent),
    `warnings` what reading the attributes found wrong (an unknown sex spelling, a non-numeric age).
    """

    path: Path
    entities: dict[str, str]
    attrs: dict[str, object] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def subject(self) -> str:
        """The participant label, without 'sub-'."""
        return self.entities["sub"]

    @property
    def session(self) -> str | None:
        """The session label, without 'ses-' (None for a dataset without sessions)."""
        return self.entities.get("ses")

    @property
    def id(self) -> str:
        """The file name without suffix and extension (``sub-01_ses-2_run-1``): unique in a dataset."""
        return "_".join(f"{k}-{v}" for k, v in self.entities.items())

    def relative_path(self, root: Path) -> str:
        """The path inside the dataset, with '/' (for BIDS URIs and messages)."""
        return self.path.relative_to(root).as_posix()


@dataclass
class BidsInputs:
    """What `find_bids_inputs` found: the T1w images, subjects left without one, dataset-level warnings."""

    root: Path
    inputs: list[BidsInput]
    without_t1w: list[str]  # participant labels (no 'sub-') whose folders hold no matching T1w
    warnings: list[str] = field(default_factory=list)
    has_sessions: bool = False

    def __iter__(self):
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(frozen=True)
class BidsSelection:
    """Which T1w images of a dataset to process: --participant-label, --session-label, --bids-filter."""

    participant_labels: tuple[str, ...] | None = None
    session_labels: tuple[str, ...] | None = None
    entities: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_options(cls, participant_labels: Iterable[str] | None, session_labels: Iterable[str] | None,
                     filters: Iterable[str] | None) -> "BidsSelection":
        """The command line's values; `filters` as ENTITY=VALUE (``acq=mprage``; repeatable, a repeated
        entity accepts either value)."""
        entities: dict[str, tuple[str, ...]] = {}
        for item in filters or ():
            key, sep, value = (x.strip() for x in str(item).partition("="))
            if not sep or not key or not value:
                raise AtlasMorphError(f"--bids-filter expects ENTITY=VALUE (e.g. acq=mprage), got '{item}'")
            entities[key] = (*entities.get(key, ()), value)
        return cls(tuple(participant_labels) if participant_labels else None,
                   tuple(session_labels) if session_labels else None, entities)

    @property
    def given(self) -> bool:
        """Whether any filter was given (they apply to a BIDS dataset only)."""
        return bool(self.participant_labels or self.session_labels or self.entities)

    def find(self, root: Path | str) -> "BidsInputs":
        """The selected T1w images of the dataset at `root` (find_bids_inputs)."""
        return find_bids_inputs(root, self.participant_labels, self.session_labels, self.entities)


def is_bids_root(path: Path | str) -> bool:
    """A folder with dataset_description.json and at least one sub-* folder."""
    path = Path(path)
    return (path.is_dir() and (path / "dataset_description.json").is_file()
            and any(p.is_dir() for p in path.glob("sub-*")))


def check_bids_root(root: Path) -> list[Path]:
    """The sub-* folders of the BIDS dataset `root`; an error says what makes it not one."""
    if not root.is_dir():
        raise AtlasMorphError(f"{root}: no such folder")
    if not (root / "dataset_description.json").is_file():
        raise AtlasMorphError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    subjects = [p for p in _visible_dirs(root, "sub-") if p.name[4:].isalnum()]
    if not subjects:
        raise AtlasMorphError(f"{root}: not a BIDS dataset (no sub-* folders)")
    return subjects


def parse_entities(name: str) -> tuple[dict[str, str], str] | None:
    """(entities, suffix) of a BIDS file name such as ``sub-01_ses-a_run-1_T1w.nii.gz``; None if not BIDS."""
    stem = name
    for ext in (".nii.gz", ".nii", ".json", ".tsv"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    *pairs, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for part in pairs:
        m = _PAIR.match(part)
        if m is None or m.group(1) in entities:
            return None
        entities[m.group(1)] = m.group(2)
    if not pairs or next(iter(entities)) != "sub" or not suffix.isalnum():
        return None
    return entities, suffix


def normalise_labels(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    """Labels as given on the command line, with or without their prefix ('sub-01' or '01') -> ['01']."""
    if labels is None:
        return None
    out = []
    for lab in labels:
        for part in str(lab).replace(",", " ").split():
            part = part[len(prefix) + 1:] if part.startswith(prefix + "-") else part
            if not part.isalnum():
                raise AtlasMorphError(f"'{lab}': a {prefix} label has letters and digits only")
            out.append(part)
    return list(dict.fromkeys(out))


def _same_value(entity: str, a: str, b: str) -> bool:
    if entity in INDEX_ENTITIES and a.isdigit() and b.isdigit():
        return int(a) == int(b)
    return a == b


def _matches(entities: Mapping[str, str], wanted: Mapping[str, list[str]]) -> bool:
    for key, values in wanted.items():
        have = entities.get(key)
        if have is None or not any(_same_value(key, have, v) for v in values):
            return False
    return True


def _entity_filters(entities: Mapping[str, str | Iterable[str]] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in (entities or {}).items():
        key = key.strip()
        if key in ("sub", "ses"):
            raise AtlasMorphError(f"entity filter '{key}': use --participant-label / --session-label")
        if key not in ANAT_ENTITIES:
            raise AtlasMorphError(f"entity filter '{key}': not an entity of anatomical images "
                                  f"(choose from {', '.join(e for e in ANAT_ENTITIES if e not in ('sub', 'ses'))})")
        values = [value] if isinstance(value, str) else list(value)
        out[key] = [v[len(key) + 1:] if v.startswith(key + "-") else v for v in values]
    return out


def _visible_dirs(folder: Path, prefix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _t1w_files(anat: Path) -> list[Path]:
    if not anat.is_dir():
        return []
    return sorted(p for p in anat.iterdir() if not p.name.startswith(".") and p.name.endswith(T1W_EXTENSIONS)
                  and (p.name.endswith("_T1w.nii.gz") or p.name.endswith("_T1w.nii")))


def find_bids_inputs(
    root: Path | str,
    participant_labels: Iterable[str] | None = None,
    session_labels: Iterable[str] | None = None,
    entities: Mapping[str, str | Iterable[str]] | None = None,
) -> BidsInputs:
    """Every T1w image of the BIDS dataset at `root` that passes the filters, with its attributes.

    `participant_labels`/`session_labels`: labels with or without 'sub-'/'ses-'; a label that matches no
    folder is an error (a typo would otherwise process nothing or the wrong subjects). `entities`: other
    filters such as ``{'acq': 'mprage', 'run': '1'}`` (a value or a list of accepted values).
    """
    root = Path(root)
    subjects = check_bids_root(root)
    wanted_subs = normalise_labels(participant_labels, "sub")
    wanted_sess = normalise_labels(session_labels, "ses")
    wanted = _entity_filters(entities)
    if wanted_subs is not None:
        present = {p.name[4:] for p in subjects}
        unknown = [lab for lab in wanted_subs if lab not in present]
        if unknown:
            raise AtlasMorphError(f"--participant-label: no folder sub-{unknown[0]} in {root}"
                                  + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        subjects = [p for p in subjects if p.name[4:] in wanted_subs]

    table = read_dataset_attributes(root)
    inputs: list[BidsInput] = []
    without: list[str] = []
    sessions_seen: set[str] = set()
    has_sessions = False
    for sub_dir in subjects:
        label = sub_dir.name[4:]
        ses_dirs = [p for p in _visible_dirs(sub_dir, "ses-") if p.name[4:].isalnum()]
        has_sessions = has_sessions or bool(ses_dirs)
        sessions_seen.update(p.name[4:] for p in ses_dirs)
        if wanted_sess is not None:
            ses_dirs = [p for p in ses_dirs if p.name[4:] in wanted_sess]
        folders = [(p.name[4:], p / "anat") for p in ses_dirs] if ses_dirs or wanted_sess is not None \
            else [(None, sub_dir / "anat")]
        found = []
        for ses, anat in folders:
            for f in _t1w_files(anat):
                parsed = parse_entities(f.name)
                if parsed is None or parsed[0].get("sub") != label or parsed[0].get("ses") != ses:
                    continue  # not a BIDS name, or a name that contradicts its folders
                ents = parsed[0]
                if _matches(ents, wanted):
                    found.append(_with_attributes(f, ents, table))
        if found:
            inputs.extend(found)
        else:
            without.append(label)
    if wanted_sess is not None:
        unknown = [s for s in wanted_sess if s not in sessions_seen]
        if unknown:
            raise AtlasMorphError(f"--session-label: no folder ses-{unknown[0]} in any selected subject of {root}")
    if not inputs:
        raise AtlasMorphError(f"{root}: no T1w image matches (looked for sub-*/[ses-*/]anat/*_T1w.nii[.gz]"
                              + (" with the given filters)" if wanted_subs or wanted_sess or wanted else ")"))
    return BidsInputs(root, inputs, without, list(table.warnings), has_sessions)


def _with_attributes(path: Path, entities: dict[str, str], table: DatasetAttributes) -> BidsInput:
    attrs, warnings = table.for_session(entities["sub"], entities.get("ses"))
    return BidsInput(path, entities, attrs, tuple(warnings))
