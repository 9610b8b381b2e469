"""template / register / segment on a real IXI subject, with a model whose template is the MNI152 atlas.

The registration network is untrained (its velocity head starts at ~0), so these tests check the
geometry end to end: affine fit, one-interpolation resampling into native space, headers, label ids,
warp files that nitransforms reads and applies to the same result as the tool.
"""
from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from atlasmorph_cli.model.attributes import AttributeEncoder
from atlasmorph_cli.cli import app
from atlasmorph_cli.labels import FS_IDS, to_index
from atlasmorph_cli.training.metrics import mean_dice
from atlasmorph_cli.model.model_file import AtlasMorph, ModelConfig, save_model
from atlasmorph_cli.geometry.space import MODEL_GRID

runner = CliRunner()


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_template_outputs(tmp_path, mni_model):
    invoke("template", "--age", 70, "--sex", "F", "-o", tmp_path / "t.nii.gz", "--labels", tmp_path / "l.nii.gz",
           "--probs", tmp_path / "p.nii.gz", "--model", mni_model)
    t, lab, p = (nib.load(str(tmp_path / n)) for n in ("t.nii.gz", "l.nii.gz", "p.nii.gz"))
    for img in (t, lab, p):
        np.testing.assert_allclose(img.affine, MODEL_GRID.affine)
        assert int(img.header["sform_code"]) == 4
    assert t.shape == MODEL_GRID.shape and p.shape == (*MODEL_GRID.shape, 35)
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, *FS_IDS} and len(np.unique(np.asarray(lab.dataobj))) > 30
    np.testing.assert_allclose(np.asarray(p.dataobj).sum(-1), 1.0, atol=1e-4)


def test_template_trajectory_and_montage(tmp_path, mni_model):
    invoke("template", "--age", "30:70:20", "--sex", "M", "-o", tmp_path / "traj.nii.gz", "--png",
           tmp_path / "m.png", "--model", mni_model)
    assert sorted(p.name for p in tmp_path.glob("traj_age-*.nii.gz")) == [
        "traj_age-30.nii.gz", "traj_age-50.nii.gz", "traj_age-70.nii.gz"]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_register_outputs_live_in_the_right_spaces(tmp_path, mni_model, subject):
    path, truth, row = subject
    invoke("register", path, "--age", row["age"], "--sex", row["sex"], "--model", mni_model,
           "-o", tmp_path / "moved.nii.gz", "-O", tmp_path / "tmpl_native.nii.gz", "--labels",
           tmp_path / "lab.nii.gz", "-t", tmp_path / "fwd.nii.gz", "-T", tmp_path / "inv.nii.gz",
           "--jacobian", tmp_path / "jac.nii.gz", "--affine", tmp_path / "aff.txt")
    src = nib.load(str(path))
    for name in ("tmpl_native.nii.gz", "lab.nii.gz", "inv.nii.gz"):
        img = nib.load(str(tmp_path / name))
        assert img.shape[:3] == src.shape and nib.aff2axcodes(img.affine) == ("P", "S", "R")
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
    for name in ("moved.nii.gz", "fwd.nii.gz", "jac.nii.gz"):
        np.testing.assert_allclose(nib.load(str(tmp_path / name)).affine, MODEL_GRID.affine)
    fwd = nib.load(str(tmp_path / "fwd.nii.gz"))
    assert fwd.shape == (*MODEL_GRID.shape, 1, 3) and fwd.header.get_intent()[0] == "vector" or \
        int(fwd.header["intent_code"]) == 1006
    lab = to_index(np.asarray(nib.load(str(tmp_path / "lab.nii.gz")).dataobj), "freesurfer")
    assert mean_dice(lab, truth) > 0.5  # affine-only (untrained RegNet) atlas labels on the subject
    assert (tmp_path / "aff.txt").read_text().startswith("#Insight Transform File V1.0")


@pytest.mark.parametrize("fmt", ["fs", "itk"])
def test_warp_files_applied_by_nitransforms_match_the_tool(tmp_path, mni_model, subject, fmt):
    from nitransforms.io.itk import ITKDisplacementsField
    from nitransforms.nonlinear import DenseFieldTransform
    from nitransforms.resampling import apply

    path, _, row = subject
    invoke("register", path, "--age", row["age"], "--sex", row["sex"], "--model", mni_model, "-o",
           tmp_path / "moved.nii.gz", "-t", tmp_path / "w.nii.gz", "--warp-format", fmt)
    w = nib.load(str(tmp_path / "w.nii.gz"))
    if fmt == "itk":
        assert int(w.header["intent_code"]) == 1007
        field = ITKDisplacementsField.from_filename(str(tmp_path / "w.nii.gz"))
    else:
        assert int(w.header["intent_code"]) == 1006
        field = nib.Nifti1Image(np.asarray(w.dataobj)[:, :, :, 0, :], w.affine)
    xfm = DenseFieldTransform(field, is_deltas=True, reference=field)
    theirs = np.asarray(apply(xfm, str(path), reference=field, order=1).dataobj)
    ours = np.asarray(nib.load(str(tmp_path / "moved.nii.gz")).dataobj)
    brain = ours > 0.05 * ours.max()
    assert np.corrcoef(ours[brain], theirs[brain])[0, 1] > 0.99
    assert np.median(np.abs(ours[brain] - theirs[brain])) < 0.02 * ours.max()


def test_segment_and_volumes(tmp_path, mni_model, subject):
    path, truth, row = subject
    invoke("segment", path, "--age", row["age"], "--sex", row["sex"], "--model", mni_model, "-o",
           tmp_path / "seg.nii.gz", "--vol", tmp_path / "vol.csv", "--probs", tmp_path / "p.nii.gz")
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    np.testing.assert_allclose(seg.affine, nib.load(str(path)).affine, atol=1e-4)
    assert mean_dice(to_index(np.asarray(seg.dataobj), "freesurfer"), truth) > 0.5
    rows = list(csv.DictReader(open(tmp_path / "vol.csv")))
    assert len(rows) == 1 and 800e3 < float(rows[0]["total_brain"]) < 2000e3
    assert float(rows[0]["Left-Hippocampus"]) > 1000
    assert nib.load(str(tmp_path / "p.nii.gz")).shape == (*nib.load(str(path)).shape, 35)


def test_outputs_only_when_asked(tmp_path, mni_model, subject):
    path, _, row = subject
    r = runner.invoke(app, ["register", str(path), "--model", str(mni_model)])
    assert r.exit_code != 0
    assert list(tmp_path.iterdir()) == []


def test_refinement_lowers_the_image_loss_on_a_real_subject(mni_model, subject):
    """Instance optimisation moves the template toward the subject (the loss it minimises goes down)."""
    from atlasmorph_cli.io.volumes import load_volume
    from atlasmorph_cli.model.model_file import load_model
    from atlasmorph_cli.model.layers import warp
    from atlasmorph_cli.model.losses import mse
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.geometry.space import resample

    path, _, row = subject
    model, vol = load_model(mni_model), load_volume(path)
    vec, _ = encode_attributes(model, {"age": row["age"], "sex": row["sex"]})
    plain, refined = register_subject(model, vol, vec, refine=0), register_subject(model, vol, vec, refine=10)
    np.testing.assert_allclose(refined.world, plain.world)  # the affine part is not touched
    x = torch.from_numpy(resample(plain.brain, vol.affine, plain.grid, world=plain.world))[None, None]
    t1 = torch.from_numpy(plain.template.t1)[None, None]
    loss = {k: mse(warp(t1, r.template_to_subject_field[None]), x).item() for k, r in (("plain", plain), ("refined", refined))}
    assert loss["refined"] < 0.9 * loss["plain"], loss
    assert refined.template_to_subject_field.abs().max() > 0.1  # it did move


@pytest.mark.parametrize("extra,expect", [([], 5), (["--refine", "0"], 0), (["--refine", "3"], 3)])
def test_refine_option_reaches_the_registration(tmp_path, mni_model, subject, monkeypatch, extra, expect):
    """`segment --refine N` hands N to the registration (the default, 5, when not given); nothing is written when it stops."""
    from atlasmorph_cli.cli import run as commands
    from atlasmorph_cli.errors import AtlasMorphError

    seen = {}

    def fake_register(*args, refine, **kw):
        seen["refine"] = refine
        raise AtlasMorphError("stopped after the option check")

    monkeypatch.setattr(commands, "register_subject", fake_register)
    path, _, row = subject
    r = runner.invoke(app, [str(a) for a in ("segment", path, "--age", row["age"], "--sex", row["sex"], "--model",
                                             mni_model, "-o", tmp_path / "seg.nii.gz", *extra)])
    assert r.exit_code == 1 and seen == {"refine": expect}
    assert not (tmp_path / "seg.nii.gz").exists()


def test_thick_slices_on_their_own_grid_are_refined_against_a_blurred_template(tmp_path, mni_model, subject,
                                                                                monkeypatch):
    """A 2 x 2 x 6 mm acquisition stored on its own grid: `segment` reads the slice thickness from the header, its
    refinement blurs the template along the model's S-I axis by 3 voxels, and the labels come out on that grid."""
    from atlasmorph_cli.inference import registration

    path, _, row = subject
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    axis = int(np.argmax(np.abs(img.affine[2, :3])))  # the voxel axis nearest S-I
    n = data.shape[axis] // 3
    thick = np.stack([np.take(data, range(3 * k, 3 * k + 3), axis=axis).mean(axis) for k in range(n)], axis=axis)
    step = np.eye(4)
    step[axis, axis], step[axis, 3] = 3.0, 1.0
    nib.save(nib.Nifti1Image(thick, img.affine @ step), str(tmp_path / "thick.nii.gz"))
    seen = {}
    original = registration.refine_velocity

    def spy(*args, blur, **kw):
        seen["blur"] = blur
        return original(*args, blur=blur, **kw)

    monkeypatch.setattr(registration, "refine_velocity", spy)
    invoke("segment", tmp_path / "thick.nii.gz", "--age", row["age"], "--sex", row["sex"], "--model", mni_model,
           "-o", tmp_path / "seg.nii.gz")
    assert seen["blur"] == (1, 1, 3)
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    assert seg.shape == thick.shape
    np.testing.assert_allclose(seg.affine, img.affine @ step, atol=1e-4)
