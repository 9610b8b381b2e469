"""Shared fixtures: the real shared data (skipped with a reason when absent) and small synthetic volumes."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from atlasmorph_cli.datadir import find_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = find_data_dir()
    if d is None or not (d / "ixi" / "subjects.csv").is_file():
        pytest.skip("real data not found: set ATLASMORPH_DATA or place the shared data at ../shared/data")
    return d


@pytest.fixture(scope="session")
def ixi_rows(data_dir) -> list[dict]:
    with open(data_dir / "ixi" / "subjects.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["age"]]


def psr_affine(origin=(-88.0, 118.0, -135.0), zoom: float = 2.0) -> np.ndarray:
    """An oblique-free PSR voxel-to-world affine like the IXI scans (i: P, j: S, k: R)."""
    a = np.zeros((4, 4))
    a[0, 2] = zoom  # k -> x (R)
    a[1, 0] = -zoom  # i -> -y (P)
    a[2, 1] = zoom  # j -> z (S)
    a[:3, 3] = origin
    a[3, 3] = 1
    return a
