"""Built-in brain extraction: which mask is used for which input, deepbet on real whole-head scans, outputs."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from atlasmorph_cli.inference.brain_extraction import extract_brain, resolve_brain
from atlasmorph_cli.cli import app
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.io.volumes import Volume, load_volume
from atlasmorph_cli.labels import to_index
from atlasmorph_cli.training.metrics import mean_dice

from synthetic import phantom

runner = CliRunner()


def dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ------------------------------------------------------------------------ rules (synthetic, no extraction)
def test_a_skull_stripped_image_is_used_as_it_is():
    t1, seg, aff = phantom(50.0)
    b = resolve_brain(Volume(t1, aff))
    assert b.source == "skullstripped" and np.array_equal(b.mask, t1 != 0) and not b.warnings


def test_skullstripped_flag_skips_extraction_even_for_a_big_image():
    data = np.random.default_rng(0).uniform(1, 2, (100, 100, 100)).astype(np.float32)  # 8 L of non-zero voxels
    b = resolve_brain(Volume(data, np.diag([2.0, 2, 2, 1])), skullstripped=True)
    assert b.source == "skullstripped" and b.mask.all()


def test_a_probabilistic_mask_is_thresholded_at_one_half_with_a_warning():
    from scipy.ndimage import gaussian_filter

    t1, seg, aff = phantom(50.0)
    prob = gaussian_filter((seg > 0).astype(np.float32), 2.0)  # smoothed: > 0 far outside the brain
    b = resolve_brain(Volume(t1, aff), Volume(prob, aff, source="m.nii.gz"))
    assert (prob > 0).sum() > 1.5 * (seg > 0).sum()
    assert b.source == "mask" and dice(b.mask, seg > 0) > 0.95
    assert len(b.warnings) == 1 and "m.nii.gz" in b.warnings[0] and ">= 0.5" in b.warnings[0]


def test_a_label_map_as_mask_is_read_as_greater_than_zero():
    t1, seg, aff = phantom(50.0)
    b = resolve_brain(Volume(t1, aff), Volume(seg.astype(np.float32), aff))
    assert np.array_equal(b.mask, seg > 0) and not b.warnings


def test_mask_and_skullstripped_exclude_each_other():
    t1, seg, aff = phantom(50.0)
    with pytest.raises(AtlasMorphError, match="exclude each other"):
        resolve_brain(Volume(t1, aff), Volume(seg.astype(np.float32), aff), skullstripped=True)


# ------------------------------------------------------------------------ deepbet on real whole-head scans
@pytest.fixture(scope="module")
def whole_head(data_dir, ixi_rows):
    row = ixi_rows[5]
    return load_volume(data_dir / "ixi" / row["t1"]), np.asarray(nib.load(str(data_dir / "ixi" / row["seg"])).dataobj), row


def test_whole_head_scan_is_detected_and_extracted(whole_head):
    vol, seg, _ = whole_head
    b = resolve_brain(vol)
    assert b.source == "extracted" and b.mask.shape == vol.shape
    assert dice(b.mask, seg > 0) > 0.96


def test_extraction_does_not_depend_on_the_voxel_order(whole_head):
    """The same scan stored in another voxel order (LAS instead of PSR) gives the same mask, voxel for voxel."""
    vol, seg, _ = whole_head
    ref = extract_brain(vol)
    img = nib.Nifti1Image(vol.data, vol.affine)
    las = nib.orientations.axcodes2ornt(("L", "A", "S"))
    tr = nib.orientations.ornt_transform(nib.io_orientation(vol.affine), las)
    img2 = img.as_reoriented(tr)
    m2 = extract_brain(Volume(np.asarray(img2.dataobj, dtype=np.float32), img2.affine))
    back = nib.orientations.apply_orientation(m2, nib.orientations.ornt_transform(las, nib.io_orientation(vol.affine)))
    assert np.array_equal(back, ref)


def test_segment_whole_head_writes_brain_and_mask_in_the_input_space(tmp_path, whole_head, mni_model):
    vol, seg, row = whole_head
    src = vol.source
    r = runner.invoke(app, [str(a) for a in (
        "segment", src, "--age", row["age"], "--sex", row["sex"], "--model", mni_model, "--threads", 1,
        "-o", tmp_path / "seg.nii.gz", "--brain-mask", tmp_path / "mask.nii.gz", "--brain", tmp_path / "b.nii.gz")])
    assert r.exit_code == 0, (r.output, r.exception)
    mask, brain, lab = (nib.load(str(tmp_path / n)) for n in ("mask.nii.gz", "b.nii.gz", "seg.nii.gz"))
    for img in (mask, brain, lab):
        assert img.shape == vol.shape and np.allclose(img.affine, vol.affine, atol=1e-4)
    m = np.asarray(mask.dataobj)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(m)) == {0, 1} and dice(m > 0, seg > 0) > 0.96
    b = np.asarray(brain.dataobj)
    assert np.array_equal(b != 0, (m > 0) & (vol.data != 0)) and np.allclose(b[m > 0], vol.data[m > 0])
    # an affine-only (untrained RegNet) segmentation of the extracted brain: as good as with the subject's mask
    assert mean_dice(to_index(np.asarray(lab.dataobj), "freesurfer"), to_index(seg)) > 0.5


def test_batch_whole_head_writes_brain_masks(tmp_path, whole_head, mni_model):
    vol, seg, row = whole_head
    (tmp_path / "list.txt").write_text(f"{vol.source}\n")
    out = tmp_path / "out"
    r = runner.invoke(app, [str(a) for a in (
        "segment", tmp_path / "list.txt", "--age", row["age"], "--sex", row["sex"], "--out-dir", out,
        "--outputs", "dseg,brainmask,brain", "--model", mni_model, "--threads", 1)])
    assert r.exit_code == 0, (r.output, r.exception)
    label = row["subject"].replace("-", "") + "T1"  # the id is the file name without its suffix
    names = sorted(x.name for x in out.iterdir())
    assert names == [f"sub-{label}_desc-atlasmorph_dseg.nii.gz", f"sub-{label}_desc-atlasmorph_qc.json",
                     f"sub-{label}_desc-brain_T1w.nii.gz", f"sub-{label}_desc-brain_mask.nii.gz", "volumes.csv"]
    m = np.asarray(nib.load(str(out / f"sub-{label}_desc-brain_mask.nii.gz")).dataobj) > 0
    assert dice(m, seg > 0) > 0.96


def test_no_network_access_is_needed():
    """deepbet's weights ship in its wheel: the model files exist locally (nothing is downloaded)."""
    from deepbet.utils import DATA_PATH

    for name in ("model.pt", "bbox_model.pt"):
        assert os.path.getsize(os.path.join(DATA_PATH, "models", name)) > 1_000_000


def test_nipype_interfaces_pass_the_brain_options(tmp_path, monkeypatch):
    from atlasmorph_cli.interfaces.nodes import Register, Segment

    monkeypatch.chdir(tmp_path)
    t1 = tmp_path / "s01_T1w.nii.gz"
    t1.write_bytes(b"")
    s = Segment(in_file=str(t1), brain_mask_file=True, brain_file="b.nii.gz")
    assert "--brain-mask s01_T1w_brainmask.nii.gz" in s.cmdline and "--brain b.nii.gz" in s.cmdline
    assert s._list_outputs()["brain_mask_file"] == str(tmp_path / "s01_T1w_brainmask.nii.gz")
    r = Register(in_file=str(t1), skullstripped=True)
    assert "--skullstripped" in r.cmdline and "--brain" not in r.cmdline
