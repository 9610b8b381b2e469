"""Hostile and careless input (issue 18): nothing overwritten, nothing escapes, bounded work, clear messages.

Each test names the issue item it covers; each fails on the code before the fix. Synthetic data only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.training.runs import cache_name
from atlasmorph_cli.training.loop import LossWeights, TrainSettings, train
from synthetic import SMALL_GRID, small_reference, write_cohort


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def settings(csv: Path, out: Path, **kw) -> TrainSettings:
    base = dict(data=csv, out=out, steps=2, lr=3e-3, val_fraction=0.25, val_every=10, checkpoint_every=1,
                workers=1, quiet=True, grid=SMALL_GRID, threads=1, cache=csv.parent / "cache",
                template_width=8, weights=LossWeights(image=1.0, smooth=0.05, centrality=0.1))
    base.update(kw)
    return TrainSettings(**base)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"), n=4)


def _csv(cohort: Path, name: str, rows: list[str]) -> Path:
    p = cohort.parent / name
    p.write_text("subject,t1,seg,age,sex\n" + "".join(r + "\n" for r in rows))
    return p


def _row(i: int, sid: str | None = None, age: float | None = None, sex: str | None = None) -> str:
    age = 20 + 20 * i if age is None else age
    return f"{sid or f's{i}'},s{i}_t1.nii.gz,s{i}_seg.nii.gz,{age:.1f},{sex or 'FM'[i % 2]}"


# ----------------------------------------------------------------------------------------- item 1
def test_cache_name_is_never_a_path():
    assert cache_name("IXI012-HH-1211") == "IXI012-HH-1211"  # plain ids keep their cache files
    for sid in ("/etc/passwd", "../../escaped", "a/b", "..", ".hidden", "x\\y", "a\nb", "", "患者 1"):
        name = cache_name(sid)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name not in ("", ".", "..")
    assert cache_name("a/b") != cache_name("a_b") and cache_name("a/b") != cache_name("a?b")


def test_item1_cohort_ids_cannot_write_outside_the_cache(cohort, tmp_path):
    """Item 1: ids such as an absolute path or ../.. were used as cache file names and escaped the run."""
    victim = tmp_path / "victim"
    csv = _csv(cohort, "evil.csv", [_row(0, str(victim)), _row(1, "../../escaped"), _row(2, "sub/dir"),
                                    _row(3, "ok")])
    cache = tmp_path / "run" / "cache"
    train(settings(csv, tmp_path / "run", cache=cache, steps=1), small_reference())
    assert not victim.with_suffix(".npz").exists()
    assert not (tmp_path / "escaped.npz").exists() and not (tmp_path.parent / "escaped.npz").exists()
    written = [p for p in (tmp_path).rglob("*.npz")]
    assert len(written) == 4 and all(p.parent == cache for p in written), written
    assert (cache / "ok.npz").is_file()


# ----------------------------------------------------------------------------------------- item 2
def test_item2_train_refuses_to_replace_a_finished_run(cohort, tmp_path):
    run = tmp_path / "run"
    train(settings(cohort, run), small_reference())
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(AtlasMorphError, match="already holds a training run.*--resume"):
        train(settings(cohort, run, seed=5), small_reference())
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    killed = tmp_path / "killed"  # a killed run (checkpoint, no model) is protected as well
    killed.mkdir()
    (killed / "checkpoint.safetensors").write_bytes(b"x")
    with pytest.raises(AtlasMorphError, match="checkpoint.safetensors"):
        train(settings(cohort, killed), small_reference())
    assert (killed / "checkpoint.safetensors").read_bytes() == b"x"


# ----------------------------------------------------------------------------------------- item 4
def test_item4_resume_refuses_changed_settings(cohort, tmp_path):
    run = tmp_path / "run"
    train(settings(cohort, run), small_reference())
    ckpt = (run / "checkpoint.safetensors").read_bytes()
    changed_cohort = _csv(cohort, "changed.csv", [_row(0), _row(1), _row(2, age=33.0), _row(3)])
    for kw, what in ((dict(seed=1), "seed: 0 -> 1"), (dict(image_loss="ncc"), "image_loss: mse -> ncc"),
                     (dict(batch_size=2), "batch_size: 1 -> 2"),
                     (dict(weights=LossWeights(image=1.0, smooth=0.5, centrality=0.1)), "weights.smooth"),
                     (dict(attributes=["age"]), "attributes"), (dict(data=changed_cohort), "the cohort")):
        with pytest.raises(AtlasMorphError, match="other settings") as exc:
            train(settings(cohort, run, steps=3, resume=True, **kw), small_reference())
        assert what in str(exc.value), (what, str(exc.value))
        assert (run / "checkpoint.safetensors").read_bytes() == ckpt
    # what a resumed run may change: its length, the learning rate, threads, reporting, workers
    train(settings(cohort, run, steps=3, resume=True, lr=1e-4, threads=2, quiet=False, val_every=1,
                   checkpoint_every=3, workers=2), small_reference())
    # and the same cohort from a moved copy of its CSV (paths differ, content is the same)
    moved = _csv(cohort, "copy.csv", [_row(i) for i in range(4)])
    train(settings(cohort, run, steps=4, resume=True, data=moved), small_reference())


# ----------------------------------------------------------------------------------------- item 11
def test_item11_one_subject_cohort(cohort, tmp_path, capsys):
    one = _csv(cohort, "one.csv", [_row(0)])
    with pytest.raises(AtlasMorphError, match="only 1 training subject"):
        train(settings(one, tmp_path / "one"), small_reference())
    assert not (tmp_path / "one" / "cache").exists()  # refused before any preparation
    capsys.readouterr()
    same_sex = _csv(cohort, "same_sex.csv", [_row(0, sex="F"), _row(1, sex="F")])
    train(settings(same_sex, tmp_path / "ff", steps=1, val_fraction=0.0), small_reference())
    err = capsys.readouterr().err
    assert "warning: no validation subject" in err and "every training subject has sex = F" in err
    # unconditional training on one subject is legitimate (a single-subject template), with a warning
    train(settings(one, tmp_path / "uncond", steps=1, attributes=[]), small_reference())
    assert "no validation subject" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- CLI cases
# the command line through the real entry point, in a folder with `in/` (inputs) and `out/` (test_reliability)
import gzip  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import nibabel as nib  # noqa: E402

from atlasmorph_cli.io import volumes as io_mod  # noqa: E402
from atlasmorph_cli.model import model_file as model_mod  # noqa: E402
from atlasmorph_cli.io.volumes import save_volume  # noqa: E402
from synthetic import phantom  # noqa: E402
from test_reliability import AGE, MODEL, case_folder, make_inputs, run_inprocess  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("hostile_inputs"))


def one_line_error(code: int, stderr: str, expect: str, exit_code: int = 1) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("warning: ")]  # e.g. a quality warning
    assert code == exit_code, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("atlasmorph: error: "), stderr
    assert expect in lines[0], (expect, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr and "Warning" not in stderr


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- item 3
def test_item3_an_output_that_is_an_input_is_refused(tmp_path, inputs):
    cwd = case_folder(tmp_path, inputs)
    out = cwd / "out"
    shutil.copy(inputs / "brain.nii.gz", out / "b.nii.gz")
    shutil.copy(inputs / "mask.nii.gz", out / "mask.nii.gz")
    shutil.copy(inputs / "model.safetensors", out / "model.safetensors")
    (out / "link.nii.gz").symlink_to(out / "b.nii.gz")
    before = _files(out)
    for argv, what in (
        (["segment", "out/b.nii.gz", *AGE, *MODEL, "-o", "out/b.nii.gz"], "is the input image"),
        (["segment", "out/b.nii.gz", *AGE, *MODEL, "-o", "out/link.nii.gz"], "is the input image"),  # a link to it
        (["segment", "out/b.nii.gz", *AGE, *MODEL, "-o", str(out / "b.nii.gz")], "is the input image"),  # absolute
        (["segment", "in/brain.nii.gz", "--mask", "out/mask.nii.gz", *AGE, *MODEL, "-o", "out/mask.nii.gz"],
         "is the --mask image"),
        (["segment", "out/b.nii.gz", *AGE, *MODEL, "-o", "out/s.nii.gz", "--vol", "out/b.nii.gz"], "input image"),
        (["register", "out/b.nii.gz", *AGE, *MODEL, "-O", "out/b.nii.gz"], "is the input image"),
        (["register", "in/brain.nii.gz", *AGE, "-m", "out/model.safetensors", "-o", "out/model.safetensors"],
         "is the model file"),
        (["template", *AGE, "-m", "out/model.safetensors", "-o", "out/t.nii.gz", "--png", "out/model.safetensors"],
         "is the model file"),
    ):
        code, stderr = run_inprocess(argv, cwd)
        one_line_error(code, stderr, what)
        assert _files(out) == before, argv
    # batch: --vol onto the cohort CSV, and --out-dir holding a subject's own image under an output name
    shutil.copy(inputs / "cohort.csv", out / "cohort.csv")
    for name in ("s0.nii.gz", "s1.nii.gz"):
        shutil.copy(inputs / name, out / name)
    before = _files(out)
    code, stderr = run_inprocess(["segment", "out/cohort.csv", *MODEL, "--out-dir", "out/d", "--vol",
                                  "out/cohort.csv"], cwd)
    one_line_error(code, stderr, "is the cohort CSV")
    (out / "evil.csv").write_text("subject,t1,age,sex\ns0,d2/sub-s0_desc-atlasmorph_dseg.nii.gz,40,F\n")
    (out / "d2").mkdir()
    shutil.copy(inputs / "s0.nii.gz", out / "d2" / "sub-s0_desc-atlasmorph_dseg.nii.gz")
    before = _files(out)
    code, stderr = run_inprocess(["segment", "out/evil.csv", *MODEL, "--out-dir", "out/d2"], cwd)
    one_line_error(code, stderr, "is the image of subject s0")
    assert _files(out) == before


# ----------------------------------------------------------------------------------------- item 5
def _nifti_header(shape, dtype=np.uint8) -> bytes:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), np.eye(4))
    img.header.set_data_shape(shape)
    return img.header.binaryblock + b"\x00" * 4


def test_item5_voxel_limit_refuses_bombs_and_absurd_headers(tmp_path, inputs):
    cwd = case_folder(tmp_path, inputs)
    # a real gzip bomb: 2.2 GB of voxels (1300^3 uint8) in about 2 MB, as concatenated gzip members
    zeros = gzip.compress(b"\x00" * (1 << 24), compresslevel=9)
    n = -(-1300 ** 3 // (1 << 24))
    (cwd / "bomb.nii.gz").write_bytes(gzip.compress(_nifti_header((1300, 1300, 1300))) + zeros * n)
    assert (cwd / "bomb.nii.gz").stat().st_size < 3e6
    # an .mgz header claiming (2^31 - 1)^3 voxels, and one with negative dimensions
    img = nib.MGHImage(np.zeros((4, 4, 4), np.float32), np.eye(4))
    nib.save(img, cwd / "small.mgz")
    raw = bytearray(gzip.decompress((cwd / "small.mgz").read_bytes()))
    for name, dims in (("huge.mgz", (2 ** 31 - 1,) * 3 + (1,)), ("negative.mgz", (-4, 4, 4, 1))):
        raw[4:20] = struct.pack(">iiii", *dims)
        (cwd / name).write_bytes(gzip.compress(bytes(raw)))
    import resource

    for name, expect in (("bomb.nii.gz", "1300x1300x1300"), ("huge.mgz", "at most"),
                         ("negative.mgz", "impossible image dimensions")):
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.time()
        code, stderr = run_inprocess(["segment", name, *AGE, *MODEL, "-o", "out/s.nii.gz"], cwd)
        one_line_error(code, stderr, expect)
        assert time.time() - t0 < 5
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # kB: nothing was read
    assert list((cwd / "out").iterdir()) == []


# ----------------------------------------------------------------------------------------- item 6
def test_item6_template_keeps_one_age_in_memory(tmp_path, inputs, monkeypatch):
    """Every age's probabilities used to be held until the end (5.6 GB for --age 20:80:1); now each
    template is written and freed before the next is computed."""
    import weakref

    from atlasmorph_cli.cli import outputs
    from atlasmorph_cli.cli import run as commands

    cwd = case_folder(tmp_path, inputs)
    alive: list = []
    real_make, real_save = commands.make_template, outputs.save_volume
    peak = [0]

    def make(model, vec):
        t = real_make(model, vec)
        alive.append(weakref.ref(t))
        return t

    def save(*a, **k):
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return real_save(*a, **k)

    monkeypatch.setattr(commands, "make_template", make)
    monkeypatch.setattr(outputs, "save_volume", save)  # cli.outputs.save_template writes every template file
    code, stderr = run_inprocess(["template", "--age", "20:80:10", "--sex", "F", *MODEL, "-o", "out/t.nii.gz",
                                  "--probs", "out/p.nii.gz", "--png", "out/t.png"], cwd)
    assert code == 0, stderr
    assert len(alive) == 7 and peak[0] == 1
    assert len(list((cwd / "out").iterdir())) == 15


def test_item6_segment_probs_are_streamed(tmp_path, inputs, monkeypatch):
    """segment --probs never builds the (X, Y, Z, 35) array; the file holds the same values as before."""
    from atlasmorph_cli.inference import registration as pipeline

    cwd = case_folder(tmp_path, inputs)
    code, stderr = run_inprocess(["segment", "in/brain.nii.gz", *AGE, *MODEL, "--refine", "2", "-o", "out/s.nii.gz",
                                  "--probs", "out/p.nii.gz"], cwd)
    assert code == 0, stderr
    streamed = np.asarray(nib.load(cwd / "out" / "p.nii.gz").dataobj)
    reference = []
    real = pipeline.Registration.probs_to_native

    def whole(self):
        reference.append(np.moveaxis(real(self), 0, -1))
        raise MemoryError("the whole 4D array was built")

    monkeypatch.setattr(pipeline.Registration, "probs_to_native", whole)
    code, stderr = run_inprocess(["segment", "in/brain.nii.gz", *AGE, *MODEL, "--refine", "2", "-o", "out/s2.nii.gz",
                                  "--probs", "out/p2.nii.gz"], cwd)
    assert code == 0 and not reference, stderr
    monkeypatch.undo()
    from atlasmorph_cli.io.volumes import load_volume
    from atlasmorph_cli.inference.registration import register_subject
    from atlasmorph_cli.inference.template import encode_attributes
    from atlasmorph_cli.model.shipped import load

    _, m = load(inputs / "model.safetensors")
    reg = register_subject(m, load_volume(inputs / "brain.nii.gz"), encode_attributes(m, {"age": 50, "sex": "F"})[0],
                   refine=2)
    np.testing.assert_allclose(streamed, np.moveaxis(reg.probs_to_native(), 0, -1), atol=1e-5)


def test_save_frames_writes_the_bytes_nibabel_writes(tmp_path):
    from atlasmorph_cli.io.stream import save_frames

    a = np.random.default_rng(0).random((5, 6, 7, 4)).astype(np.float32)
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    for suffix in (".nii.gz", ".nii", ".mgz"):
        save_volume(a, aff, tmp_path / f"ref{suffix}", dtype=np.float32)
        save_frames(tmp_path / f"streamed{suffix}", (5, 6, 7), 4, aff, lambda c: a[..., c])
        assert (tmp_path / f"ref{suffix}").read_bytes() == (tmp_path / f"streamed{suffix}").read_bytes(), suffix


# ----------------------------------------------------------------------------------------- item 7
SLOW_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import atlasmorph_cli.inference.registration as P
import atlasmorph_cli.io.stream as S
_register, _frames = P.register_subject, S.save_frames
def slow_register(*a, **k):
    time.sleep({delay})
    return _register(*a, **k)
def slow_frames(path, shape, n, affine, frame, **k):  # a long write: the temporary file exists meanwhile
    def slow(c):
        time.sleep(0.2)
        return frame(c)
    return _frames(path, shape, n, affine, slow, **k)
P.register_subject, S.save_frames = slow_register, slow_frames
from atlasmorph_cli.cli import main
sys.argv = ["atlasmorph", *sys.argv[1:]]
main()
"""


def _slow(tmp_path: Path, delay: float) -> Path:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT.format(tests=str(TESTS), delay=delay))
    return script


def test_item7_sigterm_removes_temporary_files(tmp_path, inputs):
    cwd = case_folder(tmp_path / "w", inputs)
    (cwd / "out" / ".stale.nii.gz.abcd1234.part.nii.gz").write_bytes(b"left by a SIGKILL")
    (cwd / "out" / ".other.nii.gz.abcd1234.part.nii.gz").write_bytes(b"another job's file")
    argv = ["segment", "in/brain.nii.gz", *AGE, *MODEL, "--refine", "0", "-o", "out/stale.nii.gz",
            "--probs", "out/p.nii.gz"]
    proc = subprocess.Popen([sys.executable, str(_slow(tmp_path, 0.0)), *argv], cwd=cwd, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list((cwd / "out").glob(".p.nii.gz.*.part*")):  # the --probs file is being written
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.02)
    assert not (cwd / "out" / ".stale.nii.gz.abcd1234.part.nii.gz").exists()  # a stale one of this output: removed
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in (cwd / "out").iterdir()) == [".other.nii.gz.abcd1234.part.nii.gz"]


def test_item7_interrupted_batch_keeps_volumes_and_skip_existing_resumes(tmp_path, inputs):
    cwd = case_folder(tmp_path / "w", inputs)
    t1, seg, aff = phantom(50.0)
    (cwd / "imgs").mkdir()
    for i in range(5):
        save_volume(t1, aff, cwd / "imgs" / f"s{i}.nii.gz")
    argv = ["segment", "imgs", *AGE, *MODEL, "--refine", "0", "--out-dir", "out/d"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(_slow(tmp_path, 0.6)), *argv], cwd=cwd, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 120
    while len(list((cwd / "out" / "d").glob("sub-*_dseg.nii.gz"))) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    done = sorted(p.name for p in (cwd / "out" / "d").glob("sub-*_dseg.nii.gz"))
    assert 2 <= len(done) < 5
    assert f"{len(done)} of 5 subjects have all their outputs (sub-s0, sub-s1" in stderr and "--skip-existing" in stderr
    rows = (cwd / "out" / "d" / "volumes.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [f"s{i}" for i in range(len(done))]
    assert not list((cwd / "out").rglob(".*part*"))
    kept = {n: (cwd / "out" / "d" / n).stat().st_mtime_ns for n in done}
    code, stderr = run_inprocess([*argv, "--skip-existing"], cwd)
    assert code == 0, stderr
    assert f"{len(done)} subject(s) already done, {5 - len(done)} to do" in stderr
    assert {n: (cwd / "out" / "d" / n).stat().st_mtime_ns for n in done} == kept  # not redone
    rows2 = (cwd / "out" / "d" / "volumes.csv").read_text().splitlines()
    assert rows2[: len(rows)] == rows and len(rows2) == 6  # earlier rows kept verbatim, then the rest


# ----------------------------------------------------------------------------------------- item 8
def test_item8_attribute_conflicts_and_unknown_names(tmp_path, inputs):
    cwd = case_folder(tmp_path, inputs)
    seg = ["segment", "in/brain.nii.gz", *MODEL, "-o", "out/s.nii.gz"]
    for argv, expect in (
        ([*seg, "--age", "40", "--sex", "M", "--attr", "sex=F", "--attr", "age=75"], "sex is given twice (--sex M and"),
        ([*seg, "--age", "40", "--attr", "age=75", "--sex", "M"], "age is given twice (--age 40.0 and --attr age=75)"),
        ([*seg, *AGE, "--attr", "Age=99"], "unknown attribute 'Age' (this model takes: age, sex)"),
        ([*seg, *AGE, "--attr", "site=X"], "unknown attribute 'site'"),
        (["template", "--age", "40", "--attr", "age=75", "--sex", "F", *MODEL, "-o", "out/t.nii.gz"], "given twice"),
        (["register", "in/brain.nii.gz", *AGE, "--attr", "site=X", *MODEL, "-o", "out/m.nii.gz"], "unknown attribute"),
        (["segment", "in/cohort.csv", *MODEL, "--attr", "site=X", "--out-dir", "out/d"], "unknown attribute 'site'"),
    ):
        code, stderr = run_inprocess(argv, cwd)
        one_line_error(code, stderr, expect)
    assert [p for p in (cwd / "out").rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------------------- item 9
def test_item9_non_latin_file_names_in_a_batch(tmp_path, inputs):
    from atlasmorph_cli.cli.batch import bids_label

    assert bids_label("患者") == "患者" and bids_label("Müller") == "Müller" and bids_label("IXI012-HH-1211") == "IXI012HH1211"
    cwd = case_folder(tmp_path, inputs)
    (cwd / "imgs").mkdir()
    for name in ("患者.nii.gz", "Müller.nii.gz", "plain.nii.gz"):
        shutil.copy(inputs / "brain.nii.gz", cwd / "imgs" / name)
    code, stderr = run_inprocess(["segment", "imgs", *AGE, *MODEL, "--refine", "0", "--out-dir", "out/d"], cwd)
    assert code == 0, stderr
    names = sorted(p.name for p in (cwd / "out" / "d").iterdir())
    assert "sub-患者_desc-atlasmorph_dseg.nii.gz" in names and "sub-Müller_desc-atlasmorph_dseg.nii.gz" in names
    rows = (cwd / "out" / "d" / "volumes.csv").read_text(encoding="utf-8").splitlines()
    assert sorted(r.split(",")[0] for r in rows[1:]) == sorted(["患者", "Müller", "plain"])


# ----------------------------------------------------------------------------------------- item 10
def _save_model(m, path: Path) -> None:
    model_mod.save_model(m, path)


def test_item10_clear_messages_instead_of_internal_errors(tmp_path, inputs):
    cwd = case_folder(tmp_path, inputs)
    tmpl = ["template", "--sex", "F", *MODEL, "-o", "out/t.nii.gz"]
    for age, expect in (("nan", "finite"), ("inf", "finite"), ("20:nan:10", "finite"), ("20:80:inf", "finite"),
                        ("20:80:1e-9", "at most 1000 per command"), ("0:130:0.01", "asks for 13001 templates")):
        t0 = time.time()
        code, stderr = run_inprocess([*tmpl, "--age", age], cwd)
        one_line_error(code, stderr, expect)
        assert time.time() - t0 < 10
    code, stderr = run_inprocess(["segment", "in/brain.nii.gz", *AGE, *MODEL, "--threads", "-1", "-o", "out/s.nii.gz"],
                                 cwd)
    one_line_error(code, stderr, "Invalid value for '--threads'", exit_code=2)
    m = model_mod.load_model(inputs / "model.safetensors")
    m.config.attributes[0]["std"] = 0.0
    _save_model(m, cwd / "std0.safetensors")
    m = model_mod.load_model(inputs / "model.safetensors")
    m.config.int_steps = 10 ** 7
    _save_model(m, cwd / "steps.safetensors")
    for model, expect in (("std0.safetensors", "std must be finite and > 0"), ("steps.safetensors", "int_steps is 10000000")):
        code, stderr = run_inprocess(["template", *AGE, "-m", model, "-o", "out/t.nii.gz"], cwd)
        one_line_error(code, stderr, expect)
    # a legal 250-character file name works (the temporary name beside it is shortened); 300 is too long
    long = "a" * 243 + ".nii.gz"
    code, stderr = run_inprocess(["template", *AGE, *MODEL, "-o", f"out/{long}"], cwd)
    assert code == 0 and (cwd / "out" / long).is_file(), stderr
    (cwd / "out" / long).unlink()
    code, stderr = run_inprocess(["template", *AGE, *MODEL, "-o", "out/" + "a" * 293 + ".nii.gz"], cwd)
    one_line_error(code, stderr, "file name too long (300 bytes")
    # a mask on the same shape but another origin names the difference, not two equal shapes
    t1, seg, aff = phantom(50.0)
    shifted = aff.copy()
    shifted[:3, 3] += 10
    save_volume((seg > 0).astype(np.uint8), shifted, cwd / "shifted_mask.nii.gz")
    code, stderr = run_inprocess(["segment", "in/brain.nii.gz", "--mask", "shifted_mask.nii.gz", *AGE, *MODEL, "-o",
                                  "out/s.nii.gz"], cwd)
    one_line_error(code, stderr, "origin (-68, -68, -68) vs (-78, -78, -78) mm")
    assert [p for p in (cwd / "out").rglob("*") if p.is_file()] == []


def test_item10_disk_full_names_the_file(tmp_path, inputs, monkeypatch):
    cwd = case_folder(tmp_path, inputs)

    def full(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")  # as gzip/zlib raise it: no file name

    monkeypatch.setattr(io_mod.nib, "save", full)
    code, stderr = run_inprocess(["segment", "in/brain.nii.gz", *AGE, *MODEL, "--refine", "0", "-o",
                                  "out/s.nii.gz"], cwd)
    one_line_error(code, stderr, "out/s.nii.gz: No space left on device")
    assert list((cwd / "out").iterdir()) == []


def test_item10_all_subjects_failed_says_nothing_was_written(tmp_path, inputs):
    cwd = case_folder(tmp_path, inputs)
    (cwd / "bad").mkdir()
    for i in range(3):
        shutil.copy(inputs / "nan.nii.gz", cwd / "bad" / f"s{i}.nii.gz")
    code, stderr = run_inprocess(["segment", "bad", *AGE, *MODEL, "--out-dir", "out/d"], cwd)
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert "3 of 3 subjects failed" in last and "nothing was written" in last and "the others" not in last
