"""The structure-volumes table of `segment` (--vol; batch: volumes.csv): its columns, rows, writer and reader."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..inference.quality import CSV_COLUMNS, Quality
from ..io.volumes import atomic_path
from ..labels import STRUCTURES

VOLUME_HEADER = ["subject", "total_brain", *[s.name for s in STRUCTURES], *CSV_COLUMNS]


def volume_cells(sums: np.ndarray, voxel_mm3: float, quality: Quality | None = None) -> list[str]:
    """A volumes-table row after the subject column: total, the 34 structures (mm3), the quality columns."""
    v = sums[1:] * voxel_mm3
    return [f"{v.sum():.1f}", *[f"{x:.1f}" for x in v], *(quality.csv_cells() if quality else [""] * len(CSV_COLUMNS))]


def write_volumes(path: Path, rows: list[tuple[str, np.ndarray]], voxel_mm3: list[float]) -> None:
    """Structure volumes (mm3) as CSV, one row per subject, in the 34-structure order, then the subject's
    quality (qc_score, qc_flagged 0/1, qc_reasons). A row given as a list of cells is written as it is."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(VOLUME_HEADER)
        for (sid, sums), vox in zip(rows, voxel_mm3):
            if isinstance(sums, list):  # cells made already, or a row of an earlier run's table (--skip-existing)
                w.writerow([sid, *sums, *[""] * (len(VOLUME_HEADER) - 1 - len(sums))])
                continue
            w.writerow([sid, *volume_cells(sums, vox)])


def read_volume_rows(vol: Path) -> dict[str, list[str]]:
    """subject -> the rest of its row (total and structures, as written) of an existing volumes table."""
    if not vol.is_file():
        return {}
    try:
        with open(vol, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not rows or rows[0][:1] != ["subject"]:
        return {}
    width = len(rows[0])
    return {r[0]: r[1:] for r in rows[1:] if len(r) == width}
