"""QC pictures (qc.py): the figure on a synthetic subject, the batch index, `register --qc` end to end.

Real-data QC pictures (segment --qc, batch --outputs qc with a flagged subject) are checked in
tests/test_quality.py, on the same runs as the quality check."""
from __future__ import annotations

import math

import numpy as np
from typer.testing import CliRunner

from atlasmorph_cli.cli import app
from atlasmorph_cli.io.volumes import Volume
from atlasmorph_cli.inference.qc import _crop_box, _outline, qc_figure, qc_index
from atlasmorph_cli.inference.quality import Quality

from synthetic import phantom, small_model


def _quality(name: str, score: float, reasons=()) -> Quality:
    return Quality(name, score, score, 1.0, 1.0, 1.0, 0.0, False, "skullstripped", reasons=list(reasons))


def test_outline_and_crop_box():
    lab = np.zeros((9, 9), np.int32)
    lab[2:7, 2:7] = 3
    edge = _outline(lab)
    assert edge[2, 4] and edge[6, 4] and not edge[4, 4] and not edge[0, 0]
    m = np.zeros((20, 20, 20), bool)
    m[5:15, 8:12, 0:20] = True
    box = _crop_box(m, 0.1)
    assert box[0].start < 5 and box[0].stop > 15 and box[2] == slice(0, 20)


def test_qc_figure_writes_a_png_in_any_voxel_order(tmp_path):
    t1, seg, aff = phantom(50.0)
    fs = np.where(seg == 3, 3, np.where(seg == 2, 2, np.where(seg == 4, 4, 0)))
    flipped = aff @ np.diag([-1.0, 1, 1, 1])  # an LAS-like grid: drawn in RAS order all the same
    for a, name in ((aff, "ras.png"), (flipped, "las.png")):
        q = _quality("s01", 0.2, ["score 0.20 < 0.7 (a reason that is long " + "x" * 200 + ")"])
        qc_figure(Volume(t1, a), seg > 0, fs, q, tmp_path / name, "age 50, sex F")
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    qc_figure(Volume(t1, aff), seg > 0, None, None, tmp_path / "plain.png")  # no labels, no quality
    assert (tmp_path / "plain.png").stat().st_size > 1000


def test_index_lists_flagged_subjects_first_and_escapes_names(tmp_path):
    entries = [("sub-a", "a.png", _quality("sub-a", 0.9)), ("sub-<b>", "b.png", _quality("sub-<b>", 0.1, ["bad"])),
               ("sub-c", "c.png", _quality("sub-c", math.nan, ["nan"]))]
    page = qc_index(tmp_path / "qc_index.html", entries).read_text()
    assert "3 subjects, 2 flagged" in page and "sub-&lt;b&gt;" in page and "sub-<b>" not in page
    assert page.index('src="b.png"') < page.index('src="a.png"') and page.index('src="c.png"') < page.index('src="a.png"')


def test_register_writes_the_qc_picture(tmp_path):
    model = small_model(tmp_path / "m.safetensors")
    t1, seg, aff = phantom(50.0)
    from atlasmorph_cli.io.volumes import save_volume

    save_volume(t1, aff, tmp_path / "brain.nii.gz")
    r = CliRunner().invoke(app, ["register", str(tmp_path / "brain.nii.gz"), "--age", "50", "--sex", "F", "-m",
                                 str(model), "--threads", "1", "--qc", str(tmp_path / "qc.png")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert (tmp_path / "qc.png").read_bytes()[:4] == b"\x89PNG"


def test_nipype_interfaces_pass_qc_quality_and_strict(tmp_path, monkeypatch):
    from atlasmorph_cli.interfaces.nodes import Register, Segment

    monkeypatch.chdir(tmp_path)
    t1 = tmp_path / "s01_T1w.nii.gz"
    t1.write_bytes(b"")
    s = Segment(in_file=str(t1), qc_file=True, quality_file=True, strict=True)
    assert "--qc s01_T1w_qc.png" in s.cmdline and "--quality s01_T1w_qc.json" in s.cmdline and "--strict" in s.cmdline
    out = s._list_outputs()
    assert out["qc_file"] == str(tmp_path / "s01_T1w_qc.png") and out["quality_file"] == str(tmp_path / "s01_T1w_qc.json")
    assert "--qc" not in Register(in_file=str(t1)).cmdline
