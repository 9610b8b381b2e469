"""Cohort CSV -> subjects brought into the model space, cached so training never redoes it.

A cohort CSV has a `t1` column, optional `seg` and `mask` columns and any attribute columns
(`age`, `sex`, ...); paths are relative to the CSV. Each subject is skull-stripped (its mask, else
`seg > 0`, else the non-zero voxels of an already brain-extracted T1), intensity-normalised, affinely
aligned to the reference brain and resampled once onto the model grid.
"""
from __future__ import annotations

import csv
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry.affine import fit_affine
from ..errors import AtlasMorphError
from ..geometry.intensity import brain_mask, normalize
from ..io.volumes import Volume, image_stem, load_volume
from ..labels import to_index
from ..progress import progress_bar
from ..geometry.space import MODEL_GRID, Grid, resample, resample_labels

ID_COLUMNS = ("subject", "id", "subject_id", "participant_id")
PATH_COLUMNS = ("t1", "seg", "mask")
CACHE_VERSION = "1"


@dataclass(frozen=True)
class Subject:
    """One cohort row: its 1-based row number, id, files and raw attribute strings."""

    row: int
    id: str
    t1: Path
    seg: Path | None
    mask: Path | None
    attrs: dict[str, str]
    participant: str | None = None  # who was scanned (BIDS sub-); sessions of one participant split together

    def where(self) -> str:
        return f"row {self.row} ({self.id})"


def read_cohort(csv_path: Path | str, check_files: bool = True) -> list[Subject]:
    """Parse and check a cohort CSV (training and batch mode read it here): UTF-8 with or without a BOM,
    a `t1` column, unique subject ids (the id column, else the image's file name without its suffix). A
    missing column, an empty `t1`, a duplicate id or (with `check_files`) a missing file is an error
    naming the row; batch mode checks the files as it processes each subject instead."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise AtlasMorphError(f"{csv_path}: no such cohort file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "t1" not in fields:
                raise AtlasMorphError(f"{csv_path}: missing required column 't1' (columns: {', '.join(fields)})")
            rows = [{(k or "").strip(): _cell(v) for k, v in r.items()} for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise AtlasMorphError(f"{csv_path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise AtlasMorphError(f"{csv_path}: the cohort has no rows")
    id_col = next((c for c in ID_COLUMNS if c in fields), None)
    subjects, seen = [], set()
    for n, r in enumerate(rows, start=1):
        paths = {c: (csv_path.parent / r[c]) if r.get(c) else None for c in PATH_COLUMNS}
        sid = r[id_col] if id_col and r.get(id_col) else image_stem(r.get("t1") or f"row{n}")
        where = f"{csv_path}: row {n} ({sid})"
        if paths["t1"] is None:
            raise AtlasMorphError(f"{where}: empty 't1'")
        for c, p in paths.items():
            if check_files and p is not None and not p.is_file():
                raise AtlasMorphError(f"{where}: {c} file not found: {p}")
        if sid in seen:
            raise AtlasMorphError(f"{where}: duplicate subject id '{sid}'")
        seen.add(sid)
        attrs = {k: v for k, v in r.items() if k not in PATH_COLUMNS and k != id_col}
        subjects.append(Subject(n, sid, paths["t1"], paths["seg"], paths["mask"], attrs))
    return subjects


def _cell(v: object) -> str:
    """A CSV cell as a stripped string (extra cells of a too-long row arrive as a list)."""
    if isinstance(v, list):
        v = ",".join(v)
    return (v or "").strip()


def check_attribute_values(subjects: list[Subject], names: list[str]) -> None:
    """A column that is numeric in some rows but not in others is a typo, not a categorical attribute."""
    for name in names:
        values = [(s, s.attrs.get(name, "")) for s in subjects if s.attrs.get(name, "") != ""]
        bad = [(s, v) for s, v in values if not _is_number(v)]
        if bad and len(bad) < len(values) / 2:
            s, v = bad[0]
            raise AtlasMorphError(
                f"{s.where()}: {name} '{v}' is not a number (the other rows are numeric; {len(bad)} row(s) like this)"
            )


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def to_model_space(
    t1: Volume, mask: np.ndarray, reference: np.ndarray, grid: Grid = MODEL_GRID, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skull-strip, normalise and affinely align a T1: (brain in native space, T1 on grid, world map)."""
    brain = normalize(t1.data, mask)
    world = fit_affine(brain, t1.affine, reference, grid, threads=threads)
    return brain, resample(brain, t1.affine, grid, world=world), world


def prepare_subject(subject: Subject, reference: np.ndarray, grid: Grid = MODEL_GRID) -> dict[str, np.ndarray]:
    """One subject in model space: t1 (float16), labels (uint8 class indices, if any), world map."""
    where = subject.where()
    t1 = load_volume(subject.t1)
    seg = load_volume(subject.seg) if subject.seg else None
    mask = load_volume(subject.mask) if subject.mask else None
    brain_m = brain_mask(t1, mask if mask is not None else seg, where, image_name="T1",
                         mask_name="mask" if mask is not None else "seg")
    _, t1_grid, world = to_model_space(t1, brain_m, reference, grid, threads=1)
    out = {"t1": t1_grid.astype(np.float16), "world": world}
    if seg is not None:
        out["labels"] = resample_labels(to_index(seg.data), seg.affine, grid, world=world).astype(np.uint8)
    return out


def cache_key(subject: Subject, reference: np.ndarray) -> str:
    """Changes whenever an input file, the reference or the preparation code changes."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(hashlib.sha256(np.ascontiguousarray(reference, dtype=np.float32).tobytes()).digest())
    for p in (subject.t1, subject.seg, subject.mask):
        if p is not None:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_file(cache_dir: Path, subject: Subject) -> Path:
    """Where a subject's prepared arrays live: always directly in `cache_dir`, whatever its id (runs.cache_name)."""
    from .runs import cache_path

    return cache_path(cache_dir, subject.id)


def _is_cached(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return str(z["key"]) == key
    except Exception:
        return False


def _prepare_to_cache(subject: Subject, reference: np.ndarray, path: Path, key: str, grid: Grid) -> str | None:
    """Worker: prepare one subject and write its cache file atomically; returns an error or None."""
    import torch

    torch.set_num_threads(1)
    try:
        arrays = prepare_subject(subject, reference, grid)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.part.npz")
        np.savez(tmp, key=np.array(key), **arrays)
        os.replace(tmp, path)
        return None
    except AtlasMorphError as exc:  # name the row even when the message came from a file reader
        msg = str(exc)
        return msg if msg.startswith(subject.where()) else f"{subject.where()}: {msg}"
    except Exception as exc:  # report, keep the other subjects going
        return f"{subject.where()}: {type(exc).__name__}: {exc}"


def prepare_cohort(
    subjects: list[Subject], cache_dir: Path, reference: np.ndarray, workers: int = 2, quiet: bool = False,
    grid: Grid = MODEL_GRID,
) -> list[Path]:
    """Bring every subject into model space (in parallel, resuming from cached files); returns cache paths."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    keys = {s.id: cache_key(s, reference) for s in subjects}
    todo = [s for s in subjects if not _is_cached(cache_file(cache_dir, s), keys[s.id])]
    errors: list[str] = []
    if todo:
        with progress_bar(quiet) as bar, ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            task = bar.add_task(f"preparing {len(todo)} subjects", total=len(todo))
            futures = [
                pool.submit(_prepare_to_cache, s, reference, cache_file(cache_dir, s), keys[s.id], grid) for s in todo
            ]
            for fut in as_completed(futures):
                err = fut.result()
                if err:
                    errors.append(err)
                bar.advance(task)
    if errors:
        raise AtlasMorphError(
            f"{len(errors)} subject(s) failed (the others are cached; rerun to resume): " + "; ".join(sorted(errors))
        )
    return [cache_file(cache_dir, s) for s in subjects]


def load_prepared(paths: list[Path], grid: Grid = MODEL_GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack cached subjects: t1 (N,X,Y,Z) float32, labels (N,X,Y,Z) uint8 (zeros if absent), has-labels (N,)."""
    t1s, labs, has = [], [], []
    for p in paths:
        with np.load(p) as z:
            t1s.append(z["t1"].astype(np.float32))
            has.append("labels" in z.files)
            labs.append(z["labels"] if has[-1] else np.zeros(t1s[-1].shape, np.uint8))
    if not paths:
        return np.zeros((0, *grid.shape), np.float32), np.zeros((0, *grid.shape), np.uint8), np.zeros(0, bool)
    return np.stack(t1s), np.stack(labs), np.array(has)
