"""The fast paths of issue 19: what the commands do not import, and the stage clock of benchmarks/profile_segment.py."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import profile_segment


def test_segment_and_template_paths_import_no_scipy_ndimage_dynamo_matplotlib_or_nipype():
    """A new process that loads what `template` and `segment` run (command line, orchestration, registration,
    a refinement step) has not imported scipy.ndimage (geometry.transforms), torch._dynamo (torch.optim.Adam),
    matplotlib or nipype: each costs 0.2-1.2 s of start-up."""
    code = (
        "import sys, torch\n"
        "from atlasmorph_cli.cli import app, run\n"
        "from atlasmorph_cli.inference import registration, quality\n"
        "from atlasmorph_cli.inference.refine import refine_velocity\n"
        "refine_velocity(torch.zeros(1, 3, 4, 4, 4), torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), 2)\n"
        "print(' '.join(m for m in ('scipy.ndimage', 'torch._dynamo', 'matplotlib', 'nipype') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == ""


def test_help_path_imports_no_torch():
    """`atlasmorph <command> --help` loads the command line only: no torch (about 1.3 s of start-up), so the
    refinement defaults it shows come from a torch-free module."""
    code = (
        "import sys\n"
        "from atlasmorph_cli.cli import app\n"
        "from atlasmorph_cli.inference.refine_defaults import REFINE_STEPS\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_entry_keeps_exit_codes_and_flushes_piped_output(tmp_path):
    """The executable leaves by os._exit (no interpreter teardown): its exit codes are main()'s, and what it
    printed into a pipe (block-buffered) still arrives."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "atlasmorph_cli", *a], capture_output=True, text=True,
                                    cwd=tmp_path)
    ok = run("--version")
    assert ok.returncode == 0 and ok.stdout.startswith("atlasmorph ")
    bad = run("template", "--age", "200", "-o", str(tmp_path / "t.nii.gz"))
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "atlasmorph: error: age must be between 0 and 130 years, got 200"]
    assert run("template", "--bogus").returncode == 2
    assert not (tmp_path / "t.nii.gz").exists()


class _FakeTimer:
    """A clock that advances only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stage_clock_counts_self_and_total_seconds_of_nested_stages():
    timer = _FakeTimer()
    clock = profile_segment.StageClock(timer)

    def inner():
        timer.now += 2.0

    inner_t = clock.wrap("inner", inner)

    def outer():
        timer.now += 1.0
        inner_t()
        inner_t()
        timer.now += 0.5

    clock.wrap("outer", outer)()
    assert clock.total_s["outer"] == 5.5 and clock.self_s["outer"] == 1.5
    assert clock.total_s["inner"] == 4.0 and clock.self_s["inner"] == 4.0 and clock.calls["inner"] == 2


def test_install_wraps_a_function_wherever_the_package_binds_it(monkeypatch):
    def work(x):
        return x + 1

    home = types.ModuleType("atlasmorph_cli._speed_home")
    user = types.ModuleType("atlasmorph_cli._speed_user")  # as `from ._speed_home import work` binds it
    home.work = user.work = work
    monkeypatch.setitem(sys.modules, home.__name__, home)
    monkeypatch.setitem(sys.modules, user.__name__, user)
    clock = profile_segment.StageClock()
    missing = profile_segment.install(clock, [("work", home.__name__, "work"), ("gone", home.__name__, "absent")])
    assert missing == ["gone"]
    assert user.work(1) == 2 and home.work(2) == 3
    assert clock.calls["work"] == 2


def test_labels_to_native_equals_sampling_every_class_at_every_voxel():
    """The fast native labels (only voxels where a structure could win are sampled in every class; sums from
    the splatted weights) are the labels and sums of sampling all classes everywhere: an oblique subject
    grid that reaches past the template grid, a smooth deformation, a template with soft structure borders."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from atlasmorph_cli.geometry.space import Grid
    from atlasmorph_cli.inference.registration import Registration, _slabs
    from atlasmorph_cli.inference.template import Template
    from atlasmorph_cli.io.volumes import Volume
    from atlasmorph_cli.labels import N_CLASSES, to_freesurfer
    from atlasmorph_cli.model.layers import sample_at

    g = torch.Generator().manual_seed(0)
    shape = (16, 20, 16)
    logits = F.interpolate(torch.randn(1, N_CLASSES, 4, 5, 4, generator=g), size=shape, mode="trilinear") * 4
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    inside = ((ii - 8) / 6.0) ** 2 + ((jj - 10) / 7.0) ** 2 + ((kk - 8) / 6.0) ** 2 < 1
    logits[0, 0] += torch.from_numpy(np.where(inside, -3.0, 6.0)).float()  # background outside an ellipsoid
    probs = torch.softmax(logits, 1)[0]
    grid = Grid(shape, np.diag([2.0, 2.0, 2.0, 1.0]) + np.array([[0, 0, 0, -16], [0, 0, 0, -20], [0, 0, 0, -16], [0] * 4]))
    tmpl = Template(np.zeros(shape, np.float32), probs.numpy(), grid)
    rot = np.array([[0.98, -0.17, 0.0], [0.17, 0.98, 0.05], [0.0, -0.05, 1.0]])
    subj_aff = np.eye(4)
    subj_aff[:3, :3] = rot * 1.3
    subj_aff[:3, 3] = [-22.0, -26.0, -20.0]
    subject = Volume(np.ones((34, 40, 31), np.float32), subj_aff)
    field = 1.5 * F.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g), size=shape, mode="trilinear")[0]
    world = np.eye(4)
    world[:3, 3] = [1.0, -2.0, 0.5]
    reg = Registration(tmpl, world, field, -field, subject, subject.data)

    labels, sums = reg.labels_to_native()
    p_all = torch.cat([sample_at(probs[None], reg.native_to_template_coords(subject.shape, subj_aff, rows),
                                 padding_mode="zeros")[0] for rows in _slabs(subject.shape)], 1).double()
    p_all[0] += 1.0 - p_all.sum(0)
    np.testing.assert_array_equal(labels, to_freesurfer(p_all.argmax(0).numpy()))
    np.testing.assert_allclose(sums, p_all.sum((1, 2, 3)).numpy(), rtol=1e-5, atol=1e-3)
    assert len(np.unique(labels)) > 5 and (labels == 0).mean() > 0.3  # both kinds of voxel are there


def test_keep_freed_memory_sets_glibc_malloc_options_in_a_new_process():
    """With glibc, both mallopt calls are accepted (a wrong parameter number would return 0 there)."""
    import platform

    import pytest

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    code = "import importlib; print(importlib.import_module('atlasmorph_cli.cli.app').keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
