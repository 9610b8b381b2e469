"""Reliability and safety as a user meets them.

* Every bad input gives ONE line on stderr (`atlasmorph: error: ...`), a non-zero exit, no
  traceback, and leaves no output file behind; `--debug` shows the traceback.
* Outputs appear all together or not at all, even when a run fails while writing.
* A training run killed with SIGKILL resumes to exactly the weights of an uninterrupted run.
* The same input gives byte-identical outputs.
* Model files: pickles are refused, a shipped model must match its published sha256.

The bad-input cases (CASES) also generate the table in docs/reliability.md
(`python benchmarks/error_table.py`). Everything here uses synthetic volumes and a tiny model on
SMALL_GRID, so no real data is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from atlasmorph_cli.cli import run as commands_mod
from atlasmorph_cli.model import model_file as model_mod
from atlasmorph_cli.model import shipped as shipped_mod
from atlasmorph_cli.cli import main
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.geometry import transforms
from atlasmorph_cli.io.volumes import all_or_nothing, save_volume
from synthetic import SMALL_GRID, phantom, small_model, write_cohort

TESTS = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------- bad inputs
AGE = ["--age", "50", "--sex", "F"]
MODEL = ["-m", "in/model.safetensors"]
RO = "{ro}"  # an output folder that cannot be written (a read-only folder; /proc when running as root)

# (command, the bad input, command line, a part of the expected message).
# The command runs in a fresh folder holding `in/` (the inputs made by make_inputs) and an empty `out/`.
CASES: list[tuple[str, str, list[str], str]] = [
    ("register", "input file does not exist", ["register", "in/absent.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"],
     "no such file"),
    ("register", "input is a text file named .nii.gz", ["register", "in/text.nii.gz", *AGE, *MODEL, "-o",
                                                         "out/m.nii.gz"], "not a readable image"),
    ("register", "input has an unsupported file type", ["register", "in/brain.png", *AGE, *MODEL, "-o",
                                                         "out/m.nii.gz"], "unsupported file type"),
    ("register", "truncated .nii.gz", ["register", "in/truncated.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"],
     "not a readable image"),
    ("register", "2D image", ["register", "in/slice2d.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"],
     "expected a 3D image"),
    ("register", "4D image with 3 frames", ["register", "in/frames4d.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"],
     "4D image with 3 frames"),
    ("register", "all-zero image", ["register", "in/zeros.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"],
     "all zeros"),
    ("register", "NaN voxels", ["register", "in/nan.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"], "NaN or Inf"),
    ("register", "Inf voxels", ["register", "in/inf.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"], "NaN or Inf"),
    ("register", "50 mm voxels", ["register", "in/voxel50mm.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"],
     "implausible voxel-to-world affine"),
    ("register", "singular affine", ["register", "in/singular.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"],
     "implausible voxel-to-world affine"),
    ("register", "mask on another grid", ["register", "in/brain.nii.gz", "--mask", "in/mask_other_grid.nii.gz",
                                          *AGE, *MODEL, "-o", "out/m.nii.gz"], "mask is on another grid"),
    ("register", "negative age", ["register", "in/brain.nii.gz", "--age", "-5", "--sex", "F", *MODEL, "-o",
                                  "out/m.nii.gz"], "age must be between 0 and 130"),
    ("register", "age not a number", ["register", "in/brain.nii.gz", "--age", "old", "--sex", "F", *MODEL, "-o",
                                      "out/m.nii.gz"], "Invalid value for '--age'"),
    ("register", "age NaN", ["register", "in/brain.nii.gz", "--age", "nan", "--sex", "F", *MODEL, "-o",
                             "out/m.nii.gz"], "age must be a number"),
    ("register", "unknown sex", ["register", "in/brain.nii.gz", "--age", "50", "--sex", "X", *MODEL, "-o",
                                 "out/m.nii.gz"], "unknown sex 'X'"),
    ("register", "no output asked for", ["register", "in/brain.nii.gz", *AGE, *MODEL], "no output requested"),
    ("register", "output folder does not exist", ["register", "in/brain.nii.gz", *AGE, *MODEL, "-o",
                                                  "out/nope/m.nii.gz"], "does not exist"),
    ("register", "output folder not writable", ["register", "in/brain.nii.gz", *AGE, *MODEL, "-o",
                                                f"{RO}/m.nii.gz"], "is not writable"),
    ("register", "two outputs with one path", ["register", "in/brain.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz",
                                               "-O", "out/m.nii.gz"], "same path"),
    ("register", "model file does not exist", ["register", "in/brain.nii.gz", *AGE, "-m", "in/absent.safetensors",
                                               "-o", "out/m.nii.gz"], "no such model file"),
    ("register", "model is a text file", ["register", "in/brain.nii.gz", *AGE, "-m", "in/text.safetensors", "-o",
                                          "out/m.nii.gz"], "not a safetensors model file"),
    ("register", "model is safetensors but not AtlasMorph", ["register", "in/brain.nii.gz", *AGE, "-m",
                                                             "in/other.safetensors", "-o", "out/m.nii.gz"],
     "not an AtlasMorph model"),
    ("register", "model is a training checkpoint", ["register", "in/brain.nii.gz", *AGE, "-m",
                                                    "in/checkpoint.safetensors", "-o", "out/m.nii.gz"],
     "training checkpoint"),
    ("register", "model is a torch .pt file", ["register", "in/brain.nii.gz", *AGE, "-m", "in/model.pt", "-o",
                                               "out/m.nii.gz"], "refusing a pickle"),
    ("register", "model is a pickle", ["register", "in/brain.nii.gz", *AGE, "-m", "in/model.pkl", "-o",
                                       "out/m.nii.gz"], "refusing a pickle"),
    ("register", "torch.save zip renamed .safetensors", ["register", "in/brain.nii.gz", *AGE, "-m",
                                                         "in/renamed_pt.safetensors", "-o", "out/m.nii.gz"],
     "refusing a pickle"),
    ("register", "model of a newer format version", ["register", "in/brain.nii.gz", *AGE, "-m",
                                                     "in/version99.safetensors", "-o", "out/m.nii.gz"],
     "format version 99 is not supported"),
    ("segment", "input file does not exist", ["segment", "in/absent.nii.gz", *AGE, *MODEL, "-o", "out/s.nii.gz"],
     "no such file"),
    ("segment", "4D image with 3 frames", ["segment", "in/frames4d.nii.gz", *AGE, *MODEL, "-o", "out/s.nii.gz"],
     "4D image with 3 frames"),
    ("segment", "NaN voxels", ["segment", "in/nan.nii.gz", *AGE, *MODEL, "-o", "out/s.nii.gz"], "NaN or Inf"),
    ("segment", "negative --refine", ["segment", "in/brain.nii.gz", *AGE, *MODEL, "--refine", "-1", "-o",
                                      "out/s.nii.gz"], "Invalid value for '--refine'"),
    ("segment", "mask on another grid", ["segment", "in/brain.nii.gz", "--mask", "in/mask_other_grid.nii.gz", *AGE,
                                         *MODEL, "-o", "out/s.nii.gz"], "mask is on another grid"),
    ("segment", "unknown sex", ["segment", "in/brain.nii.gz", "--age", "50", "--sex", "unknown", *MODEL, "-o",
                                "out/s.nii.gz"], "unknown sex"),
    ("segment", "output folder not writable", ["segment", "in/brain.nii.gz", *AGE, *MODEL, "-o", f"{RO}/s.nii.gz"],
     "is not writable"),
    ("segment", "model is a torch .pt file", ["segment", "in/brain.nii.gz", *AGE, "-m", "in/model.pt", "-o",
                                              "out/s.nii.gz"], "refusing a pickle"),
    ("template", "negative age", ["template", "--age", "-5", "--sex", "F", *MODEL, "-o", "out/t.nii.gz"],
     "age must be between 0 and 130"),
    ("template", "age not a number", ["template", "--age", "old", "--sex", "F", *MODEL, "-o", "out/t.nii.gz"],
     "--age must be a number"),
    ("template", "age range backwards", ["template", "--age", "80:20:10", "--sex", "F", *MODEL, "-o",
                                         "out/t.nii.gz"], "START:STOP:STEP"),
    ("template", "unknown sex", ["template", "--age", "50", "--sex", "X", *MODEL, "-o", "out/t.nii.gz"],
     "unknown sex 'X'"),
    ("template", "output of an unsupported type", ["template", *AGE, *MODEL, "-o", "out/t.png"],
     "unsupported file type"),
    ("template", "output folder not writable", ["template", *AGE, *MODEL, "-o", f"{RO}/t.nii.gz"],
     "is not writable"),
    ("template", "model is a pickle", ["template", *AGE, "-m", "in/model.pkl", "-o", "out/t.nii.gz"],
     "refusing a pickle"),
    ("template", "model of a newer format version", ["template", *AGE, "-m", "in/version99.safetensors", "-o",
                                                     "out/t.nii.gz"], "format version 99"),
    ("train", "cohort CSV does not exist", ["train", "--data", "in/absent.csv", "--out", "out/run"],
     "no such cohort file"),
    ("train", "cohort CSV without a t1 column", ["train", "--data", "in/no_t1_column.csv", "--out", "out/run",
                                                 "--init", "in/model.safetensors"], "missing required column 't1'"),
    ("train", "cohort row names a missing file", ["train", "--data", "in/missing_file.csv", "--out", "out/run",
                                                  "--init", "in/model.safetensors"], "row 2 (s1): t1 file not found"),
    ("train", "cohort without an attribute column", ["train", "--data", "in/no_age_column.csv", "--out",
                                                     "out/run", "--reference", "in/brain.nii.gz"],
     "no column 'age'"),
    ("train", "age not a number in one row", ["train", "--data", "in/age_typo.csv", "--out", "out/run",
                                              "--reference", "in/brain.nii.gz"], "row 2 (s1): age 'fifty'"),
    ("train", "cohort row with a NaN T1", ["train", "--data", "in/nan_t1.csv", "--out", "out/run", "--reference",
                                           "in/brain.nii.gz", "--workers", "1", "--quiet", "--val-fraction", "0.25"],
     "row 1 (s0): in/nan.nii.gz: image contains NaN"),
    ("train", "--resume without a checkpoint", ["train", "--data", "in/cohort.csv", "--out", "out/run", "--resume",
                                                "--reference", "in/brain.nii.gz"], "no checkpoint"),
    ("train", "--init with a pickle", ["train", "--data", "in/cohort.csv", "--out", "out/run", "--init",
                                       "in/model.pt"], "refusing a pickle"),
    ("train", "unknown image loss", ["train", "--data", "in/cohort.csv", "--out", "out/run", "--image-loss", "l1"],
     "--image-loss must be mse or ncc"),
    ("train", "--split file does not exist", ["train", "--data", "in/cohort.csv", "--out", "out/run", "--split",
                                              "in/absent.json"], "no such file"),
    ("train", "--split names a subject not in the cohort", ["train", "--data", "in/cohort.csv", "--out", "out/run",
                                                            "--split", "in/foreign_split.json", "--reference",
                                                            "in/brain.nii.gz"], "the cohort lacks"),
    # careless and hostile input (issue 18; more in tests/test_hostile.py)
    ("segment", "output path is the input image", ["segment", "in/brain.nii.gz", *AGE, *MODEL, "-o",
                                                   "in/brain.nii.gz"], "this output is the input image"),
    ("register", "-O is the --mask image", ["register", "in/brain.nii.gz", "--mask", "in/mask.nii.gz", *AGE, *MODEL,
                                            "-O", "in/mask.nii.gz"], "this output is the --mask image"),
    ("segment", "batch --vol is the cohort CSV", ["segment", "in/cohort.csv", *MODEL, "--out-dir", "out/d", "--vol",
                                                  "in/cohort.csv"], "this output is the cohort CSV"),
    ("segment", "--attr contradicts --sex", ["segment", "in/brain.nii.gz", "--age", "50", "--sex", "M", "--attr",
                                             "sex=F", *MODEL, "-o", "out/s.nii.gz"], "sex is given twice"),
    ("segment", "unknown attribute name", ["segment", "in/brain.nii.gz", *AGE, "--attr", "Age=99", *MODEL, "-o",
                                           "out/s.nii.gz"], "unknown attribute 'Age'"),
    ("segment", "--threads -1", ["segment", "in/brain.nii.gz", *AGE, *MODEL, "--threads", "-1", "-o", "out/s.nii.gz"],
     "Invalid value for '--threads'"),
    ("segment", "header claims 1300^3 voxels (gzip bomb)", ["segment", "in/bomb.nii.gz", *AGE, *MODEL, "-o",
                                                            "out/s.nii.gz"], "atlasmorph reads at most"),
    ("register", "mask on the same shape, another origin", ["register", "in/brain.nii.gz", "--mask",
                                                            "in/mask_shifted.nii.gz", *AGE, *MODEL, "-o",
                                                            "out/m.nii.gz"], "origin"),
    ("template", "age range with NaN", ["template", "--age", "20:nan:10", "--sex", "F", *MODEL, "-o", "out/t.nii.gz"],
     "finite"),
    ("template", "age range of 13,001 ages", ["template", "--age", "0:130:0.01", "--sex", "F", *MODEL, "-o",
                                              "out/t.nii.gz"], "at most 1000 per command"),
    ("template", "output file name over 255 bytes", ["template", *AGE, *MODEL, "-o", "out/" + "a" * 293 + ".nii.gz"],
     "file name too long"),
    ("template", "model with attribute std 0", ["template", *AGE, "-m", "in/std0.safetensors", "-o", "out/t.nii.gz"],
     "std must be finite and > 0"),
    ("template", "model with int_steps 10^7", ["template", *AGE, "-m", "in/steps.safetensors", "-o", "out/t.nii.gz"],
     "int_steps is 10000000"),
    ("train", "--out holds a finished run", ["train", "--data", "in/cohort.csv", "--out", "in/finished_run"],
     "already holds a training run"),
    ("train", "one-subject cohort", ["train", "--data", "in/one.csv", "--out", "out/run", "--reference",
                                     "in/brain.nii.gz"], "only 1 training subject"),
]


def make_inputs(folder: Path) -> Path:
    """Write every input the CASES use (synthetic; a few MB) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    t1, seg, aff = phantom(50.0)
    good = save_volume(t1, aff, folder / "brain.nii.gz")
    save_volume((seg > 0).astype(np.uint8), aff, folder / "mask.nii.gz")
    save_volume(np.ones((36, 36, 36), np.uint8), aff, folder / "mask_other_grid.nii.gz")
    (folder / "text.nii.gz").write_text("this is not an image\n")
    (folder / "brain.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    raw = gzip.decompress(good.read_bytes())
    (folder / "truncated.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    nib.save(nib.Nifti1Image(t1[:, :, 20].copy(), aff), folder / "slice2d.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([t1] * 3, -1), aff), folder / "frames4d.nii.gz")
    save_volume(np.zeros_like(t1), aff, folder / "zeros.nii.gz")
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = t1.copy()
        bad[20, 20, 20:23] = value
        nib.save(nib.Nifti1Image(bad, aff), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(t1, np.diag([50.0, 50.0, 50.0, 1.0])), folder / "voxel50mm.nii.gz")
    singular = aff.copy()
    singular[:3, 1] = singular[:3, 0]
    nib.save(nib.Nifti1Image(t1, singular), folder / "singular.nii.gz")

    model = small_model(folder / "model.safetensors")
    (folder / "text.safetensors").write_text("not a model\n")
    save_file({"w": torch.zeros(3)}, str(folder / "other.safetensors"))
    save_file({"w": torch.zeros(3)}, str(folder / "checkpoint.safetensors"),
              metadata={"step": "5", "opt_groups": "[]"})
    torch.save({"w": torch.zeros(3)}, folder / "model.pt")
    (folder / "renamed_pt.safetensors").write_bytes((folder / "model.pt").read_bytes())
    (folder / "model.pkl").write_bytes(pickle.dumps({"w": [0.0, 1.0]}))
    m = model_mod.load_model(model)
    m.config.format_version = 99
    model_mod.save_model(m, folder / "version99.safetensors")

    save_volume(t1, aff, folder / "s0.nii.gz")
    save_volume(t1, aff, folder / "s1.nii.gz")
    (folder / "cohort.csv").write_text("subject,t1,age,sex\ns0,s0.nii.gz,40,F\ns1,s1.nii.gz,60,M\n")
    (folder / "no_t1_column.csv").write_text("subject,image,age,sex\ns0,s0.nii.gz,40,F\n")
    (folder / "missing_file.csv").write_text("subject,t1,age,sex\ns0,s0.nii.gz,40,F\ns1,absent.nii.gz,60,M\n")
    (folder / "no_age_column.csv").write_text("subject,t1,sex\ns0,s0.nii.gz,F\ns1,s1.nii.gz,M\n")
    (folder / "age_typo.csv").write_text("subject,t1,age,sex\ns0,s0.nii.gz,40,F\ns1,s1.nii.gz,fifty,M\n"
                                         "s2,s0.nii.gz,70,F\n")
    (folder / "foreign_split.json").write_text('{"train": ["s0", "s9"], "validation": ["s1"]}\n')
    (folder / "nan_t1.csv").write_text("subject,t1,age,sex\ns0,nan.nii.gz,40,F\ns1,nan.nii.gz,60,M\n"
                                       "s2,nan.nii.gz,50,F\ns3,nan.nii.gz,70,M\n")  # 4: one validation subject
    (folder / "one.csv").write_text("subject,t1,age,sex\ns0,s0.nii.gz,40,F\n")
    (folder / "finished_run").mkdir()
    (folder / "finished_run" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    shifted = aff.copy()
    shifted[:3, 3] += 10
    save_volume((seg > 0).astype(np.uint8), shifted, folder / "mask_shifted.nii.gz")
    bomb = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), aff).header
    bomb.set_data_shape((1300, 1300, 1300))  # the header of a 2 MB gzip bomb (its data is never read)
    (folder / "bomb.nii.gz").write_bytes(gzip.compress(bomb.binaryblock + bytes(4 + 1000)))
    for name, key, value in (("std0", "attributes", None), ("steps", "int_steps", 10 ** 7)):
        m = model_mod.load_model(model)
        if value is None:
            m.config.attributes[0]["std"] = 0.0
        else:
            m.config.int_steps = value
        for _ in range(8):  # a header length whose low byte is 0x80 looks like a pickle to the model loader
            model_mod.save_model(m, folder / f"{name}.safetensors")
            if (folder / f"{name}.safetensors").read_bytes()[:1] != b"\x80":
                break
            m.config.name += "x"
    return folder


def unwritable_dir(base: Path) -> Path:
    """A folder no output can be written to: chmod 555 normally; root writes anywhere, so /proc then."""
    if os.name == "posix" and os.geteuid() == 0:
        return Path("/proc")
    d = base / "readonly"
    d.mkdir(exist_ok=True)
    d.chmod(0o555)
    return d


def case_folder(base: Path, inputs: Path) -> Path:
    """A working folder with `in` -> the shared inputs and an empty `out`."""
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "in").exists():
        (base / "in").symlink_to(inputs, target_is_directory=True)
    (base / "out").mkdir(exist_ok=True)
    return base


def fill(argv: list[str], base: Path) -> list[str]:
    return [a.replace(RO, str(unwritable_dir(base))) for a in argv]


def run_inprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run `atlasmorph ARGV` through the real entry point in this process; returns (exit code, stderr)."""
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["atlasmorph", *argv]
    os.chdir(cwd)
    code, err = 0, io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, err.getvalue()


def assert_clean_failure(code: int, stderr: str, expect: str, cwd: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code in (1, 2), (code, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("atlasmorph: error: "), stderr
    assert expect in lines[0], (expect, stderr)
    assert "Traceback" not in stderr
    left = [p for p in (cwd / "out").rglob("*") if not p.is_dir()]
    assert left == [], f"left behind: {left}"
    assert sorted(p.name for p in cwd.iterdir()) in (["in", "out"], ["in", "out", "readonly"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("command,what,argv,expect", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_one_line_no_output(tmp_path, inputs, command, what, argv, expect):
    cwd = case_folder(tmp_path, inputs)
    code, stderr = run_inprocess(fill(argv, cwd), cwd)
    assert_clean_failure(code, stderr, expect, cwd)


SUBPROCESS_CASES = [c for c in CASES if c[:2] in (
    ("register", "truncated .nii.gz"), ("register", "age not a number"), ("segment", "model is a torch .pt file"),
    ("template", "output folder not writable"), ("train", "cohort row names a missing file"))]


@pytest.mark.parametrize("command,what,argv,expect", SUBPROCESS_CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in SUBPROCESS_CASES])
def test_bad_input_as_a_subprocess(tmp_path, inputs, command, what, argv, expect):
    cwd = case_folder(tmp_path, inputs)
    r = subprocess.run([sys.executable, "-m", "atlasmorph_cli", *fill(argv, cwd)], capture_output=True, text=True,
                       cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert_clean_failure(r.returncode, r.stderr, expect, cwd)
    assert r.stdout == ""


def test_debug_shows_the_traceback(tmp_path, inputs):
    cwd = case_folder(tmp_path, inputs)
    code, stderr = run_inprocess(["--debug", "register", "in/nan.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz"], cwd)
    assert code == 1 and "Traceback" in stderr and "load_volume" in stderr
    assert stderr.strip().splitlines()[-1].startswith("atlasmorph: error: ")
    r = subprocess.run([sys.executable, "-m", "atlasmorph_cli", "--debug", "segment", "in/frames4d.nii.gz", *AGE,
                        *MODEL, "-o", "out/s.nii.gz"], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "4D image with 3 frames" in r.stderr


def test_unexpected_errors_are_one_line_too(tmp_path, inputs, monkeypatch):
    cwd = case_folder(tmp_path, inputs)

    def boom(*a, **k):
        raise ValueError("something\nwent wrong")

    monkeypatch.setattr(commands_mod, "register_subject", boom)
    code, stderr = run_inprocess(["segment", "in/brain.nii.gz", *AGE, *MODEL, "-o", "out/s.nii.gz"], cwd)
    assert code == 1 and stderr.count("\n") == 1
    assert stderr.startswith("atlasmorph: internal error: ValueError: something went wrong (rerun with --debug")


# ----------------------------------------------------------------------------------------- atomic outputs
def _no_space(*a, **k):
    raise OSError(28, "No space left on device")


def _fail_late(monkeypatch, module, name):
    monkeypatch.setattr(module, name, _no_space)


@pytest.mark.parametrize("command", ["segment", "register", "template"])
def test_failure_while_writing_leaves_no_output(tmp_path, inputs, monkeypatch, command):
    """The last output fails after the others were written: none of them may appear, nor temp files."""
    cwd = case_folder(tmp_path, inputs)
    if command == "segment":
        _fail_late(monkeypatch, commands_mod, "write_volumes")  # the --vol table, written last
        argv = ["segment", "in/brain.nii.gz", *AGE, *MODEL, "-o", "out/s.nii.gz", "--probs", "out/p.nii.gz", "--vol",
                "out/v.csv"]
    elif command == "register":
        # the ITK text writer of --affine fails, after -o and -t were written
        monkeypatch.setitem(transforms.FORMATS, "itk-txt", dataclasses.replace(transforms.FORMATS["itk-txt"],
                                                                               write=_no_space))
        argv = ["register", "in/brain.nii.gz", *AGE, *MODEL, "-o", "out/m.nii.gz", "-t", "out/w.nii.gz", "--labels",
                "out/l.nii.gz", "--affine", "out/a.txt"]
    else:
        from atlasmorph_cli.inference import report

        _fail_late(monkeypatch, report, "template_montage")
        argv = ["template", "--age", "30:70:20", "--sex", "F", *MODEL, "-o", "out/t.nii.gz", "--labels",
                "out/l.nii.gz", "--png", "out/t.png"]
    code, stderr = run_inprocess(argv, cwd)
    errors = [ln for ln in stderr.splitlines() if not ln.startswith("warning: ")]  # e.g. the quality check's
    assert code == 1 and "No space left on device" in stderr and len(errors) == 1
    assert list((cwd / "out").iterdir()) == []
    monkeypatch.undo()  # and the same command without the fault writes everything
    code, stderr = run_inprocess(argv, cwd)
    assert code == 0, stderr
    assert not [p for p in (cwd / "out").iterdir() if ".part" in p.name or ".probe" in p.name]
    assert len(list((cwd / "out").iterdir())) == {"segment": 3, "register": 4, "template": 7}[command]


def test_all_or_nothing_commits_together(tmp_path):
    with pytest.raises(RuntimeError):
        with all_or_nothing():
            save_volume(np.ones((3, 3, 3)), np.eye(4), tmp_path / "a.nii.gz")
            assert not (tmp_path / "a.nii.gz").exists()  # not yet renamed
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with all_or_nothing():
        save_volume(np.ones((3, 3, 3)), np.eye(4), tmp_path / "a.nii.gz")
        save_volume(np.ones((3, 3, 3)), np.eye(4), tmp_path / "b.mgz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.mgz"]


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one intact and no temporary file."""
    from atlasmorph_cli.training import checkpoints as checkpoints_mod
    from atlasmorph_cli.model.model_file import AtlasMorph, ModelConfig

    model = AtlasMorph(ModelConfig(name="t", grid=SMALL_GRID.to_dict(), attributes=[], template_width=8))
    opt = torch.optim.Adam(model.parameters())
    gen = torch.Generator().manual_seed(0)
    memory = {"fields": torch.zeros(2, 3, 8, 8, 8), "filled": torch.zeros(2, dtype=torch.bool)}
    ckpt = tmp_path / "checkpoint.safetensors"
    checkpoints_mod.save_checkpoint(ckpt, model, opt, gen, 5, memory, [], "{}")
    before = ckpt.read_bytes()
    real = checkpoints_mod.save_file

    def half_then_kill(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])  # a partial file, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints_mod, "save_file", half_then_kill)
    with pytest.raises(KeyboardInterrupt):
        checkpoints_mod.save_checkpoint(ckpt, model, opt, gen, 10, memory, [], "{}")
    assert ckpt.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


# ----------------------------------------------------------------------------------------- SIGKILL + resume
# The real CLI (`atlasmorph train`, parsing and all), on the tiny grid and network of tests/test_train.py.
TRAIN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from synthetic import SMALL_GRID, small_reference
import atlasmorph_cli.training.reference as R
import atlasmorph_cli.training.loop as T

_train = T.train
def small_train(s, reference):
    s.grid, s.template_width = SMALL_GRID, 8
    return _train(s, small_reference())
T.train = small_train
R.training_reference = lambda reference, init: None
from atlasmorph_cli.cli import main
sys.argv = ["atlasmorph", "train", *sys.argv[1:]]
main()
"""

STEPS = 40


def _train_cmd(script: Path, csv: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(script), "--data", str(csv), "--out", str(out), "--cache", str(csv.parent / "cache"),
            "--steps", str(STEPS), "--checkpoint-every", "5", "--val-every", "10", "--lr", "3e-3", "--workers", "1",
            "--threads", "1", "--quiet", *extra]


def test_sigkill_then_resume_gives_the_same_model(tmp_path):
    csv = write_cohort(tmp_path / "cohort", n=8)
    script = tmp_path / "train_small.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    t0 = time.time()
    straight = tmp_path / "straight"
    r = subprocess.run(_train_cmd(script, csv, straight), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    t_straight = time.time() - t0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(script, csv, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoint.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    delay = random.Random().uniform(0.0, 1.0)  # a random moment: mid-step, mid-validation or mid-write
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before it could be killed; raise STEPS"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    killed_at = int(load_file_meta(killed / "checkpoint.safetensors")["step"])
    assert 5 <= killed_at < STEPS

    r = subprocess.run(_train_cmd(script, csv, killed, "--resume"), capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill at step {killed_at} + resume"
    # same weights and same configuration: the very same file, and the same loss history
    assert (straight / "model.safetensors").read_bytes() == (killed / "model.safetensors").read_bytes()
    assert (straight / "history.csv").read_text() == (killed / "history.csv").read_text()
    assert not list(killed.glob(".*part*"))
    print(f"killed {delay:.2f} s after the first checkpoint (last checkpoint: step {killed_at}); "
          f"uninterrupted run {t_straight:.1f} s")


def load_file_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ----------------------------------------------------------------------------------------- reproducibility
def test_same_input_gives_the_same_bytes(tmp_path, inputs):
    cwd = case_folder(tmp_path, inputs)
    outs = {}
    for run in ("a", "b"):
        (cwd / "out" / run).mkdir()
        for argv in (
            ["template", "--age", "63", "--sex", "M", *MODEL, "-o", f"out/{run}/t.nii.gz", "--labels",
             f"out/{run}/l.mgz", "--probs", f"out/{run}/p.nii.gz"],
            ["segment", "in/brain.nii.gz", *AGE, *MODEL, "-o", f"out/{run}/s.nii.gz", "--probs", f"out/{run}/sp.nii",
             "--vol", f"out/{run}/v.csv"],
            ["register", "in/brain.nii.gz", *AGE, *MODEL, "-o", f"out/{run}/m.nii.gz", "-T", f"out/{run}/w.nii.gz",
             "--affine", f"out/{run}/a.txt"],
        ):
            code, stderr = run_inprocess(argv, cwd)
            assert code == 0, stderr
        outs[run] = {p.name: p.read_bytes() for p in sorted((cwd / "out" / run).iterdir())}
        time.sleep(1.1)  # a different second: a time stamp in any header would show
    assert len(outs["a"]) == 9 and outs["a"].keys() == outs["b"].keys()
    for name in outs["a"]:
        assert outs["a"][name] == outs["b"][name], name
    assert outs["a"]["t.nii.gz"][4:8] == b"\x00\x00\x00\x00"  # gzip mtime field is zero


# ----------------------------------------------------------------------------------------- model files
def _shipped(folder: Path, inputs: Path, digest: str | None = None, listed: str | None = None) -> Path:
    folder.mkdir()
    m = folder / "atlasmorph-fake-v1.safetensors"
    m.write_bytes((inputs / "model.safetensors").read_bytes())
    if digest is not None:
        (folder / "atlasmorph-fake-v1.sha256").write_text(f"{digest}  {listed or m.name}\n")
    return m


def test_verify_shipped(tmp_path, inputs):
    good = shipped_mod.sha256(inputs / "model.safetensors")
    m = _shipped(tmp_path / "ok", inputs, good)
    assert shipped_mod.verify_shipped(m) == good
    with pytest.raises(AtlasMorphError, match="no checksum file atlasmorph-fake-v1.sha256"):
        shipped_mod.verify_shipped(_shipped(tmp_path / "none", inputs))
    with pytest.raises(AtlasMorphError, match="does not match"):
        shipped_mod.verify_shipped(_shipped(tmp_path / "bad", inputs, "0" * 64))
    with pytest.raises(AtlasMorphError, match="not a sha256 checksum line"):
        shipped_mod.verify_shipped(_shipped(tmp_path / "short", inputs, "abc123"))
    with pytest.raises(AtlasMorphError, match="lists 'other.safetensors'"):
        shipped_mod.verify_shipped(_shipped(tmp_path / "name", inputs, good, "other.safetensors"))
    tampered = _shipped(tmp_path / "tampered", inputs, good)
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    with pytest.raises(AtlasMorphError, match="corrupt or was replaced"):
        shipped_mod.verify_shipped(tampered)


def test_shipped_model_is_verified_when_used(tmp_path, inputs, monkeypatch):
    cwd = case_folder(tmp_path / "w", inputs)
    good = shipped_mod.sha256(inputs / "model.safetensors")
    ok = _shipped(tmp_path / "ok", inputs, good)
    monkeypatch.setattr(shipped_mod, "shipped_models", lambda: [ok])
    code, stderr = run_inprocess(["template", *AGE, "-o", "out/t.nii.gz"], cwd)
    assert code == 0, stderr
    (cwd / "out" / "t.nii.gz").unlink()
    bad = _shipped(tmp_path / "bad", inputs, "f" * 64)
    monkeypatch.setattr(shipped_mod, "shipped_models", lambda: [bad])
    for argv in (["template", *AGE, "-o", "out/t.nii.gz"],  # the default model
                 ["template", *AGE, "-m", str(bad), "-o", "out/t.nii.gz"]):  # the shipped file named explicitly
        code, stderr = run_inprocess(argv, cwd)
        assert_clean_failure(code, stderr, "does not match", cwd)
    missing = _shipped(tmp_path / "missing", inputs)
    monkeypatch.setattr(shipped_mod, "shipped_models", lambda: [missing])
    code, stderr = run_inprocess(["template", *AGE, "-o", "out/t.nii.gz"], cwd)
    assert_clean_failure(code, stderr, "no checksum file", cwd)


def test_model_files_are_byte_reproducible(tmp_path, inputs):
    """safetensors writes its metadata in hash-map order (it changes between processes); save_model
    rewrites the header in a fixed order, so the same weights and configuration give the same bytes."""
    import json

    m = model_mod.load_model(inputs / "model.safetensors")
    m.config.training = {f"k{i}": i for i in range(20)}  # many keys: any order dependence would show
    files = [model_mod.save_model(m, tmp_path / f"m{i}.safetensors").read_bytes() for i in range(4)]
    assert all(f == files[0] for f in files)
    n = int.from_bytes(files[0][:8], "little")
    header = json.loads(files[0][8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    again = model_mod.load_model(tmp_path / "m0.safetensors")
    assert again.config.training == m.config.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
