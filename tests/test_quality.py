"""The quality check: its pieces on known answers, every broken input of tests/broken_inputs.py flagged (or
refused), a real validation subject not flagged, and how a flag reaches the user (warning, JSON, volumes
CSV, --strict exit code 3). Also the inputs of issue 18's "silent nonsense" that are refused outright:
NaN model weights and complex-valued images."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.io.volumes import Volume, load_volume
from atlasmorph_cli.inference.quality import SCORE_MIN, Quality, _local_ncc, affine_geometry

from broken_inputs import BROKEN, PASSING


# ------------------------------------------------------------------------------------------ pieces
def test_affine_geometry_known_answers():
    assert affine_geometry(np.eye(4)) == pytest.approx((1.0, 1.0, 0.0, False))
    a = np.eye(4)
    a[:3, :3] = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]) @ np.diag([0.9, 1.1, 1.0])
    smin, smax, angle, refl = affine_geometry(a)
    assert (smin, smax, angle, refl) == pytest.approx((0.9, 1.1, 90.0, False))
    assert affine_geometry(np.diag([1.0, -1.0, 1.0, 1.0]))[3]  # a mirror image


def test_local_ncc_is_one_for_the_same_image_and_minus_one_inverted():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    assert float(_local_ncc(x, 2 * x + 1)[5:15, 5:15, 5:15].mean()) == pytest.approx(1.0, abs=1e-3)
    assert float(_local_ncc(x, -x)[5:15, 5:15, 5:15].mean()) == pytest.approx(-1.0, abs=1e-3)


def test_quality_reporting_cells_and_json():
    q = Quality("s", math.nan, math.nan, 0.1, 1.0, 1.0, 0.0, False, "mask", reasons=["x"])
    assert q.flagged and q.csv_cells() == ["nan", "1", "x"]
    assert json.loads(json.dumps(q.to_dict()))["score"] is None
    assert "s: failed the quality check (x)" in q.warning()


# ------------------------------------------------------------------------------------------ real cases
@pytest.fixture(scope="module")
def shipped():
    from atlasmorph_cli.model.shipped import load

    return load(None, 1)[1]


@pytest.fixture(scope="module")
def validation_subject(data_dir):
    """A validation subject of the shipped model (not trained on): its whole-head T1, labels, attributes."""
    root = Path(__file__).resolve().parent.parent
    sid = json.loads((root / "docs" / "benchmarks" / "atlasmorph-ixi-2mm-v1_split.json").read_text())["validation"][1]
    with open(data_dir / "ixi" / "subjects.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["subject"] == sid)
    t1 = load_volume(data_dir / "ixi" / row["t1"])
    seg = load_volume(data_dir / "ixi" / row["seg"]).data.astype(np.int32)
    return t1, seg, row


def _run(model, row, subj: Volume, mask: Volume | None, skullstripped: bool):
    from atlasmorph_cli.inference.brain_extraction import resolve_brain
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.inference.quality import assess

    vec, _ = encode_attributes(model, {"age": row["age"], "sex": row["sex"]})
    brain = resolve_brain(subj, mask, skullstripped)
    reg = register_subject(model, subj, vec, brain.as_volume(subj))
    return assess(reg, brain.mask, "test", brain.source), brain


def test_a_validation_whole_head_scan_passes(shipped, validation_subject):
    t1, seg, row = validation_subject
    q, brain = _run(shipped, row, t1, None, False)
    assert brain.source == "extracted" and not q.flagged, q.reasons
    assert q.score > SCORE_MIN + 0.1 and q.mask_dice > 0.9


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_input_is_flagged_or_refused(kind, shipped, validation_subject):
    t1, seg, row = validation_subject
    c = BROKEN[kind](t1.data, t1.affine, seg)
    subj = Volume(c.data.astype(np.float32), c.affine)
    mask = Volume(c.mask.astype(np.float32), c.affine) if c.mask is not None else None
    try:
        q, _ = _run(shipped, row, subj, mask, c.skullstripped)
    except AtlasMorphError as exc:  # refused with a one-line error: not silent either
        assert str(exc)
        return
    assert q.flagged, q.to_dict()
    assert q.warning().startswith("test: failed the quality check (")


@pytest.mark.parametrize("kind", sorted(PASSING))
def test_smoothed_mask_is_read_right_and_passes(kind, shipped, validation_subject):
    t1, seg, row = validation_subject
    c = PASSING[kind](t1.data, t1.affine, seg)
    q, brain = _run(shipped, row, Volume(c.data, c.affine), Volume(c.mask.astype(np.float32), c.affine), False)
    assert brain.warnings and not q.flagged, q.reasons


def test_flag_reaches_the_user_warning_json_csv_and_strict_exit_3(tmp_path, validation_subject, monkeypatch, capsys):
    """A contrast-inverted skull-stripped brain: one warning line naming the subject, the score in --quality
    JSON and the volumes CSV, outputs written, exit code 0 without --strict and 3 with it."""
    from atlasmorph_cli import cli

    t1, seg, row = validation_subject
    c = BROKEN["inverted_contrast"](t1.data, t1.affine, seg)
    c.mask = None  # skull-stripped (zero outside the brain): no extraction, no mask cross-check (faster)
    img, _ = c.write(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    codes = {}
    for strict in (False, True):
        d = out / str(strict)
        d.mkdir()
        argv = ["atlasmorph", "segment", str(img), "--age", row["age"], "--sex", row["sex"],
                "-o", str(d / "seg.nii.gz"), "--vol", str(d / "vol.csv"), "--quality", str(d / "qc.json"),
                "--qc", str(d / "qc.png"), "--threads", "1"] + (["--strict"] if strict else [])
        monkeypatch.setattr(sys, "argv", argv)
        try:
            cli.main()
            codes[strict] = 0
        except SystemExit as exc:
            codes[strict] = exc.code
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "failed the quality check" in ln]
        assert len(lines) == (2 if strict else 1), err
        assert img.name in lines[0] and "NCC" in lines[0]
        qc = json.loads((d / "qc.json").read_text())
        assert qc["flagged"] and qc["score"] < SCORE_MIN and qc["subject"] == img.name
        with open(d / "vol.csv", newline="") as fh:
            r = next(csv.DictReader(fh))
        assert r["qc_flagged"] == "1" and float(r["qc_score"]) == pytest.approx(qc["score"], abs=1e-3)
        assert (d / "seg.nii.gz").is_file() and (d / "qc.png").read_bytes()[:4] == b"\x89PNG"
    assert codes == {False: 0, True: 3}


def test_batch_writes_quality_json_per_subject_and_strict_fails(tmp_path, validation_subject):
    """A batch of one good skull-stripped subject and an inverted one: per-subject JSON, volumes CSV columns,
    --strict ends with exit code 3 naming the flagged subject only."""
    from atlasmorph_cli.cli.request import SubjectRequest
    from atlasmorph_cli.cli.run import run_batch
    from atlasmorph_cli.inference.quality import QualityError

    t1, seg, row = validation_subject
    good = BROKEN["inverted_contrast"](t1.data, t1.affine, seg)
    good.name, good.data, good.mask = "good", np.where(seg > 0, t1.data, 0), None
    bad = BROKEN["inverted_contrast"](t1.data, t1.affine, seg)
    bad.mask = None
    lines = ["subject,t1,age,sex"]
    for case in (good, bad):
        img, _ = case.write(tmp_path / "in")
        lines.append(f"{case.name},{img},{row['age']},{row['sex']}")
    (tmp_path / "cohort.csv").write_text("\n".join(lines) + "\n")
    warnings: list[str] = []
    with pytest.raises(QualityError, match=r"1 of 2 subject\(s\) failed the quality check \(sub-invertedcontrast\)"):
        run_batch(SubjectRequest("segment", tmp_path / "cohort.csv", out_dir=tmp_path / "out", output_names="dseg,qc",
                                 threads=1, strict=True), warnings.extend, quiet=True)
    assert [w for w in warnings if "quality" in w] and all("sub-invertedcontrast" in w for w in warnings
                                                          if "quality" in w)
    for label, flagged in (("good", False), ("invertedcontrast", True)):
        assert json.loads((tmp_path / "out" / f"sub-{label}_desc-atlasmorph_qc.json").read_text())["flagged"] is flagged
    with open(tmp_path / "out" / "volumes.csv", newline="") as fh:
        assert [r["qc_flagged"] for r in csv.DictReader(fh)] == ["0", "1"]
    # QC pictures, one per subject, and an index listing the flagged subject first
    for label in ("good", "invertedcontrast"):
        assert (tmp_path / "out" / f"sub-{label}_desc-atlasmorph_qc.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "out" / "qc_index.html").read_text()
    assert "2 subjects, 1 flagged" in page
    assert page.index("sub-invertedcontrast_desc-atlasmorph_qc.png") < page.index("sub-good_desc-atlasmorph_qc.png")


# ------------------------------------------------------------------------------------------ refused outright
def test_a_model_with_nan_weights_is_refused(tmp_path):
    from atlasmorph_cli.model.model_file import load_model, save_model
    from atlasmorph_cli.model.shipped import load
    from synthetic import small_model

    p = small_model(tmp_path / "m.safetensors")
    model = load_model(p)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    bad = save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(AtlasMorphError, match="NaN/Inf weights"):
        load(bad)


def test_complex_input_is_refused(tmp_path):
    data = (np.ones((8, 8, 8)) + 1j * np.ones((8, 8, 8))).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "c.nii.gz"))
    with pytest.raises(AtlasMorphError, match="complex-valued"):
        load_volume(tmp_path / "c.nii.gz")
