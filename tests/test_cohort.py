"""Cohort CSV parsing (errors name the row) and preparation of real subjects into the model space."""
from __future__ import annotations

import numpy as np
import pytest

from atlasmorph_cli.training.cohort import load_prepared, prepare_cohort, read_cohort
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.training.metrics import mean_dice
from atlasmorph_cli.geometry.space import MODEL_GRID


def test_missing_column_and_missing_file_are_named(tmp_path):
    (tmp_path / "a.csv").write_text("image,age\nx.nii.gz,30\n")
    with pytest.raises(AtlasMorphError, match="missing required column 't1'"):
        read_cohort(tmp_path / "a.csv")
    (tmp_path / "ok.nii.gz").write_bytes(b"")
    (tmp_path / "b.csv").write_text("subject,t1,age\ns1,ok.nii.gz,30\ns2,gone.nii.gz,40\n")
    with pytest.raises(AtlasMorphError, match=r"row 2 \(s2\): t1 file not found"):
        read_cohort(tmp_path / "b.csv")


def test_paths_are_relative_to_the_csv(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.nii.gz").write_bytes(b"")
    (tmp_path / "c.csv").write_text("t1,age,sex\nsub/x.nii.gz,30,F\n")
    (s,) = read_cohort(tmp_path / "c.csv")
    assert s.t1 == tmp_path / "sub" / "x.nii.gz" and s.id == "x" and s.attrs == {"age": "30", "sex": "F"}


def test_prepare_real_subjects(tmp_path, data_dir, ixi_rows):
    from atlasmorph_cli.training.reference import mni_reference

    ref, mni_labels = mni_reference(data_dir)
    csv_path = tmp_path / "cohort.csv"
    lines = ["subject,t1,seg,age,sex"] + [
        f"{r['subject']},{data_dir / 'ixi' / r['t1']},{data_dir / 'ixi' / r['seg']},{r['age']},{r['sex']}"
        for r in ixi_rows[:2]
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    subjects = read_cohort(csv_path)
    paths = prepare_cohort(subjects, tmp_path / "cache", ref, workers=2, quiet=True)
    t1, lab, has = load_prepared(paths)
    assert t1.shape == (2, *MODEL_GRID.shape) and has.all()
    assert 0 <= t1.min() and t1.max() <= 1
    for i in range(2):  # affinely aligned labels overlap the MNI labels
        assert mean_dice(lab[i], mni_labels) > 0.55
    mtimes = [p.stat().st_mtime_ns for p in paths]
    prepare_cohort(subjects, tmp_path / "cache", ref, workers=2, quiet=True)  # resume: nothing redone
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
