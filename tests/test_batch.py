"""Batch mode of register/segment: folder, .txt list and cohort CSV inputs, BIDS-style names, failures."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from atlasmorph_cli.cli.batch import bids_label, parse_outputs, read_batch_input
from atlasmorph_cli.cli import app
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.labels import FS_IDS
from atlasmorph_cli.geometry.space import MODEL_GRID

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def brains(tmp_path_factory, data_dir, ixi_rows) -> tuple[Path, list[dict]]:
    """Two brain-extracted real IXI T1s (seg > 0) in one folder, named <subject>_T1w.nii.gz."""
    folder = tmp_path_factory.mktemp("brains")
    rows = ixi_rows[:2]
    for r in rows:
        t1 = nib.load(str(data_dir / "ixi" / r["t1"]))
        seg = np.asarray(nib.load(str(data_dir / "ixi" / r["seg"])).dataobj)
        brain = np.asarray(t1.dataobj, dtype=np.float32) * (seg > 0)
        nib.save(nib.Nifti1Image(brain, t1.affine, t1.header), str(folder / f"{r['subject']}_T1w.nii.gz"))
    return folder, rows


# ----------------------------------------------------------------------------------------- inputs (no compute)
def test_reading_folder_list_and_csv(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("b.nii.gz", "a.mgz", "c.nii", ".hidden.nii.gz", "notes.txt"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    assert [s.t1.name for s in read_batch_input(tmp_path / "imgs")] == ["a.mgz", "b.nii.gz", "c.nii"]

    (tmp_path / "list.txt").write_text("# cohort\nimgs/a.mgz\n\n  /abs/sub-07_ses-1_T1w.nii.gz \n")
    subs = read_batch_input(tmp_path / "list.txt")
    assert [s.t1 for s in subs] == [tmp_path / "imgs" / "a.mgz", Path("/abs/sub-07_ses-1_T1w.nii.gz")]
    assert [s.label for s in subs] == ["a", "07"]

    (tmp_path / "c.csv").write_text("participant_id,t1,seg,mask,age,sex\n"
                                    "IXI012-HH-1211,x.nii.gz,x_seg.nii.gz,,38.8,M\n"
                                    "s2,y.nii.gz,y_seg.nii.gz,y_mask.nii.gz,,\n")
    a, b = read_batch_input(tmp_path / "c.csv")
    assert (a.id, a.label, a.t1, a.mask) == ("IXI012-HH-1211", "IXI012HH1211", tmp_path / "x.nii.gz",
                                             tmp_path / "x_seg.nii.gz")
    assert a.attrs == {"age": "38.8", "sex": "M"} and b.attrs == {"age": None, "sex": None}
    assert b.mask == tmp_path / "y_mask.nii.gz"  # an explicit mask wins over seg


def test_reading_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasMorphError, match="no .nii"):
        read_batch_input(tmp_path / "empty")
    (tmp_path / "dup.txt").write_text("a/s-1.nii.gz\nb/s1.nii.gz\n")
    with pytest.raises(AtlasMorphError, match="both be sub-s1"):
        read_batch_input(tmp_path / "dup.txt")
    (tmp_path / "nocol.csv").write_text("image,age\nx.nii.gz,3\n")
    with pytest.raises(AtlasMorphError, match="missing required column 't1'"):
        read_batch_input(tmp_path / "nocol.csv")
    with pytest.raises(AtlasMorphError, match="unknown output 'warps'"):
        parse_outputs("register", "moved,warps")
    assert parse_outputs("segment", "probseg") == ["dseg", "probseg"]
    assert bids_label("sub-01_T1w") == "01" and bids_label("IXI002-Guys-0828_T1") == "IXI002Guys0828T1"


def test_batch_and_single_options_do_not_mix(tmp_path, brains):
    folder, _ = brains
    img = next(folder.iterdir())
    r = invoke("segment", img, "-o", tmp_path / "s.nii.gz", "--out-dir", tmp_path / "o")
    assert r.exit_code != 0 and "for a batch input" in str(r.exception)
    r = invoke("register", folder, "--out-dir", tmp_path / "o", "-t", tmp_path / "w.nii.gz")
    assert r.exit_code != 0 and "-t: not used with a batch input" in str(r.exception)
    r = invoke("segment", folder)
    assert r.exit_code != 0 and "needs --out-dir" in str(r.exception)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------- runs
def test_folder_segment_writes_dseg_and_cohort_volumes(tmp_path, brains, mni_model):
    folder, rows = brains
    out = tmp_path / "deriv"
    r = invoke("segment", folder, "--out-dir", out, "--age", 50, "--sex", "F",
               "--model", mni_model, "--threads", 1)
    assert r.exit_code == 0, (r.output, r.exception)
    for row in rows:
        label = row["subject"].replace("-", "") + "T1w"
        src = nib.load(str(folder / f"{row['subject']}_T1w.nii.gz"))
        seg = nib.load(str(out / f"sub-{label}_desc-atlasmorph_dseg.nii.gz"))
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, *FS_IDS}
    with open(out / "volumes.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["subject"] for t in table] == [f"{row['subject']}_T1w" for row in rows]
    assert all(float(t["total_brain"]) > 5e5 and float(t["Left-Hippocampus"]) > 0 for t in table)


def test_list_register_writes_bids_names(tmp_path, brains, mni_model):
    folder, rows = brains
    lst = tmp_path / "lists" / "cohort.txt"
    lst.parent.mkdir()
    img = folder / f"{rows[0]['subject']}_T1w.nii.gz"
    lst.write_text(f"# one subject\n{os.path.relpath(img, lst.parent)}\n")
    out = tmp_path / "reg"
    r = invoke("register", lst, "--out-dir", out, "--outputs", "moved,warp,inverse,labels", "--age",
               rows[0]["age"], "--sex", rows[0]["sex"], "--model", mni_model, "--threads", 1)
    assert r.exit_code == 0, (r.output, r.exception)
    label = rows[0]["subject"].replace("-", "") + "T1w"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"sub-{label}_{s}" for s in (
        "space-template_T1w.nii.gz", "from-T1w_to-template_mode-image_xfm.nii.gz",
        "from-template_to-T1w_mode-image_xfm.nii.gz", "desc-atlasmorph_dseg.nii.gz",
        "desc-atlasmorph_qc.json"))  # the quality check's JSON is always written
    moved = nib.load(str(out / f"sub-{label}_space-template_T1w.nii.gz"))
    np.testing.assert_allclose(moved.affine, MODEL_GRID.affine)
    warp = nib.load(str(out / f"sub-{label}_from-T1w_to-template_mode-image_xfm.nii.gz"))
    assert warp.shape == (*MODEL_GRID.shape, 1, 3) and int(warp.header["intent_code"]) == 1006


def test_csv_with_a_bad_subject_continues_and_fails_at_the_end(tmp_path, data_dir, ixi_rows, mni_model):
    """Whole-head T1 + DLMUSE seg as the mask (paths relative to the CSV); one corrupt image."""
    good = ixi_rows[2]
    (tmp_path / "broken_T1.nii.gz").write_bytes(b"not an image")
    ixi = os.path.relpath(data_dir / "ixi", tmp_path)
    with open(tmp_path / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "t1", "seg", "age", "sex", "site"])
        w.writerow(["broken-1", "broken_T1.nii.gz", "", "40", "F", "HH"])
        w.writerow([good["subject"], f"{ixi}/{good['t1']}", f"{ixi}/{good['seg']}", good["age"], good["sex"], "HH"])
    out = tmp_path / "seg"
    p = subprocess.run([sys.executable, "-m", "atlasmorph_cli", "segment", str(tmp_path / "cohort.csv"),
                        "--out-dir", str(out), "--outputs", "dseg,probseg", "--model", str(mni_model), "--threads", "1"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("atlasmorph: error:")]
    assert len(errors) == 2 and "sub-broken1" in errors[0] and "not a readable image" in errors[0]
    assert "1 of 2 subjects failed (sub-broken1)" in errors[1] and "Traceback" not in p.stderr
    label = good["subject"].replace("-", "")
    assert sorted(x.name for x in out.iterdir()) == [f"sub-{label}_desc-atlasmorph_dseg.nii.gz",
                                                     f"sub-{label}_desc-atlasmorph_probseg.nii.gz",
                                                     f"sub-{label}_desc-atlasmorph_qc.json", "volumes.csv"]
    src = nib.load(str(data_dir / "ixi" / good["t1"]))
    probs = nib.load(str(out / f"sub-{label}_desc-atlasmorph_probseg.nii.gz"))
    assert probs.shape == (*src.shape, 35) and np.allclose(probs.affine, src.affine, atol=1e-4)
    with open(out / "volumes.csv", newline="") as fh:
        assert [t["subject"] for t in csv.DictReader(fh)] == [good["subject"]]
