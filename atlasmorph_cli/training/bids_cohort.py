"""A BIDS dataset as a training cohort: each T1w image, its attributes and its segmentation from a derivatives folder.

`atlasmorph train --data BIDS_ROOT` reads the dataset with the BIDS walker (atlasmorph_cli.bids: filters,
participants.tsv/sessions.tsv) and builds the same `Subject` list training.cohort.read_cohort builds from
a CSV, so the rest of training is unchanged. Segmentations come from one derivatives dataset holding
``sub-<s>[_ses-<t>]..._dseg.nii[.gz]`` files with the T1w's entities (FreeSurfer or MUSE ids, like a cohort
CSV's seg column); a T1w without one trains without labels, as a CSV row with an empty seg does.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..bids.layout import BidsInput, BidsSelection, parse_entities
from ..errors import AtlasMorphError
from .cohort import Subject

# Entities a derivative adds to its source's (spec: Derivatives, common data types).
DERIVATIVE_ENTITIES = frozenset({"space", "res", "den", "desc", "label"})
# A dseg in one of these spaces lies on the T1w's own grid; others (MNI152...) do not.
NATIVE_SPACES = frozenset({"orig", "T1w", "individual"})
NO_SEGMENTATIONS = "none"
MAX_LISTED = 10


def seg_files(folder: Path, root: Path, inp: BidsInput) -> list[Path]:
    """The dseg files in derivatives `folder` made from the T1w `inp`: same folder inside the dataset,
    the T1w's entities plus only derivative ones (desc, space in the T1w's own space, ...)."""
    where = folder / inp.path.parent.relative_to(root)
    if not where.is_dir():
        return []
    out = []
    for p in sorted(where.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(("_dseg.nii.gz", "_dseg.nii")):
            continue
        parsed = parse_entities(p.name)
        if parsed is None:
            continue
        entities = parsed[0]
        source = {k: v for k, v in entities.items() if k not in DERIVATIVE_ENTITIES}
        if source == inp.entities and entities.get("space", "orig") in NATIVE_SPACES:
            out.append(p)
    return out


def seg_of(folder: Path, root: Path, inp: BidsInput) -> Path | None:
    """The one segmentation of `inp` in `folder` (None: it has none); two or more are an error naming them."""
    segs = seg_files(folder, root, inp)
    if len(segs) > 1:
        raise AtlasMorphError(f"{inp.relative_path(root)}: {len(segs)} segmentations in {folder} "
                              f"({', '.join(p.name for p in segs)}); keep one dseg per T1w image there")
    return segs[0] if segs else None


def _made_by_atlasmorph(folder: Path) -> bool:
    """Whether `folder` is AtlasMorph's own derivatives dataset (its predicted labels are no training truth)."""
    try:
        d = json.loads((folder / "dataset_description.json").read_text())
        return any(g.get("Name") == "AtlasMorph" for g in d.get("GeneratedBy", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def seg_folder(root: Path, given: str | None, inputs: list[BidsInput]) -> Path | None:
    """The derivatives folder holding the segmentations: `given` (a folder under ROOT/derivatives/, or a path;
    'none': train without labels), else the one folder under ROOT/derivatives/ with dseg files for these
    images (AtlasMorph's own outputs are not considered); none or several is an error saying what to give."""
    derivatives = root / "derivatives"
    if given is not None:
        if given.strip().lower() == NO_SEGMENTATIONS:
            return None
        for folder in (derivatives / given, Path(given)):
            if folder.is_dir():
                return folder
        raise AtlasMorphError(f"--seg-derivatives {given}: neither a folder under {derivatives} nor a folder")
    folders = sorted(p for p in derivatives.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if derivatives.is_dir() else []
    found = [f for f in folders if not _made_by_atlasmorph(f) and any(seg_files(f, root, i) for i in inputs)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise AtlasMorphError(f"{root}: no folder under derivatives/ holds segmentations of these T1w images "
                              "(sub-<s>[_ses-<t>]..._dseg.nii[.gz] with the T1w's entities); name one with "
                              "--seg-derivatives NAME_OR_PATH, or give --seg-derivatives none to train without labels")
    raise AtlasMorphError(f"{root}: {len(found)} derivatives folders hold segmentations of these T1w images "
                          f"({', '.join(f.name for f in found)}); choose one with --seg-derivatives NAME")


def _text(value: object) -> str:
    """An attribute as the cohort CSV would hold it: 41.5 -> '41.5', 30.0 -> '30', 'F' -> 'F'."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def read_bids_cohort(root: Path | str, selection: BidsSelection | None = None,
                     seg_derivatives: str | None = None) -> tuple[list[Subject], list[str]]:
    """The selected T1w images of the BIDS dataset at `root` as training subjects, and the warnings to print.

    Ids are the images' BIDS names (``sub-01_ses-2``); attributes are text as in a cohort CSV, every
    column of the dataset present in every subject ('' where missing, so the usual rule leaves out a
    subject without a training attribute); `row` is the image's position in the walk.
    """
    root = Path(root)
    scan = (selection or BidsSelection()).find(root)
    warnings = list(scan.warnings) + [w for inp in scan for w in inp.warnings]
    if scan.without_t1w:
        warnings.append(f"{len(scan.without_t1w)} subject(s) have no T1w image and are left out: "
                        + _listed([f"sub-{s}" for s in scan.without_t1w]))
    folder = seg_folder(root, seg_derivatives, scan.inputs)
    columns = list(dict.fromkeys(k for inp in scan for k in inp.attrs))
    subjects, unlabelled = [], []
    for n, inp in enumerate(scan, start=1):
        seg = seg_of(folder, root, inp) if folder is not None else None
        if folder is not None and seg is None:
            unlabelled.append(inp.id)
        attrs = {c: _text(inp.attrs[c]) if c in inp.attrs else "" for c in columns}
        subjects.append(Subject(n, inp.id, inp.path, seg, None, attrs, participant=inp.subject))
    if unlabelled:
        warnings.append(f"{len(unlabelled)} of {len(subjects)} T1w image(s) have no segmentation in {folder} and "
                        "train without labels (their brain mask is then the T1's non-zero voxels, so they must be "
                        f"brain-extracted): {_listed(unlabelled)}")
    return subjects, warnings


def _listed(items: list[str]) -> str:
    more = f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more
