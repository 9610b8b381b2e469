"""The 34-structure label table and the MUSE -> FreeSurfer mapping."""
from __future__ import annotations

import numpy as np

from atlasmorph_cli import labels


def test_table_has_34_unique_structures_with_freesurfer_ids():
    assert len(labels.STRUCTURES) == 34 and labels.N_CLASSES == 35
    assert len(set(labels.FS_IDS)) == 34
    muse = [m for s in labels.STRUCTURES for m in s.muse_ids]
    assert len(muse) == len(set(muse)), "a MUSE id is mapped twice"
    assert labels.NAMES[17] == "Left-Hippocampus" and labels.NAMES[53] == "Right-Hippocampus"


def test_muse_and_freesurfer_maps():
    muse = np.array([0, 48, 47, 52, 51, 101, 100, 82, 81, 95, 71, 46, 600])
    idx = labels.to_index(muse, "muse")
    fs = labels.to_freesurfer(idx)
    np.testing.assert_array_equal(fs, [0, 17, 53, 4, 43, 3, 42, 2, 41, 192, 172, 0, 0])
    assert labels.looks_like_muse(muse)
    np.testing.assert_array_equal(labels.to_freesurfer(labels.to_index(fs, "auto")), fs)
    assert not labels.looks_like_muse(fs)


def test_lut_file(tmp_path):
    labels.write_lut(tmp_path / "lut.txt")
    lines = (tmp_path / "lut.txt").read_text().splitlines()
    assert len(lines) == 35 and lines[1].split("\t")[:2] == ["2", "Left-Cerebral-White-Matter"]
