"""Helpers of the segmentation benchmark (benchmarks/segmentation_*.py, common.py): folding, displacement,
age groups, voting, split, the result cache (keyed by the model that produced a result) and the report."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import common  # benchmarks/, on pytest's pythonpath (pyproject.toml) as on the scripts' own
import segmentation_cache
import segmentation_methods
import segmentation_report
import segmentation_summary
from atlasmorph_cli.model.layers import jacobian_determinant


def test_folding_percent_of_known_fields():
    shape = (12, 12, 12)
    zero = torch.zeros(1, 3, *shape)
    det = jacobian_determinant(zero)[0].numpy()
    assert segmentation_methods.folding_percent(det) == 0.0
    # x -> -x along the first axis: u = -2x, det = -1 everywhere -> 100 % folded
    x = torch.arange(shape[0], dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 1, *shape)
    flip = torch.cat([-2 * x, torch.zeros(1, 2, *shape)], 1)
    assert segmentation_methods.folding_percent(jacobian_determinant(flip)[0].numpy()) == 100.0
    # a mask selects which voxels count; det exactly 0 counts as folded
    det = np.ones(shape)
    det[:3] = 0.0
    det[3:6] = -0.5
    mask = np.zeros(shape, bool)
    mask[:6] = True
    mask[6:9] = True
    assert segmentation_methods.folding_percent(det) == pytest.approx(50.0)
    assert segmentation_methods.folding_percent(det, mask) == pytest.approx(100.0 * 6 / 9)
    assert math.isnan(segmentation_methods.folding_percent(det, np.zeros(shape, bool)))


def test_mean_magnitude_scales_components():
    disp = np.zeros((3, 4, 4, 4))
    disp[0] = 3.0
    disp[1] = 4.0
    assert segmentation_methods.mean_magnitude(disp) == pytest.approx(5.0)
    assert segmentation_methods.mean_magnitude(disp, spacing=(2, 2, 2)) == pytest.approx(10.0)  # voxels -> mm
    last = np.moveaxis(disp, 0, -1)
    mask = np.zeros((4, 4, 4), bool)
    mask[0] = True
    assert segmentation_methods.mean_magnitude(last, mask, axis=-1) == pytest.approx(5.0)


def test_age_groups_and_stats():
    assert [segmentation_summary.age_group(a) for a in (20, 39.99, 40, 59.9, 60, 85)] == ["<40", "<40", "40-60", "40-60", ">=60", ">=60"]
    s = segmentation_summary.stats([1.0, 3.0, None, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 2}
    assert segmentation_summary.stats([])["mean"] is None
    assert common.clean({"a": [float("nan"), np.float32(1.5), np.int64(2)]}) == {"a": [None, 1.5, 2]}


def test_majority_vote():
    a = np.array([[1, 2, 3, 0]])
    b = np.array([[1, 2, 4, 0]])
    c = np.array([[1, 5, 4, 7]])
    np.testing.assert_array_equal(segmentation_methods.majority_vote([a, b, c]), [[1, 2, 4, 0]])
    np.testing.assert_array_equal(segmentation_methods.majority_vote([a, c]), [[1, 2, 3, 0]])  # ties: lower index


def test_split_and_subject_selection(tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["s3"], "validation": ["s2", "s1", "s4"]}))
    ids, source = common.split_ids(split, tmp_path / "unused.safetensors")
    assert ids["validation"] == ["s2", "s1", "s4"] and source == str(split)
    rows = [{"subject": "s1", "seg": "a", "age": "30", "sex": "F"},
            {"subject": "s2", "seg": "b", "age": "70", "sex": "M"},
            {"subject": "s3", "seg": "c", "age": "50", "sex": "M"},
            {"subject": "s4", "seg": "d", "age": "", "sex": ""}]
    assert [r["subject"] for r in common.pick_subjects(rows, ids["validation"], None)] == ["s1", "s2"]
    assert [r["subject"] for r in common.pick_subjects(rows, ids["validation"], 1)] == ["s1"]


def test_ixi_rows_and_attribute_filter(tmp_path):
    """subjects.csv rows get absolute file paths; only subjects with age and sex are kept, by id."""
    (tmp_path / "ixi").mkdir()
    (tmp_path / "ixi" / "subjects.csv").write_text(
        "subject,t1,seg,age,sex\nb,t1/b.nii.gz,seg/b.nii.gz,40,F\nc,t1/c.nii.gz,,,\na,t1/a.nii.gz,seg/a.nii.gz,30,M\n")
    rows = common.ixi_rows(tmp_path)
    assert rows[0]["t1"] == str(tmp_path / "ixi" / "t1" / "b.nii.gz") and rows[1]["seg"] == ""
    assert [r["subject"] for r in common.with_attributes(rows)] == ["a", "b"]
    assert [r["subject"] for r in common.with_attributes(rows, 1)] == ["a"]
    assert common.data_folder(tmp_path) == tmp_path
    with pytest.raises(SystemExit) as exc:
        common.data_folder(tmp_path / "nothing")
    assert exc.value.code == 2


def _nifti(path: Path, data: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def test_task_key_follows_content_not_location(tmp_path):
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
    assert segmentation_cache.task_key(task(a)) == segmentation_cache.task_key(task(b, threads=1))
    _nifti(b / "t.nii.gz", vol + 1)  # other content, same name
    assert segmentation_cache.task_key(task(a)) != segmentation_cache.task_key(task(b))
    assert segmentation_cache.task_key(task(a)) != segmentation_cache.task_key(task(a, transform="SyN"))
    assert segmentation_cache.task_key(task(a)) != segmentation_cache.task_key(task(a, subject="S2"))


def test_paired_subjects_and_wins():
    def subj(name, **dice):
        return {"subject": name, "methods": {m: ({"error": "x"} if d is None else {"dice": d}) for m, d in dice.items()}}

    subjects = [subj("s1", atlasmorph=0.8, **{"ants-syncc-mni": 0.7}),
                subj("s2", atlasmorph=0.6, **{"ants-syncc-mni": 0.7}),
                subj("s3", atlasmorph=0.9, **{"ants-syncc-mni": None}),  # ANTs failed
                subj("s4", atlasmorph=0.9)]  # ANTs not run
    methods = ["atlasmorph", "ants-syncc-mni"]
    paired = segmentation_summary.paired_subjects(subjects, methods)
    assert [s["subject"] for s in paired] == ["s1", "s2"]
    assert segmentation_summary.wins(paired, methods) == {"atlasmorph:ants-syncc-mni": {"ours_higher": 1, "n": 2}}


def test_side_by_side_per_ants_method():
    """Each ANTs method is compared with ours on the subjects it ran on, not only where all methods ran."""
    def subj(name, **res):
        return {"subject": name, "age": 30.0,
                "methods": {m: {"dice": d, "seconds": t, "peak_mb": 500.0,
                                "dice_per_structure": dict.fromkeys(segmentation_methods.NAMES, d),
                                "folding_pct": 0.0, "cpu_seconds": t, "load_seconds": 0.1, "mean_disp_mm": 2.0}
                            for m, (d, t) in res.items()}}

    subjects = [subj("s1", atlasmorph=(0.8, 4.0), **{"ants-syncc-mni": (0.7, 400.0), "ants-syncc-built": (0.9, 800.0)}),
                subj("s2", atlasmorph=(0.8, 4.0), **{"ants-syncc-mni": (0.9, 600.0)}),
                subj("s3", atlasmorph=(0.8, 4.0))]
    methods = ["atlasmorph", "ants-syncc-mni", "ants-syncc-built"]
    sb = segmentation_summary.side_by_side(subjects, methods)
    assert sb["ants-syncc-mni"]["subjects"] == ["s1", "s2"]
    assert sb["ants-syncc-built"]["subjects"] == ["s1"]
    assert sb["ants-syncc-mni"]["wins"] == {"atlasmorph:ants-syncc-mni": {"ours_higher": 1, "n": 2}}
    assert sb["ants-syncc-built"]["wins"] == {"atlasmorph:ants-syncc-built": {"ours_higher": 0, "n": 1}}
    assert math.isclose(sb["ants-syncc-mni"]["ratios"]["atlasmorph:ants-syncc-mni seconds"], 4.0 / 500.0)
    assert math.isclose(sb["ants-syncc-built"]["ratios"]["atlasmorph:ants-syncc-built seconds"], 4.0 / 800.0)
    assert math.isclose(sb["ants-syncc-mni"]["summary"]["ants-syncc-mni"]["dice"]["mean"], 0.8)


def test_run_cached_without_running(tmp_path):
    """--cached-only: a task without a stored result is not run; a stored one with its key is reused."""
    task = {"kind": "ants", "method": "ants-syncc-mni", "subject": "S1", "transform": "SyNCC",
            "t1": "/x/S1_t1.nii.gz", "seg": "/x/S1_seg.nii.gz", "template": str(tmp_path / "none.nii.gz"),
            "template_labels": str(tmp_path / "none.nii.gz"), "scratch": str(tmp_path), "threads": 1}
    cache = segmentation_cache.result_file(tmp_path / "results", task)
    assert segmentation_cache.run_cached(task, cache, run=False) == (None, False)
    segmentation_cache.save_result(cache, {"key": segmentation_cache.task_key(task), "dice": 0.75})
    rec, cached = segmentation_cache.run_cached(task, cache, run=False)
    assert cached and rec["dice"] == 0.75


def _model(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _ours_task(model: Path) -> dict:
    return {"kind": "ours", "method": "atlasmorph", "subject": "S1", "t1": "/x/S1_t1.nii.gz", "seg": "/x/S1_seg.nii.gz",
            "model": str(model), "refine": 10, "refine_lr": 0.05, "conditional": True,
            "attrs": {"age": 30.0, "sex": "F"}, "scratch": "/tmp", "threads": 1}


def test_results_of_two_models_live_side_by_side(tmp_path):
    """A second model's result neither overwrites nor reuses the first model's: each model has its folder."""
    results = tmp_path / "results"
    ta = _ours_task(_model(tmp_path / "a.safetensors", b"model A"))
    tb = _ours_task(_model(tmp_path / "b.safetensors", b"model B"))
    fa, fb = segmentation_cache.result_file(results, ta), segmentation_cache.result_file(results, tb)
    assert fa == results / "atlasmorph" / f"model-{hashlib.sha256(b'model A').hexdigest()[:12]}" / "S1.json"
    assert fb.parent != fa.parent and fb.name == fa.name
    segmentation_cache.save_result(fa, {"key": segmentation_cache.task_key(ta), "dice": 0.8})
    assert segmentation_cache.run_cached(tb, fb, run=False) == (None, False)  # B does not get A's result
    segmentation_cache.save_result(fb, {"key": segmentation_cache.task_key(tb), "dice": 0.7})
    assert segmentation_cache.run_cached(ta, fa, run=False)[0]["dice"] == 0.8  # A's is still there
    assert segmentation_cache.run_cached(tb, fb, run=False)[0]["dice"] == 0.7
    # the same model content under another path finds its results
    tc = _ours_task(_model(tmp_path / "elsewhere" / "copy.safetensors", b"model A"))
    assert segmentation_cache.result_file(results, tc) == fa
    assert segmentation_cache.run_cached(tc, fa, run=False)[0]["dice"] == 0.8


def test_results_of_the_older_flat_layout_are_still_read(tmp_path):
    """RESULTS/<method>/<subject>.json from before the model folders: reused when its key matches only."""
    results = tmp_path / "results"
    ta = _ours_task(_model(tmp_path / "a.safetensors", b"model A"))
    tb = _ours_task(_model(tmp_path / "b.safetensors", b"model B"))
    flat = results / "atlasmorph" / "S1.json"
    flat.parent.mkdir(parents=True)
    flat.write_text(json.dumps({"key": segmentation_cache.task_key(ta), "dice": 0.8}))
    rec, cached = segmentation_cache.run_cached(ta, segmentation_cache.result_file(results, ta), run=False)
    assert cached and rec["dice"] == 0.8
    assert segmentation_cache.run_cached(tb, segmentation_cache.result_file(results, tb), run=False) == (None, False)
    # the OOD benchmark's layout: the perturbation folder comes before the model folder
    ood = segmentation_cache.result_file(results, ta, "bias40")
    assert ood.parent.parent == results / "atlasmorph" / "bias40"
    assert segmentation_cache.legacy_file(ood) == results / "atlasmorph" / "bias40" / "S1.json"


def test_boxplot_labels_count_subjects_per_method(tmp_path):
    assert segmentation_report.box_labels(["atlasmorph", "ants-syncc-built"], [23, 3]) == [
        "AtlasMorph (age, sex) (n = 23)", "ANTs SyNCC built template (n = 3)"]
    # a figure from a result where one method ran on fewer subjects
    dps = {n: 0.8 for n in segmentation_methods.NAMES}
    subjects = [{"subject": f"s{i}", "age": 30 + i, "methods": {
        "atlasmorph": {"dice": 0.80 + 0.01 * i, "dice_per_structure": dps},
        **({"ants-syncc-mni": {"dice": 0.77, "dice_per_structure": dps}} if i < 2 else {})}} for i in range(4)]
    out = segmentation_report.boxplot({"methods": ["atlasmorph", "ants-syncc-mni"], "subjects": subjects}, tmp_path / "b.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_template_gain_is_the_paired_difference_per_age_group_and_structure():
    """Matched minus average template: paired per subject, per age group and structure; a structure missing in
    one subject is left out there; without both methods there is nothing to report."""
    names = segmentation_methods.NAMES

    def subj(name, age, matched, average, missing=None):
        def rec(d):
            return {"dice": d, "dice_per_structure": {n: (None if n == missing else d) for n in names},
                    "mean_disp_mm": 2.0 - d}
        return {"subject": name, "age": age, "methods": {"atlasmorph": rec(matched), "atlasmorph-average": rec(average)}}

    subjects = [subj("y", 30.0, 0.80, 0.79), subj("o1", 70.0, 0.82, 0.80, missing=names[0]), subj("o2", 65.0, 0.78, 0.79),
                {"subject": "x", "age": 70.0, "methods": {"atlasmorph": {"dice": 0.9}}}]  # average not run: not paired
    g = segmentation_summary.template_gain(subjects)
    assert g[">=60"]["n"] == 2 and g[">=60"]["a_higher"] == 1
    assert g[">=60"]["dice"]["mean"] == pytest.approx(0.005)
    assert g[">=60"]["mean_disp_mm"]["mean"] == pytest.approx(-0.005)
    assert g[">=60"]["per_structure"][names[0]] == pytest.approx(-0.01)  # o2 only
    assert g[">=60"]["per_structure"][names[1]] == pytest.approx(0.005)
    assert g["<40"]["dice"]["mean"] == pytest.approx(0.01) and g["40-60"]["n"] == 0
    assert g["all"]["n"] == 3 and g["all"]["dice"]["mean"] == pytest.approx((0.01 + 0.02 - 0.01) / 3)
    assert segmentation_summary.template_gain([subjects[-1]]) is None


def test_template_parts_hybrid_of_one_attribute_vector_is_the_tools_template():
    """template_parts.hybrid_template with the same attributes for shape and residual is make_template's
    template (the "matched" and "average" arms are what the tool uses); mixing them changes both T1 and labels."""
    import template_parts
    from atlasmorph_cli.inference.template import encode_attributes, make_template
    from atlasmorph_cli.model.shipped import load

    _, model = load(None)
    old, _ = encode_attributes(model, {"age": 72, "sex": "F"})
    avg, _ = encode_attributes(model, None)
    for attrs in (old, avg):
        ref, got = make_template(model, attrs), template_parts.hybrid_template(model, attrs, attrs)
        np.testing.assert_array_equal(got.t1, ref.t1)
        np.testing.assert_array_equal(got.probs, ref.probs)
    mixed, matched = template_parts.hybrid_template(model, old, avg), make_template(model, old)
    assert np.abs(mixed.probs - matched.probs).max() > 0.05 and np.abs(mixed.t1 - matched.t1).max() > 0.01
