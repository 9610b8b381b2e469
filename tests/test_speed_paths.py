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
