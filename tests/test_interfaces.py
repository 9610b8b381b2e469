"""nipype interfaces (command lines and output names, without running) and the ready workflow, run for real."""
from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasmorph_cli.interfaces.nodes import Register, Segment, Template
from atlasmorph_cli.labels import FS_IDS
from atlasmorph_cli.geometry.space import MODEL_GRID


@pytest.fixture()
def t1(tmp_path) -> Path:
    p = tmp_path / "s01_T1w.nii.gz"
    p.write_bytes(b"")  # File(exists=True) only needs a file; nothing is run
    return p


def test_template_cmdline_and_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = Template(age=70, sex="F", attributes={"site": "HH"}, num_threads=3)
    assert t.cmdline == ("atlasmorph template --age 70 --attr site=HH --labels template_labels.nii.gz "
                         "--threads 3 -o template.nii.gz --sex F")
    out = t._list_outputs()
    assert out["out_file"] == str(tmp_path / "template.nii.gz")
    assert out["labels_file"] == str(tmp_path / "template_labels.nii.gz")
    t.inputs.labels_file, t.inputs.probs_file = False, True
    assert "--labels" not in t.cmdline and "--probs template_probs.nii.gz" in t.cmdline


def test_register_cmdline_default_and_requested_outputs(t1, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = Register(in_file=str(t1), age=38.78, sex="M")
    assert r.cmdline == (f"atlasmorph register {t1} --age 38.78 -o s01_T1w_moved.nii.gz --threads 1 --sex M "
                         "-t s01_T1w_warp.nii.gz")
    r.inputs.mask_file = str(t1)
    r.inputs.template_file = True
    r.inputs.inverse_warp_file = "inv.nii.gz"
    r.inputs.labels_file = True
    r.inputs.jacobian_file = "%s_J.nii.gz"
    r.inputs.affine_file = True
    r.inputs.warp_format = "itk"
    r.inputs.moved_file = False
    args = r.cmdline.split()
    assert args[:3] == ["atlasmorph", "register", str(t1)]
    pairs = dict(zip(args[3::2], args[4::2]))
    assert pairs == {"--affine": "s01_T1w_affine.txt", "--age": "38.78", "-T": "inv.nii.gz",
                     "--jacobian": "s01_T1w_J.nii.gz", "--labels": "s01_T1w_labels.nii.gz", "--mask": str(t1),
                     "--threads": "1", "--sex": "M", "-O": "s01_T1w_template.nii.gz", "-t": "s01_T1w_warp.nii.gz",
                     "--warp-format": "itk"}
    out = r._list_outputs()
    assert out["inverse_warp_file"] == str(tmp_path / "inv.nii.gz")
    assert out["labels_file"] == str(tmp_path / "s01_T1w_labels.nii.gz")
    assert not isinstance(out["moved_file"], str)  # not requested: undefined


def test_segment_cmdline_threads_and_scheduling(t1, tmp_path, monkeypatch):
    from nipype.pipeline.engine import Node

    monkeypatch.chdir(tmp_path)
    s = Segment(in_file=str(t1), seg_file="seg.mgz", probs_file=True, model=str(t1))
    assert s.cmdline == (f"atlasmorph segment {t1} --model {t1} --threads 1 --probs s01_T1w_probseg.nii.gz "
                         "-o seg.mgz --vol s01_T1w_volumes.csv")
    assert s._list_outputs()["seg_file"] == str(tmp_path / "seg.mgz")
    s2 = Segment(in_file=str(t1))
    assert "-o s01_T1w_dseg.nii.gz" in s2.cmdline
    assert "--refine" not in s2.cmdline  # the command's default applies
    s2.inputs.refine = 0
    assert "--refine 0" in s2.cmdline
    node = Node(Segment(in_file=str(t1), num_threads=4, use_gpu=False), name="seg")
    assert node.n_procs == 4 and not node.is_gpu_node()
    assert Node(Segment(in_file=str(t1), use_gpu=True), name="g").is_gpu_node()
    # num_threads and use_gpu do not change the hash (results are the same)
    a, b = Segment(in_file=str(t1), num_threads=1), Segment(in_file=str(t1), num_threads=8)
    assert a.inputs.get_hashval()[1] == b.inputs.get_hashval()[1]


def test_workflow_runs_with_multiproc(tmp_path, monkeypatch, mni_model, data_dir, ixi_rows):
    """Two real whole-head subjects (DLMUSE seg as mask), register + segment in parallel, one cohort CSV."""
    from atlasmorph_cli.interfaces.workflows import build_workflow

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if shutil.which("atlasmorph") is None:
        pytest.skip("the atlasmorph command is not installed beside this Python")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = ixi_rows[:2]
    wf = build_workflow(name="am", model=mni_model, threads=1, masks=True, base_dir=tmp_path / "work")
    wf.config["execution"].update(poll_sleep_duration=0.2, crashdump_dir=str(tmp_path), stop_on_first_crash=True)
    ixi = data_dir / "ixi"
    wf.inputs.inputnode.in_file = [str(ixi / r["t1"]) for r in rows]
    wf.inputs.inputnode.mask_file = [str(ixi / r["seg"]) for r in rows]
    wf.inputs.inputnode.age = [float(r["age"]) for r in rows]
    wf.inputs.inputnode.sex = [r["sex"] for r in rows]
    wf.inputs.inputnode.subject_id = [r["subject"] for r in rows]
    graph = wf.run(plugin="MultiProc", plugin_args={"n_procs": 2})
    res = {n.name: n.result.outputs for n in graph.nodes()}

    reg, seg = res["register"], res["segment"]
    for i, r in enumerate(rows):
        src = nib.load(str(ixi / r["t1"]))
        assert Path(reg.moved_file[i]).name == f"{r['subject']}_T1_moved.nii.gz"
        moved = nib.load(reg.moved_file[i])
        np.testing.assert_allclose(moved.affine, MODEL_GRID.affine)
        warp = nib.load(reg.warp_file[i])
        assert warp.shape == (*MODEL_GRID.shape, 1, 3)
        assert nib.load(reg.inverse_warp_file[i]).shape[:3] == src.shape
        for f in (reg.labels_file[i], seg.seg_file[i]):
            lab = nib.load(f)
            assert lab.shape == src.shape
            np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
            assert set(np.unique(np.asarray(lab.dataobj))) <= {0, *FS_IDS}
    with open(res["cohort_volumes"].volumes_csv, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["subject"] for t in table] == [r["subject"] for r in rows]
    assert all(float(t["total_brain"]) > 5e5 for t in table)
