"""Which cohort subjects train and which validate: a seeded split, a split.json reused, attributes present."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import AtlasMorphError
from .cohort import Subject


def split_subjects(subjects: list[Subject], fraction: float, seed: int) -> tuple[list[Subject], list[Subject]]:
    """Hold out a fraction of participants for validation, chosen by a seeded permutation of their ids.

    Images of one participant (BIDS sessions) stay on one side, so validation never sees a training brain;
    a CSV cohort has one image per id and splits exactly as before.
    """
    group = {s.id: s.participant or s.id for s in subjects}
    ids = sorted(set(group.values()))
    rng = np.random.default_rng(seed)
    n_val = int(round(fraction * len(ids))) if fraction > 0 else 0
    if len(ids) - n_val < 1:
        raise AtlasMorphError("not enough subjects left for training after the validation split")
    val = set(rng.permutation(ids)[:n_val].tolist())
    return [s for s in subjects if group[s.id] not in val], [s for s in subjects if group[s.id] in val]


def read_split(path: Path) -> dict[str, list[str]]:
    """The train and validation subject ids of a split.json (as `atlasmorph train` writes it)."""
    try:
        d = json.loads(Path(path).read_text())
        out = {k: [str(x) for x in d[k]] for k in ("train", "validation")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AtlasMorphError(f"{path}: not a split.json with 'train' and 'validation' lists ({type(exc).__name__})")
    both = set(out["train"]) & set(out["validation"])
    if both:
        raise AtlasMorphError(f"{path}: {len(both)} subject(s) in both train and validation, e.g. {sorted(both)[0]}")
    return out


def apply_split(subjects: list[Subject], split: dict[str, list[str]]) -> tuple[list[Subject], list[Subject]]:
    """Train and validation subjects as a given split names them; subjects it does not name are left out."""
    have = {s.id for s in subjects}
    missing = [i for i in split["train"] + split["validation"] if i not in have]
    if missing:
        raise AtlasMorphError(f"--split names {len(missing)} subject(s) the cohort lacks or that miss an attribute, "
                              f"e.g. {missing[0]}")
    train, val = set(split["train"]), set(split["validation"])
    if not train:
        raise AtlasMorphError("--split: no training subject")
    return [s for s in subjects if s.id in train], [s for s in subjects if s.id in val]


def usable_subjects(subjects: list[Subject], names: list[str]) -> tuple[list[Subject], list[Subject]]:
    """Subjects with every training attribute filled in, and those left out for lacking one."""
    if subjects and names:
        missing = [n for n in names if n not in subjects[0].attrs]
        if missing:
            raise AtlasMorphError(f"the cohort has no column {', '.join(repr(m) for m in missing)} (its attribute "
                                  f"columns: {', '.join(subjects[0].attrs) or 'none'}; choose with --attributes)")
    ok = [s for s in subjects if all(s.attrs.get(n, "") != "" for n in names)]
    return ok, [s for s in subjects if s not in ok]
