"""Cohort CSV parsing (errors name the row) and preparation of real subjects into the model space."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atlasmorph_cli.training.cohort import load_prepared, prepare_cohort, read_cohort
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.training.metrics import mean_dice
from atlasmorph_cli.geometry.space import MODEL_GRID


def test_brain_mask_one_check_for_training_and_registration():
    """geometry.intensity.brain_mask: mask > 0, else the non-zero voxels (negative ones too); each refusal
    names the caller's file and what it calls the two images."""
    from atlasmorph_cli.geometry.intensity import brain_mask
    from atlasmorph_cli.io.volumes import Volume

    t1 = np.zeros((16, 16, 16), np.float32)
    t1[2:14, 2:14, 2:14] = np.linspace(-1, 2, 12 ** 3).reshape(12, 12, 12)  # a brain-extracted image, some < 0
    assert brain_mask(Volume(t1, np.eye(4)), None).sum() == 12 ** 3
    seg = Volume((t1 > -0.5).astype(np.float32), np.eye(4))
    np.testing.assert_array_equal(brain_mask(Volume(t1, np.eye(4)), seg, "s1"), t1 > -0.5)
    shifted = np.eye(4)
    shifted[:3, 3] = 1.0
    cases = [(Volume(t1, np.eye(4)), Volume(seg.data, shifted), "s1: the seg is on another grid than the T1 "
              r"\(voxel-to-world affine: origin \(1, 1, 1\) vs \(0, 0, 0\) mm\); resample it to the T1 first"),
             (Volume(0 * t1, np.eye(4)), None, "s1: the T1 is all zeros"),
             (Volume(t1, np.eye(4)), Volume(np.pad(np.ones((9, 9, 9)), ((0, 7),) * 3), np.eye(4)),
              r"s1: the T1 \(or its seg\) has no brain: fewer than 1000 non-zero voxels"),
             (Volume(np.full_like(t1, 3.0), np.eye(4)), seg, "s1: the T1 is constant inside the brain")]
    for image, mask, message in cases:
        with pytest.raises(AtlasMorphError, match=f"^{message}$"):
            brain_mask(image, mask, "s1", image_name="T1", mask_name="seg")


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


def test_split_keeps_a_participants_sessions_together():
    """Sessions of one participant (BIDS) never straddle train and validation; a CSV cohort splits by id."""
    from pathlib import Path

    from atlasmorph_cli.training.cohort import Subject
    from atlasmorph_cli.training.split import split_subjects

    subs = [Subject(i, f"sub-{p:02d}_ses-{k}", Path(f"/x/{p}_{k}.nii"), None, None, {}, participant=f"{p:02d}")
            for i, (p, k) in enumerate(((p, k) for p in range(10) for k in (1, 2)), start=1)]
    for seed in range(5):
        train, val = split_subjects(subs, 0.3, seed)
        assert len(val) == 6  # 3 of 10 participants, 2 sessions each
        assert not {s.participant for s in train} & {s.participant for s in val}
    flat = [Subject(i, f"s{i}", Path(f"/x/{i}.nii"), None, None, {}) for i in range(20)]
    train, val = split_subjects(flat, 0.3, 0)
    assert len(val) == 6 and not {s.id for s in train} & {s.id for s in val}


def test_reference_mni152_keeps_the_scratch_reference_when_fine_tuning(data_dir, monkeypatch, tmp_path):
    """`--init M --reference mni152` prepares subjects against the MNI152 brain (as a run from scratch does),
    not against M's template: M is not even read."""
    import numpy as np

    from atlasmorph_cli.training.reference import mni_reference, training_reference

    monkeypatch.setenv("ATLASMORPH_DATA", str(data_dir))
    ref = training_reference(Path("mni152"), init=tmp_path / "no-such-model.safetensors")
    np.testing.assert_array_equal(ref, mni_reference(data_dir)[0])
