"""Pure helpers of benchmarks/segmentation_benchmark.py (folding, displacement, age groups, voting, split)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasmorph_cli.model.layers import jacobian_determinant

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "segmentation_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("segmentation_benchmark", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_folding_percent_of_known_fields(bench):
    shape = (12, 12, 12)
    zero = torch.zeros(1, 3, *shape)
    det = jacobian_determinant(zero)[0].numpy()
    assert bench.folding_percent(det) == 0.0
    # x -> -x along the first axis: u = -2x, det = -1 everywhere -> 100 % folded
    x = torch.arange(shape[0], dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 1, *shape)
    flip = torch.cat([-2 * x, torch.zeros(1, 2, *shape)], 1)
    assert bench.folding_percent(jacobian_determinant(flip)[0].numpy()) == 100.0
    # a mask selects which voxels count; det exactly 0 counts as folded
    det = np.ones(shape)
    det[:3] = 0.0
    det[3:6] = -0.5
    mask = np.zeros(shape, bool)
    mask[:6] = True
    mask[6:9] = True
    assert bench.folding_percent(det) == pytest.approx(50.0)
    assert bench.folding_percent(det, mask) == pytest.approx(100.0 * 6 / 9)
    assert math.isnan(bench.folding_percent(det, np.zeros(shape, bool)))


def test_mean_magnitude_scales_components(bench):
    disp = np.zeros((3, 4, 4, 4))
    disp[0] = 3.0
    disp[1] = 4.0
    assert bench.mean_magnitude(disp) == pytest.approx(5.0)
    assert bench.mean_magnitude(disp, spacing=(2, 2, 2)) == pytest.approx(10.0)  # voxels -> mm
    last = np.moveaxis(disp, 0, -1)
    mask = np.zeros((4, 4, 4), bool)
    mask[0] = True
    assert bench.mean_magnitude(last, mask, axis=-1) == pytest.approx(5.0)


def test_age_groups_and_stats(bench):
    assert [bench.age_group(a) for a in (20, 39.99, 40, 59.9, 60, 85)] == ["<40", "<40", "40-60", "40-60", ">=60", ">=60"]
    s = bench.stats([1.0, 3.0, None, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 2}
    assert bench.stats([])["mean"] is None
    assert bench.clean({"a": [float("nan"), np.float32(1.5), np.int64(2)]}) == {"a": [None, 1.5, 2]}


def test_majority_vote(bench):
    a = np.array([[1, 2, 3, 0]])
    b = np.array([[1, 2, 4, 0]])
    c = np.array([[1, 5, 4, 7]])
    np.testing.assert_array_equal(bench.majority_vote([a, b, c]), [[1, 2, 4, 0]])
    np.testing.assert_array_equal(bench.majority_vote([a, c]), [[1, 2, 3, 0]])  # ties: lower index


def test_split_and_subject_selection(bench, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["s3"], "validation": ["s2", "s1", "s4"]}))
    ids, source = bench.split_ids(split, tmp_path / "unused.safetensors")
    assert ids["validation"] == ["s2", "s1", "s4"] and source == str(split)
    rows = [{"subject": "s1", "seg": "a", "age": "30", "sex": "F"},
            {"subject": "s2", "seg": "b", "age": "70", "sex": "M"},
            {"subject": "s3", "seg": "c", "age": "50", "sex": "M"},
            {"subject": "s4", "seg": "d", "age": "", "sex": ""}]
    assert [r["subject"] for r in bench.pick_subjects(rows, ids["validation"], None)] == ["s1", "s2"]
    assert [r["subject"] for r in bench.pick_subjects(rows, ids["validation"], 1)] == ["s1"]


def _nifti(path: Path, data: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def test_task_key_follows_content_not_location(bench, tmp_path):
    """Cached results move between machines: the key sees what the files hold, not where they lie."""
    vol = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    def task(folder: Path, **kw) -> dict:
        return {"kind": "ants", "method": "ants-syncc-mni", "subject": "S1", "transform": "SyNCC",
                "t1": f"/data{folder}/ixi/S1_t1.nii.gz", "seg": f"/data{folder}/ixi/S1_seg.nii.gz",
                "template": str(folder / "t.nii.gz"), "template_labels": str(folder / "l.nii.gz"),
                "scratch": str(folder / "scratch"), "threads": 2, **kw}

    for folder in (a, b):
        _nifti(folder / "t.nii.gz", vol)
        _nifti(folder / "l.nii.gz", vol > 10)
    assert bench.task_key(task(a)) == bench.task_key(task(b, threads=1))
    _nifti(b / "t.nii.gz", vol + 1)  # other content, same name
    assert bench.task_key(task(a)) != bench.task_key(task(b))
    assert bench.task_key(task(a)) != bench.task_key(task(a, transform="SyN"))
    assert bench.task_key(task(a)) != bench.task_key(task(a, subject="S2"))


def test_paired_subjects_and_wins(bench):
    def subj(name, **dice):
        return {"subject": name, "methods": {m: ({"error": "x"} if d is None else {"dice": d}) for m, d in dice.items()}}

    subjects = [subj("s1", atlasmorph=0.8, **{"ants-syncc-mni": 0.7}),
                subj("s2", atlasmorph=0.6, **{"ants-syncc-mni": 0.7}),
                subj("s3", atlasmorph=0.9, **{"ants-syncc-mni": None}),  # ANTs failed
                subj("s4", atlasmorph=0.9)]  # ANTs not run
    methods = ["atlasmorph", "ants-syncc-mni"]
    paired = bench.paired_subjects(subjects, methods)
    assert [s["subject"] for s in paired] == ["s1", "s2"]
    assert bench.wins(paired, methods) == {"atlasmorph:ants-syncc-mni": {"ours_higher": 1, "n": 2}}


def test_side_by_side_per_ants_method(bench):
    """Each ANTs method is compared with ours on the subjects it ran on, not only where all methods ran."""
    def subj(name, **res):
        return {"subject": name, "age": 30.0,
                "methods": {m: {"dice": d, "seconds": t, "peak_mb": 500.0,
                                "dice_per_structure": dict.fromkeys(bench.NAMES, d),
                                "folding_pct": 0.0, "cpu_seconds": t, "load_seconds": 0.1, "mean_disp_mm": 2.0}
                            for m, (d, t) in res.items()}}

    subjects = [subj("s1", atlasmorph=(0.8, 4.0), **{"ants-syncc-mni": (0.7, 400.0), "ants-syncc-built": (0.9, 800.0)}),
                subj("s2", atlasmorph=(0.8, 4.0), **{"ants-syncc-mni": (0.9, 600.0)}),
                subj("s3", atlasmorph=(0.8, 4.0))]
    methods = ["atlasmorph", "ants-syncc-mni", "ants-syncc-built"]
    sb = bench.side_by_side(subjects, methods)
    assert sb["ants-syncc-mni"]["subjects"] == ["s1", "s2"]
    assert sb["ants-syncc-built"]["subjects"] == ["s1"]
    assert sb["ants-syncc-mni"]["wins"] == {"atlasmorph:ants-syncc-mni": {"ours_higher": 1, "n": 2}}
    assert sb["ants-syncc-built"]["wins"] == {"atlasmorph:ants-syncc-built": {"ours_higher": 0, "n": 1}}
    assert math.isclose(sb["ants-syncc-mni"]["ratios"]["atlasmorph:ants-syncc-mni seconds"], 4.0 / 500.0)
    assert math.isclose(sb["ants-syncc-built"]["ratios"]["atlasmorph:ants-syncc-built seconds"], 4.0 / 800.0)
    assert math.isclose(sb["ants-syncc-mni"]["summary"]["ants-syncc-mni"]["dice"]["mean"], 0.8)


def test_run_cached_without_running(bench, tmp_path):
    """--cached-only: a task without a stored result is not run."""
    task = {"kind": "ants", "method": "ants-syncc-mni", "subject": "S1", "transform": "SyNCC",
            "t1": "/x/S1_t1.nii.gz", "seg": "/x/S1_seg.nii.gz", "template": str(tmp_path / "none.nii.gz"),
            "template_labels": str(tmp_path / "none.nii.gz"), "scratch": str(tmp_path), "threads": 1}
    cache = tmp_path / "ants-syncc-mni" / "S1.json"
    assert bench.run_cached(task, cache, run=False) == (None, False)
    cache.parent.mkdir()
    cache.write_text(json.dumps({"key": bench.task_key(task), "dice": 0.75}))
    rec, cached = bench.run_cached(task, cache, run=False)
    assert cached and rec["dice"] == 0.75


def test_boxplot_labels_count_subjects_per_method(bench, tmp_path):
    assert bench.box_labels(["atlasmorph", "ants-syncc-built"], [23, 3]) == [
        "AtlasMorph (age, sex) (n = 23)", "ANTs SyNCC built template (n = 3)"]
    # a figure from a result where one method ran on fewer subjects
    dps = {n: 0.8 for n in bench.NAMES}
    subjects = [{"subject": f"s{i}", "age": 30 + i, "methods": {
        "atlasmorph": {"dice": 0.80 + 0.01 * i, "dice_per_structure": dps},
        **({"ants-syncc-mni": {"dice": 0.77, "dice_per_structure": dps}} if i < 2 else {})}} for i in range(4)]
    out = bench.boxplot({"methods": ["atlasmorph", "ants-syncc-mni"], "subjects": subjects}, tmp_path / "b.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
