"""`atlasmorph train --data BIDS_ROOT`: a BIDS dataset read as the training cohort (training.bids_cohort).

The dataset is made of phantoms (tests/synthetic.py): sub-01 with two sessions (ages from sessions.tsv),
sub-02 without a segmentation, sub-03 without an age, sub-04 without a T1w. Segmentations are in
derivatives/manual (beside an MNI-space dseg that must be ignored); derivatives/atlasmorph holds AtlasMorph's
own outputs, which auto-detection must pass over.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from atlasmorph_cli.bids import BidsSelection
from atlasmorph_cli.cli import app
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.io.volumes import save_volume
from atlasmorph_cli.training.bids_cohort import read_bids_cohort
from synthetic import phantom

IMAGES = {"sub-01_ses-1": 30.0, "sub-01_ses-2": 70.0, "sub-02": 50.0, "sub-03": 60.0}


def _tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


def _anat(root: Path, image_id: str) -> Path:
    """The anat folder of an image (made if missing): sub-01_ses-1 -> ROOT/sub-01/ses-1/anat."""
    folder = root.joinpath(*image_id.split("_"), "anat")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bids") / "raw"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "phantoms", "BIDSVersion": "1.10.0"}))
    _tsv(root / "participants.tsv", [["participant_id", "age", "sex"], ["sub-01", "n/a", "female"],
                                     ["sub-02", "50", "M"], ["sub-03", "n/a", "F"], ["sub-04", "40", "M"]])
    _tsv(root / "sub-01" / "sub-01_sessions.tsv", [["session_id", "age"], ["ses-1", "30"], ["ses-2", "70.5"]])
    manual = root / "derivatives" / "manual"
    ours = root / "derivatives" / "atlasmorph"
    (ours).mkdir(parents=True)
    (ours / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "AtlasMorph"}]}))
    for k, (image_id, age) in enumerate(IMAGES.items()):
        t1, seg, aff = phantom(age, shift=(2.0 * k, -k, 0.0))
        save_volume(t1, aff, _anat(root, image_id) / f"{image_id}_T1w.nii.gz")
        save_volume(seg, aff, _anat(ours, image_id) / f"{image_id}_desc-atlasmorph_dseg.nii.gz", dtype=np.int16)
        if image_id != "sub-02":
            save_volume(seg, aff, _anat(manual, image_id) / f"{image_id}_desc-aseg_dseg.nii.gz", dtype=np.int16)
    # another space's dseg (not the T1w's grid) and another image's entities: never taken
    (_anat(manual, "sub-01_ses-1") / "sub-01_ses-1_space-MNI152NLin2009cAsym_desc-aseg_dseg.nii.gz").write_bytes(b"")
    (_anat(manual, "sub-01_ses-1") / "sub-01_ses-1_run-2_desc-aseg_dseg.nii.gz").write_bytes(b"")
    (root / "sub-04" / "anat").mkdir(parents=True)  # no T1w
    return root


def test_bids_dataset_gives_the_cohort_csv_subjects(bids_root):
    subjects, warnings = read_bids_cohort(bids_root)
    assert [s.id for s in subjects] == list(IMAGES)
    assert [s.row for s in subjects] == [1, 2, 3, 4]
    assert [s.t1 for s in subjects] == [_anat(bids_root, i) / f"{i}_T1w.nii.gz" for i in IMAGES]
    manual = bids_root / "derivatives" / "manual"
    assert [s.seg for s in subjects] == [_anat(manual, "sub-01_ses-1") / "sub-01_ses-1_desc-aseg_dseg.nii.gz",
                                         _anat(manual, "sub-01_ses-2") / "sub-01_ses-2_desc-aseg_dseg.nii.gz",
                                         None, _anat(manual, "sub-03") / "sub-03_desc-aseg_dseg.nii.gz"]
    assert all(s.mask is None for s in subjects)
    # text, as a cohort CSV holds it; every column in every subject ('' = missing, left out by --attributes age)
    assert [s.attrs for s in subjects] == [{"age": "30", "sex": "F"}, {"age": "70.5", "sex": "F"},
                                           {"age": "50", "sex": "M"}, {"age": "", "sex": "F"}]
    assert warnings == [
        "1 subject(s) have no T1w image and are left out: sub-04",
        f"1 of 4 T1w image(s) have no segmentation in {manual} and train without labels (their brain mask is then "
        "the T1's non-zero voxels, so they must be brain-extracted): sub-02"]


def test_filters_and_the_choice_of_derivatives_folder(bids_root, tmp_path):
    subjects, _ = read_bids_cohort(bids_root, BidsSelection.from_options(["01"], ["2"], None))
    assert [s.id for s in subjects] == ["sub-01_ses-2"]
    subjects, warnings = read_bids_cohort(bids_root, seg_derivatives="none")
    assert all(s.seg is None for s in subjects) and not any("segmentation" in w for w in warnings)
    ours = bids_root / "derivatives" / "atlasmorph"
    subjects, _ = read_bids_cohort(bids_root, seg_derivatives=str(ours))  # a path: AtlasMorph's own, if asked
    assert subjects[2].seg.name == "sub-02_desc-atlasmorph_dseg.nii.gz"
    subjects, _ = read_bids_cohort(bids_root, seg_derivatives="atlasmorph")  # a name under derivatives/
    assert subjects[0].seg.parent.is_relative_to(ours)
    with pytest.raises(AtlasMorphError, match=r"^--seg-derivatives fs: neither a folder under .*derivatives nor"):
        read_bids_cohort(bids_root, seg_derivatives="fs")

    import shutil

    copy = tmp_path / "raw"
    shutil.copytree(bids_root, copy, symlinks=True)
    shutil.copytree(copy / "derivatives" / "manual", copy / "derivatives" / "freesurfer")
    with pytest.raises(AtlasMorphError, match=r"2 derivatives folders hold segmentations of these T1w images "
                                              r"\(freesurfer, manual\); choose one with --seg-derivatives NAME$"):
        read_bids_cohort(copy)
    shutil.rmtree(copy / "derivatives")
    with pytest.raises(AtlasMorphError, match=r"no folder under derivatives/ holds segmentations .* or give "
                                              r"--seg-derivatives none to train without labels$"):
        read_bids_cohort(copy)
    second = _anat(copy / "derivatives" / "manual", "sub-02")
    for name in ("sub-02_desc-aseg_dseg.nii.gz", "sub-02_desc-tissue_dseg.nii"):
        (second / name).write_bytes(b"")
    with pytest.raises(AtlasMorphError, match=r"^sub-02/anat/sub-02_T1w.nii.gz: 2 segmentations in .*manual "
                                              r"\(sub-02_desc-aseg_dseg.nii.gz, sub-02_desc-tissue_dseg.nii\)"):
        read_bids_cohort(copy, seg_derivatives="manual")


def test_train_command_on_a_bids_dataset(bids_root, tmp_path):
    """Two steps of `atlasmorph train --data BIDS_ROOT` on the model grid (~15 s): the filter applies, the
    split names BIDS images, the image without a segmentation is reported and trains without labels."""
    t1, _, aff = phantom(50.0)
    save_volume(t1, aff, tmp_path / "brain.nii.gz")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(bids_root), "--out", str(out), "--steps", "2",
                                   "--val-fraction", "0", "--reference", str(tmp_path / "brain.nii.gz"),
                                   "--threads", "1", "--workers", "1", "--quiet", "--no-augment",
                                   "--participant-label", "01,02"])
    assert res.exit_code == 0, res.output
    assert "have no segmentation in" in res.output and res.output.count("warning:") == 2  # + no validation
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02"] and split["validation"] == []
    assert (out / "model.safetensors").is_file()


def test_train_command_options(bids_root, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "a folder, but not a BIDS dataset" in str(res.exception)
    csv = tmp_path / "c.csv"
    csv.write_text("t1,age\nx.nii.gz,3\n")
    res = runner.invoke(app, ["train", "--data", str(csv), "--out", str(tmp_path / "o"), "--seg-derivatives", "fs"])
    assert res.exit_code == 1 and "are for a BIDS dataset" in str(res.exception)
    t1, _, aff = phantom(50.0)
    save_volume(t1, aff, tmp_path / "brain.nii.gz")
    res = runner.invoke(app, ["train", "--data", str(bids_root), "--out", str(tmp_path / "o"),
                              "--participant-label", "09", "--reference", str(tmp_path / "brain.nii.gz")])
    assert res.exit_code == 1 and "--participant-label: no folder sub-09" in str(res.exception)


# ----------------------------------------------------------------------------------------- build
from test_bids_cli import ixi_bids  # noqa: E402,F401  (real IXI scans: sub-A with two sessions, sub-B)


def test_build_from_a_bids_dataset(ixi_bids, data_dir, tmp_path):
    """`atlasmorph build BIDS_ROOT --participant-label A --seg-derivatives dlmuse`: the two sessions of sub-A,
    one iteration; their DLMUSE segmentations (linked as dseg) are averaged; warps are named per image."""
    root, rows = ixi_bids
    deriv = tmp_path / "dlmuse"
    for ses in ("1", "2"):
        anat = deriv / "sub-A" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-A_ses-{ses}_desc-dlmuse_dseg.nii.gz").symlink_to(data_dir / "ixi" / rows["A"]["seg"])
    res = CliRunner().invoke(app, ["build", str(root), "-o", str(tmp_path / "tpl.nii.gz"), "--labels",
                                   str(tmp_path / "lab.nii.gz"), "--iterations", "1", "--refine", "0",
                                   "--skullstripped", "--participant-label", "A", "--seg-derivatives", str(deriv),
                                   "--warps-dir", str(tmp_path / "warps"), "--report", str(tmp_path / "rep.json"),
                                   "--threads", "1", "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["subjects"] == rep["used"] == 2 and rep["labels"] == "averaged subject segmentations"
    assert sorted(p.name for p in (tmp_path / "warps").iterdir()) == [
        f"sub-A_ses-{s}_from-T1w_to-template_mode-image_xfm.nii.gz" for s in ("1", "2")]
    res = CliRunner().invoke(app, ["build", str(tmp_path / "warps"), "-o", str(tmp_path / "t2.nii.gz"),
                                   "--session-label", "1"])
    assert res.exit_code == 1 and "are for a BIDS dataset" in str(res.exception)
