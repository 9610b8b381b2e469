"""`atlasmorph build` and --template: the group-wise construction on spheres of known radii, templates read
from files, one-line errors, and (with the shared data) a real build used by `segment --template`."""
from __future__ import annotations

import csv
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.geometry.space import MODEL_GRID, Grid
from atlasmorph_cli.inference.build import Aligned, build_template, correct_on_grid, finer_grid
from atlasmorph_cli.inference.refine import refine_velocity
from atlasmorph_cli.inference.template import Template, load_template
from atlasmorph_cli.io.volumes import save_volume
from atlasmorph_cli.labels import FS_IDS, N_CLASSES
from atlasmorph_cli.model.layers import warp
from atlasmorph_cli.model.networks import velocity_to_displacements

N = 32
GRID = Grid((N, N, N), np.diag([2.0, 2.0, 2.0, 1.0]))


def ball(radius: float) -> np.ndarray:
    """A sphere of `radius` voxels with a soft (logistic) edge, centred in the N^3 grid."""
    d = np.sqrt(((np.indices((N,) * 3) - (N - 1) / 2) ** 2).sum(0))
    return (1 / (1 + np.exp((d - radius) / 0.7))).astype(np.float32)


def radius(t1: np.ndarray) -> float:
    """The radius (voxels) of the sphere of the same volume as t1 > 0.5."""
    return float((3 * (t1 > 0.5).sum() / (4 * np.pi)) ** (1 / 3))


def stub_register(subjects: list[np.ndarray], fail: set[int] = frozenset(), with_probs: bool = False):
    """A real (if small) registration: Adam on a velocity from zero, the refinement objective (MSE + smoothness)."""

    def register(i: int, template: Template) -> Aligned:
        if i in fail:
            raise AtlasMorphError(f"subject {i}: cannot be read")
        s = torch.from_numpy(subjects[i])[None, None]
        v = refine_velocity(torch.zeros(1, 3, N // 2, N // 2, N // 2), s, torch.from_numpy(template.t1)[None, None],
                            60, lr=0.15, w_image=100.0, w_smooth=1.0)
        _, inv, _ = velocity_to_displacements(v, 7)
        moved = warp(s, inv)[0, 0].numpy()
        probs = (lambda: np.stack([1 - moved, moved])) if with_probs else None
        return Aligned(moved, v[0], probs, lambda grid: moved)

    return register


def initial(r: float) -> Template:
    t = ball(r)
    return Template(t, np.stack([1 - t, t]), GRID)


@pytest.fixture(scope="module")
def spheres():
    torch.set_num_threads(1)
    return [ball(r) for r in (6.0, 8.0, 10.0)]


def test_sphere_group_converges_to_mean_radius(spheres):
    truth = np.mean([radius(s) for s in spheres])
    start = initial(11.0)
    result = build_template(3, stub_register(spheres), start, 3)
    assert abs(radius(start.t1) - truth) > 2.5  # the start is far off ...
    assert abs(radius(result.template.t1) - truth) < 0.3  # ... the built template has the group's mean radius
    first, last = result.iterations[0], result.iterations[-1]
    assert last.mean_displacement_mm < 0.6 * first.mean_displacement_mm  # the group is closer to its template
    assert [r.subjects for r in result.iterations] == [3, 3, 3] and not result.failed
    # the labels were carried along by the same maps: they stay the template's sphere
    assert abs(radius(result.template.probs[1]) - radius(result.template.t1)) < 0.3


def test_build_is_deterministic(spheres):
    a = build_template(3, stub_register(spheres), initial(9.0), 1)
    b = build_template(3, stub_register(spheres), initial(9.0), 1)
    assert np.array_equal(a.template.t1, b.template.t1) and np.array_equal(a.template.probs, b.template.probs)


def test_failing_subject_is_left_out(spheres):
    group = [*spheres, ball(8.0)]
    seen = []
    result = build_template(4, stub_register(group, fail={1}), initial(9.0), 2,
                            on_subject=lambda it, i, e: seen.append((it, i, e is None)))
    assert list(result.failed) == [1] and "cannot be read" in result.failed[1]
    assert [r.subjects for r in result.iterations] == [3, 3]
    assert (1, 1, False) not in seen  # not retried in the second round
    with pytest.raises(AtlasMorphError, match="at least 2 subjects"):
        build_template(3, stub_register(spheres, fail={0, 2}), initial(9.0), 1)


def test_subject_labels_are_averaged(spheres):
    result = build_template(3, stub_register(spheres, with_probs=True), initial(11.0), 2)
    # the subjects' own label (the sphere) averaged in template space, then corrected like the T1
    assert abs(radius(result.template.probs[1]) - np.mean([radius(s) for s in spheres])) < 0.5


def test_fine_output_on_the_template_grid_is_the_template(spheres):
    result = build_template(3, stub_register(spheres), initial(11.0), 2, fine_grid=GRID)
    assert result.fine_grid is GRID and np.allclose(result.fine, result.template.t1, atol=1e-5)


def test_finer_grid_covers_the_same_field_of_view():
    fine = finer_grid(GRID, 1.0)  # GRID: 2 mm voxels, voxel 0 centred at world 0, so covering -1..63 mm
    assert fine.shape == (2 * N,) * 3
    assert np.allclose(fine.affine[:3, :3], np.eye(3)) and np.allclose(fine.affine[:3, 3], -0.5)
    assert finer_grid(GRID, 2.0).shape == GRID.shape and np.allclose(finer_grid(GRID, 2.0).affine, GRID.affine)


def test_correction_on_a_finer_grid_is_the_same_map():
    fine = finer_grid(GRID, 1.0)
    image = np.random.default_rng(0).random(fine.shape).astype(np.float32)
    shift = torch.zeros(3, N, N, N)
    shift[0] = 1.0  # out(x) = in(x + 1 model voxel along x) = in(x + 2 fine voxels)
    out = correct_on_grid(image, shift, GRID, fine)
    assert np.allclose(out[4:-4], image[6:-2], atol=1e-5)


# ----------------------------------------------------------------------------------------- --template files
def _model_grid_template(tmp_path, probs_4d: bool = False):
    shape = MODEL_GRID.shape
    idx = np.zeros(shape, np.int32)
    idx[20:60, 20:76, 20:60] = 2
    idx[30:50, 30:66, 30:50] = 41
    t1 = np.where(idx == 2, 0.6, np.where(idx == 41, 0.9, 0.0)).astype(np.float32)
    save_volume(t1, MODEL_GRID.affine, tmp_path / "t.nii.gz")
    if probs_4d:
        from atlasmorph_cli.labels import to_index

        onehot = np.eye(N_CLASSES, dtype=np.float32)[to_index(idx, "freesurfer")]
        save_volume(onehot, MODEL_GRID.affine, tmp_path / "l.nii.gz", dtype=np.float32)
    else:
        save_volume(idx, MODEL_GRID.affine, tmp_path / "l.nii.gz", dtype=np.int32)
    return t1, idx


@pytest.mark.parametrize("probs_4d", [False, True])
def test_load_template_round_trip(tmp_path, probs_4d):
    t1, idx = _model_grid_template(tmp_path, probs_4d)
    t, warnings = load_template(tmp_path / "t.nii.gz", tmp_path / "l.nii.gz", MODEL_GRID)
    assert not warnings
    assert np.allclose(t.t1, t1) and np.array_equal(t.labels, idx) and t.probs.shape == (N_CLASSES, *MODEL_GRID.shape)


def test_load_template_resamples_another_grid(tmp_path):
    t1, idx = _model_grid_template(tmp_path)
    # the same template at 1 mm (each voxel split in 8): resampled back onto the model grid, with a warning
    aff = MODEL_GRID.affine.copy()
    aff[:3, :3] /= 2
    aff[:3, 3] -= 0.5
    fine = lambda a: np.repeat(np.repeat(np.repeat(a, 2, 0), 2, 1), 2, 2)  # noqa: E731
    save_volume(fine(t1), aff, tmp_path / "t1mm.nii.gz")
    save_volume(fine(idx), aff, tmp_path / "l1mm.nii.gz", dtype=np.int32)
    t, warnings = load_template(tmp_path / "t1mm.nii.gz", tmp_path / "l1mm.nii.gz", MODEL_GRID)
    assert len(warnings) == 2 and all("resampled" in w for w in warnings)
    assert np.mean(t.labels == idx) > 0.99


def test_load_template_refuses_bad_labels(tmp_path):
    _model_grid_template(tmp_path)
    bad = np.zeros(MODEL_GRID.shape, np.int32)
    bad[20:60, 20:76, 20:60] = 101  # a MUSE id
    save_volume(bad, MODEL_GRID.affine, tmp_path / "muse.nii.gz", dtype=np.int32)
    with pytest.raises(AtlasMorphError, match="not among the 34 structures"):
        load_template(tmp_path / "t.nii.gz", tmp_path / "muse.nii.gz", MODEL_GRID)
    save_volume(np.zeros((*MODEL_GRID.shape, 3), np.float32), MODEL_GRID.affine, tmp_path / "p3.nii.gz")
    with pytest.raises(AtlasMorphError, match="must have 35 frames"):
        load_template(tmp_path / "t.nii.gz", tmp_path / "p3.nii.gz", MODEL_GRID)
    save_volume(np.zeros(MODEL_GRID.shape, np.int32), MODEL_GRID.affine, tmp_path / "empty.nii.gz", dtype=np.int32)
    with pytest.raises(AtlasMorphError, match="fewer than 1000 brain voxels"):
        load_template(tmp_path / "t.nii.gz", tmp_path / "empty.nii.gz", MODEL_GRID)
    assert set(FS_IDS) >= {2, 41}


# ----------------------------------------------------------------------------------------- command line
def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlasmorph_cli", *args], capture_output=True, text=True, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, expected: str) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and expected in lines[0], r.stderr


def test_bad_inputs_give_one_line_errors(tmp_path):
    t1, _ = _model_grid_template(tmp_path)
    save_volume(t1, MODEL_GRID.affine, tmp_path / "a.nii.gz")
    (tmp_path / "one.txt").write_text("a.nii.gz\n")
    one_line_error(run("build", str(tmp_path / "one.txt"), "-o", str(tmp_path / "o.nii.gz")), "at least 2 subjects")
    (tmp_path / "two.txt").write_text("a.nii.gz\nt.nii.gz\n")
    two = str(tmp_path / "two.txt")
    one_line_error(run("build", two, "-o", str(tmp_path / "a.nii.gz")), "would destroy the input")
    one_line_error(run("build", two, "-o", str(tmp_path / "o.nii.gz"), "--initial", str(tmp_path / "t.nii.gz")),
                   "--initial-labels")
    one_line_error(run("build", two, "-o", str(tmp_path / "o.nii.gz"), "--report", str(tmp_path / "r.txt")), ".json")
    one_line_error(run("build", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o.nii.gz")), "no such file")
    one_line_error(run("segment", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "s.nii.gz"), "--template",
                       str(tmp_path / "t.nii.gz")), "--template-labels")
    one_line_error(run("segment", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "s.nii.gz"), "--template",
                       str(tmp_path / "t.nii.gz"), "--template-labels", str(tmp_path / "l.nii.gz"), "--age", "40"),
                   "excludes --age")


def test_nipype_build_and_template_inputs(tmp_path):
    pytest.importorskip("nipype")
    from atlasmorph_cli.interfaces.nodes import Build, Segment

    _model_grid_template(tmp_path)
    (tmp_path / "c.txt").write_text("t.nii.gz\n")
    b = Build(in_file=str(tmp_path / "c.txt"), iterations=2, hires_file=True)
    assert b.cmdline.startswith("atlasmorph build ") and "--iterations 2" in b.cmdline
    assert "--hires template_hires.nii.gz" in b.cmdline
    s = Segment(in_file=str(tmp_path / "t.nii.gz"), template=str(tmp_path / "t.nii.gz"),
                template_labels=str(tmp_path / "l.nii.gz"))
    assert f"--template {tmp_path / 't.nii.gz'}" in s.cmdline and "--template-labels" in s.cmdline


# ----------------------------------------------------------------------------------------- real data
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    from atlasmorph_cli.labels import to_index

    a, b = to_index(a, "freesurfer"), to_index(b)
    return float(np.mean([2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c))
                          for c in range(1, N_CLASSES) if np.any(b == c)]))


def test_build_three_ixi_subjects_then_segment_with_it(tmp_path, data_dir, ixi_rows):
    """3 real subjects, 1 iteration: a template in MNI space that `segment --template` uses at once."""
    ixi = data_dir / "ixi"
    with open(tmp_path / "group.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "t1", "seg", "age", "sex"])
        for r in ixi_rows[:3]:
            w.writerow([r["subject"], ixi / r["t1"], ixi / r["seg"], r["age"], r["sex"]])
    out = tmp_path / "tpl.nii.gz"
    r = run("build", str(tmp_path / "group.csv"), "-o", str(out), "--labels", str(tmp_path / "lab.nii.gz"),
            "--iterations", "1", "--refine", "2", "--report", str(tmp_path / "rep.json"), "--threads", "2", "-q",
            "--hires", str(tmp_path / "hires.nii.gz"))
    assert r.returncode == 0, r.stderr
    img = nib.load(str(out))
    assert img.shape == MODEL_GRID.shape and np.allclose(img.affine, MODEL_GRID.affine)
    # IXI's inputs are 2 mm: --hires is on the model grid, averaged from the native images the same way
    hires = nib.load(str(tmp_path / "hires.nii.gz"))
    assert hires.shape == MODEL_GRID.shape and np.allclose(hires.affine, MODEL_GRID.affine)
    assert np.allclose(hires.get_fdata(), img.get_fdata(), atol=1e-4)
    import json

    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["used"] == 3 and len(rep["iterations"]) == 1 and rep["labels"] == "averaged subject segmentations"
    assert rep["hires"] == {"voxel_mm": 2.0, "shape": list(MODEL_GRID.shape)}
    row = ixi_rows[4]  # a subject not in the group, brain-extracted by its own seg
    t1 = nib.load(str(ixi / row["t1"]))
    seg = np.asarray(nib.load(str(ixi / row["seg"])).dataobj)
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, np.float32) * (seg > 0), t1.affine), str(tmp_path / "b.nii.gz"))
    r = run("segment", str(tmp_path / "b.nii.gz"), "-o", str(tmp_path / "s.nii.gz"), "--template", str(out),
            "--template-labels", str(tmp_path / "lab.nii.gz"), "--refine", "2", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert _dice(np.asarray(nib.load(str(tmp_path / "s.nii.gz")).dataobj), seg) > 0.7


def test_registration_with_a_kept_affine_is_register_subjects(data_dir, ixi_rows):
    """build's later iterations skip the affine fit: given the first fit's affine, register_subject gives the
    same result as fitting it."""
    from atlasmorph_cli.cli.build import _on_grid
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes, make_template
    from atlasmorph_cli.io.volumes import Volume, load_volume
    from atlasmorph_cli.model.shipped import load

    _, model = load(None, 1)
    template = make_template(model, encode_attributes(model, None)[0])
    row = ixi_rows[0]
    subj = load_volume(data_dir / "ixi" / row["t1"])
    mask = Volume((load_volume(data_dir / "ixi" / row["seg"]).data > 0).astype(np.float32), subj.affine)
    first = register_subject(model, subj, None, mask, refine=3, template=template)
    kept = register_subject(model, subj, None, mask, refine=3, template=template, world=first.world)
    assert torch.equal(kept.velocity, first.velocity) and np.array_equal(kept.world, first.world)
    # _on_grid on the template grid itself is Registration.subject_to_template; on a 3x finer box of it,
    # every third point is a template voxel and gets the same value (float32 rounding of two composition orders of
    # the same map: up to 1.5e-5 in [0, 1] intensities with v2's warp, so both checks allow 1e-4)
    moved = first.subject_to_template()
    assert np.allclose(_on_grid(first, template.grid), moved, atol=1e-4)
    box = Grid((30, 30, 30), template.grid.affine @ np.diag([1 / 3, 1 / 3, 1 / 3, 1.0]) @ _shift(60.0))
    assert np.allclose(_on_grid(first, box)[::3, ::3, ::3], moved[20:30, 20:30, 20:30], atol=1e-4)


def _shift(v: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = v
    return m
