"""The command line as a user meets it: help, version, one-line errors and exit codes."""
from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlasmorph_cli", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("train", "template", "register", "segment"):
        assert cmd in r.stdout


def test_version():
    from atlasmorph_cli.model.shipped import resolve_model, shipped_models

    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("atlasmorph ")
    if shipped_models():  # it names the model the commands use without --model
        assert f"default {resolve_model(None).stem})" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["register", "/nonexistent/subj.nii.gz", "-o", "out.nii.gz"], "no such file"),
    (["segment", "/nonexistent/subj.nii.gz", "-o", "seg.nii.gz"], "no such file"),
    (["train", "--data", "/nonexistent/c.csv", "--out", "x"], "no such cohort file"),
    (["train", "--data", "/nonexistent/c.csv", "--out", "x", "--device", "gpu"], "--device must be cpu or cuda"),
])
def test_errors_are_one_line_without_traceback(tmp_path, args, msg):
    r = subprocess.run([sys.executable, "-m", "atlasmorph_cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "atlasmorph_cli", "--debug", "segment", "/nonexistent.nii.gz", "-o",
                        "s.nii.gz"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr
