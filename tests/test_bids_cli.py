"""BIDS datasets on the command line: segment/register BIDS_ROOT --out-dir, and atlasmorph bids ROOT OUT participant.

The dataset is made of real IXI scans (skull-stripped with their own DLMUSE seg, so no extraction runs):
sub-A with two sessions (ages from sessions.tsv), sub-B with no age and an unknown sex spelling (the
population-average template), sub-C without T1w. Outputs are checked against the BIDS-derivatives names
(test_bids.DERIVATIVE_NAME), the sidecars, dataset_description.json and the one volumes.tsv.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from atlasmorph_cli.cli import app
from atlasmorph_cli.labels import FS_IDS, STRUCTURES
from test_bids import DERIVATIVE_NAME

runner = CliRunner()
FAST = ("--threads", "1", "--refine", "0", "--skullstripped")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


def _toy_dataset(root: Path) -> Path:
    """A BIDS dataset with empty images: enough for everything that happens before a model is loaded."""
    _write_tsv(root / "participants.tsv", [["participant_id", "age"], ["sub-01", "40"]])
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.10.0"}))
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def ixi_bids(tmp_path_factory, data_dir, ixi_rows) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bids") / "raw"
    rows = ixi_rows[:2]
    (root).mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "IXI pair", "BIDSVersion": "1.10.0"}))
    _write_tsv(root / "participants.tsv", [["participant_id", "age", "sex"],
                                           ["sub-A", rows[0]["age"], {"M": "male", "F": "female"}[rows[0]["sex"]]],
                                           ["sub-B", "n/a", "other"], ["sub-C", "50", "F"]])
    _write_tsv(root / "sub-A" / "sub-A_sessions.tsv", [["session_id", "age"], ["ses-1", "40"], ["ses-2", "41.5"]])

    def brain(row, path: Path) -> None:
        t1 = nib.load(str(data_dir / "ixi" / row["t1"]))
        seg = np.asarray(nib.load(str(data_dir / "ixi" / row["seg"])).dataobj)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32) * (seg > 0), t1.affine, t1.header),
                 str(path))

    for ses in ("1", "2"):
        brain(rows[0], root / "sub-A" / f"ses-{ses}" / "anat" / f"sub-A_ses-{ses}_T1w.nii.gz")
    brain(rows[1], root / "sub-B" / "anat" / "sub-B_T1w.nii.gz")
    (root / "sub-C" / "anat").mkdir(parents=True)
    (root / "sub-C" / "anat" / "sub-C_T2w.nii.gz").write_bytes(b"")  # no T1w
    return root, {"A": rows[0], "B": rows[1]}


def _check_derivatives(out: Path, model: Path) -> dict:
    """Every file of a derivatives folder is named after the templates and every image has its sidecar."""
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["DatasetLinks"]["raw"]
    (gen,) = desc["GeneratedBy"]
    assert gen["Name"] == "AtlasMorph" and gen["ModelName"] == model.name.removesuffix(".safetensors")
    assert gen["ModelSHA256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    for p in out.rglob("*"):
        if p.is_dir() or p.parent == out:
            continue
        assert DERIVATIVE_NAME.match(p.name), p
        if p.name.endswith((".nii.gz", ".txt")):
            side = json.loads(p.with_name(p.name.split(".")[0] + ".json").read_text())
            assert side["ModelSHA256"] == gen["ModelSHA256"] and side["Sources"][0].startswith("bids:raw:sub-")
    assert not [p for p in out.rglob("*.part*")]
    return desc


# ----------------------------------------------------------------------------------------- no compute
def test_bids_options_and_forms_are_checked(tmp_path):
    root = _toy_dataset(tmp_path / "raw")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"")
    r = invoke("segment", folder, "--out-dir", tmp_path / "o", "--participant-label", "01")
    assert r.exit_code != 0 and "are for a BIDS dataset" in str(r.exception)
    r = invoke("segment", root, "--out-dir", root)
    assert r.exit_code != 0 and "this is the BIDS dataset itself" in str(r.exception)
    r = invoke("segment", root, "--out-dir", tmp_path / "d", "--vol", tmp_path / "v.csv")
    assert r.exit_code != 0 and "--vol: not used with a BIDS dataset" in str(r.exception)
    r = invoke("segment", root, "--out-dir", tmp_path / "d", "--participant-label", "02")
    assert r.exit_code != 0 and "no folder sub-02" in str(r.exception)
    r = invoke("segment", root, "--out-dir", tmp_path / "d", "--bids-filter", "acq")
    assert r.exit_code != 0 and "ENTITY=VALUE" in str(r.exception)
    r = invoke("bids", folder, tmp_path / "d", "participant")
    assert r.exit_code != 0 and "not a BIDS dataset (no dataset_description.json)" in str(r.exception)
    r = invoke("bids", root, tmp_path / "d", "everything")
    assert r.exit_code == 2 and "participant or group" in r.output
    r = invoke("bids", root, tmp_path / "d", "group")
    assert r.exit_code != 0 and "run the participant level first" in str(r.exception)
    r = invoke("segment", tmp_path / "one.nii.gz", "-o", tmp_path / "s.nii.gz", "--session-label", "1")
    assert r.exit_code != 0 and "for a BIDS dataset" in str(r.exception)


# ----------------------------------------------------------------------------------------- runs
def test_segment_bids_dataset_then_bids_app_form(tmp_path, ixi_bids, mni_model):
    root, rows = ixi_bids
    out = tmp_path / "derivatives" / "atlasmorph"
    r = invoke("segment", root, "--out-dir", out, "--participant-label", "A", "--outputs", "dseg,probseg,warp",
               "--model", mni_model, *FAST)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "1 subject(s) have no T1w image" not in r.output  # sub-C was not selected
    anat = {s: out / "sub-A" / f"ses-{s}" / "anat" for s in ("1", "2")}
    assert sorted(p.name for p in anat["1"].iterdir()) == sorted(
        f"sub-A_ses-1_{x}" for x in ("desc-atlasmorph_dseg.nii.gz", "desc-atlasmorph_dseg.json",
                                     "desc-atlasmorph_probseg.nii.gz", "desc-atlasmorph_probseg.json",
                                     "from-T1w_to-template_mode-image_xfm.nii.gz",
                                     "from-T1w_to-template_mode-image_xfm.json", "desc-atlasmorph_qc.json"))
    src = nib.load(str(root / "sub-A" / "ses-1" / "anat" / "sub-A_ses-1_T1w.nii.gz"))
    seg = nib.load(str(anat["1"] / "sub-A_ses-1_desc-atlasmorph_dseg.nii.gz"))
    assert seg.shape == src.shape and set(np.unique(np.asarray(seg.dataobj))) <= {0, *FS_IDS}
    side = json.loads((anat["2"] / "sub-A_ses-2_desc-atlasmorph_dseg.json").read_text())
    assert side["Attributes"] == {"age": 41.5, "sex": rows["A"]["sex"]}  # the session's age, the participant's sex
    assert side["SpatialReference"] == "bids:raw:sub-A/ses-2/anat/sub-A_ses-2_T1w.nii.gz"
    assert set(side["Quality"]) == {"Score", "Flagged", "Reasons"} and side["Manual"] is False
    probs = json.loads((anat["1"] / "sub-A_ses-1_desc-atlasmorph_probseg.json").read_text())
    assert len(probs["LabelMap"]) == 35
    warp = json.loads((anat["1"] / "sub-A_ses-1_from-T1w_to-template_mode-image_xfm.json").read_text())
    assert "SpatialReference" in warp and warp["Attributes"]["age"] == 40.0
    desc = _check_derivatives(out, mni_model)
    assert (out / desc["DatasetLinks"]["raw"]).resolve() == root.resolve()
    table = _tsv(out / "volumes.tsv")
    assert [(t["participant_id"], t["session_id"]) for t in table] == [("sub-A", "ses-1"), ("sub-A", "ses-2")]
    assert all(float(t["total_brain"]) > 5e5 for t in table)
    assert list(table[0])[2:4] == ["total_brain", STRUCTURES[0].name]
    assert json.loads((out / "volumes.json").read_text())["total_brain"]["Units"] == "mm^3"
    assert not (out / "volumes.csv").exists()

    # the BIDS-App form adds sub-B (no age, sex 'other': the population-average template) to the same table
    r = invoke("bids", root, out, "participant", "--participant-label", "sub-B", "--model", mni_model, *FAST)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "sex 'other' is not one of M/F" in r.output and "population-average template" in r.output
    side = json.loads((out / "sub-B" / "anat" / "sub-B_desc-atlasmorph_dseg.json").read_text())
    assert side["Attributes"] is None
    table = _tsv(out / "volumes.tsv")
    assert [(t["participant_id"], t["session_id"]) for t in table] == [
        ("sub-A", "ses-1"), ("sub-A", "ses-2"), ("sub-B", "n/a")]
    _check_derivatives(out, mni_model)

    r = invoke("bids", root, out, "group")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "3 images of 2 participants, all present" in r.output
    # a rerun with --skip-existing does nothing and keeps every row
    before = (out / "volumes.tsv").read_text()
    r = invoke("segment", root, "--out-dir", out, "--model", mni_model, "--skip-existing", *FAST)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "3 subject(s) already done, 0 to do" in r.output and "sub-C" in r.output
    assert (out / "volumes.tsv").read_text() == before


def test_register_bids_dataset(tmp_path, ixi_bids, mni_model):
    root, _ = ixi_bids
    out = tmp_path / "reg"
    r = invoke("register", root, "--out-dir", out, "--participant-label", "A", "--session-label", "2",
               "--outputs", "moved,affine,labels,qc", "--model", mni_model, *FAST)
    assert r.exit_code == 0, (r.output, r.exception)
    anat = out / "sub-A" / "ses-2" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == sorted(
        f"sub-A_ses-2_{x}" for x in ("space-template_T1w.nii.gz", "space-template_T1w.json",
                                     "from-T1w_to-template_mode-image_desc-affine_xfm.txt",
                                     "from-T1w_to-template_mode-image_desc-affine_xfm.json",
                                     "desc-atlasmorph_dseg.nii.gz", "desc-atlasmorph_dseg.json",
                                     "desc-atlasmorph_qc.json"))
    moved = json.loads((anat / "sub-A_ses-2_space-template_T1w.json").read_text())
    assert "SpatialReference" not in moved and moved["SkullStripped"] is True
    figure = out / "sub-A" / "ses-2" / "figures" / "sub-A_ses-2_desc-atlasmorph_qc.png"
    assert figure.is_file() and "sub-A/ses-2/figures/sub-A_ses-2_desc-atlasmorph_qc.png" in (
        out / "qc_index.html").read_text()
    assert not (out / "volumes.tsv").exists()
    _check_derivatives(out, mni_model)
