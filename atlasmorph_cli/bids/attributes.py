"""Subject attributes from a BIDS dataset: participants.tsv, overridden per session by sessions.tsv.

BIDS column conventions: ``age`` in years, ``sex`` as M/F/male/female (any case; also m/f), ``n/a`` or an
empty cell for a missing value. The result is the attribute dict batch mode takes (``{'age': 41.5,
'sex': 'F'}``, missing values absent; other columns pass through as text, so a model conditioned on e.g.
``site`` finds it). A value that cannot be read (sex 'X', age 'old') is treated as missing with a warning
naming the subject, the file and the value: one bad cell must not stop a 1000-subject run, and the
subject then follows batch mode's rule for missing attributes (docs/bids.md).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AtlasMorphError

MISSING = ("", "n/a")
SEX_SPELLINGS = {"m": "M", "male": "M", "f": "F", "female": "F"}
ID_COLUMNS = {"participants.tsv": "participant_id", "sessions.tsv": "session_id"}


def read_tsv(path: Path) -> list[dict[str, str]]:
    """A BIDS TSV file as rows of stripped strings (header row first, tab-separated, UTF-8)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = [h.strip() for h in next(reader, [])]
            rows = []
            for n, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise AtlasMorphError(f"{path}: line {n} has {len(cells)} cells, the header {len(header)} "
                                          "(BIDS TSV files are separated by tabs)")
                rows.append({h: c.strip() for h, c in zip(header, cells)})
    except (UnicodeDecodeError, csv.Error) as exc:
        raise AtlasMorphError(f"{path}: not a readable TSV file ({exc})") from None
    return rows


def _column(row: dict[str, str], name: str) -> str | None:
    """The cell of column `name` (case-insensitive: 'Age' is common in the wild), None if absent/missing."""
    for key, value in row.items():
        if key.lower() == name:
            return None if value.lower() in MISSING else value
    return None


def parse_row(row: dict[str, str], id_column: str, where: str) -> tuple[dict[str, object], dict[str, str]]:
    """One participants/sessions row -> (attributes, {attribute: warning}); `where` names the row."""
    attrs: dict[str, object] = {}
    warnings: dict[str, str] = {}
    for key, value in row.items():
        if key == id_column or key.lower() in ("age", "sex") or value.lower() in MISSING:
            continue
        attrs[key] = value
    age = _column(row, "age")
    if age is not None:
        try:
            years = float(age)
            if not math.isfinite(years):
                raise ValueError
            attrs["age"] = years
        except ValueError:
            warnings["age"] = f"{where}: age '{age}' is not a number of years; ignored"
    sex = _column(row, "sex")
    if sex is not None:
        canonical = SEX_SPELLINGS.get(sex.lower())
        if canonical is None:
            warnings["sex"] = f"{where}: sex '{sex}' is not one of M/F/male/female (any case); ignored"
        else:
            attrs["sex"] = canonical
    return attrs, warnings


def _index(path: Path, prefix: str) -> dict[str, dict[str, str]]:
    """Rows of a participants/sessions table by label (without prefix); duplicated labels are an error."""
    id_column = ID_COLUMNS["participants.tsv" if prefix == "sub" else "sessions.tsv"]
    rows = read_tsv(path)
    if rows and id_column not in rows[0]:
        raise AtlasMorphError(f"{path}: no '{id_column}' column (columns: {', '.join(rows[0])})")
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        label = row[id_column]
        label = label[len(prefix) + 1:] if label.startswith(prefix + "-") else label
        if label in out:
            raise AtlasMorphError(f"{path}: {prefix}-{label} has two rows")
        out[label] = row
    return out


@dataclass
class DatasetAttributes:
    """participants.tsv of a dataset, and each subject's sessions.tsv when first asked for."""

    root: Path
    participants: dict[str, dict[str, str]]
    warnings: list[str] = field(default_factory=list)
    _sessions: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict, repr=False)

    def sessions_of(self, subject: str) -> dict[str, dict[str, str]]:
        """The rows of sub-<subject>/sub-<subject>_sessions.tsv by session label ({} if there is none)."""
        if subject not in self._sessions:
            path = self.root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
            self._sessions[subject] = _index(path, "ses") if path.is_file() else {}
        return self._sessions[subject]

    def for_session(self, subject: str, session: str | None) -> tuple[dict[str, object], list[str]]:
        """A subject's attributes (participants.tsv, then its session's row of sessions.tsv on top)."""
        attrs: dict[str, object] = {}
        warnings: dict[str, str] = {}
        row = self.participants.get(subject)
        if row is not None:
            attrs, warnings = parse_row(row, "participant_id", f"participants.tsv, sub-{subject}")
        if session is not None:
            srow = self.sessions_of(subject).get(session)
            if srow is not None:
                more, w = parse_row(srow, "session_id", f"sub-{subject}_sessions.tsv, ses-{session}")
                attrs.update(more)  # a session's readable value replaces the participant's, and its warning
                warnings = {k: v for k, v in warnings.items() if k not in more} | w
        return attrs, list(warnings.values())


def read_dataset_attributes(root: Path | str) -> DatasetAttributes:
    """The dataset's participants.tsv (none: no attributes, with a warning saying so)."""
    root = Path(root)
    path = root / "participants.tsv"
    if not path.is_file():
        return DatasetAttributes(root, {}, [f"{root}: no participants.tsv, so no age or sex for any subject"])
    return DatasetAttributes(root, _index(path, "sub"))
