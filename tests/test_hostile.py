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
from atlasmorph_cli.runs import cache_name
from atlasmorph_cli.train import LossWeights, TrainSettings, train
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
