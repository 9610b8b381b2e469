"""Where the time of an `atlasmorph` command goes: seconds per pipeline stage, and end to end in new processes.

`profile` (the default) times the real pipeline functions, not copies: each function of STAGES is wrapped
with time.perf_counter (`--clock cpu`: time.process_time, this process's CPU seconds, which with `--threads 1`
do not depend on what else the machine runs) wherever the package binds it, and the command runs through the real command line
(atlasmorph_cli.cli.app) in this process, as `atlasmorph` would. A stage's "self" seconds exclude the stages
it calls (the refinement's own velocity integrations count under "velocity integration"; its "total"
includes them); "other" is what no stage covers (argument parsing, checks, small steps). The imports are
timed first (torch, then the command line and the pipeline modules), and the interpreter's own start-up
(`python -c pass`) in a child process. `--repeat 2` runs the command again in the same process: the second
run shows the warm cost (a batch pays the first-call costs once).

    python benchmarks/profile_segment.py -- segment brain.nii.gz --age 23 --sex M -o /tmp/seg.nii.gz
    python benchmarks/profile_segment.py --ixi IXI034-HH-1260 -- segment       # that subject, skull-stripped with
                                                                               # its own mask; input, age, sex, -o added
    python benchmarks/profile_segment.py --ixi IXI034-HH-1260 --whole-head -- register   # its raw T1 (deepbet)
    python benchmarks/profile_segment.py -- template --age 70 --sex F -o /tmp/t.nii.gz --labels /tmp/l.nii.gz

`e2e` runs each command as a user does, a new `python -m atlasmorph_cli` process per run, over the first N
validation subjects of the shipped model (skull-stripped with their own DLMUSE mask, `seg > 0`, written as
brain images, so no brain extraction and no mask comparison is run; `--whole-head` adds the raw T1s, brain
extracted by the tool), plus `template`, one batch `segment` over the same brains (seconds per subject =
wall / N), and the start-up of each command: `python -c pass` and `python -m atlasmorph_cli CMD --help`.

    python benchmarks/profile_segment.py e2e --n 23 --threads 2 --whole-head --json docs/benchmarks/speed_e2e.json
"""
from __future__ import annotations

import argparse
import csv
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line sets it before torch is imported

# (label, module, name): the pipeline functions, in pipeline order; "Class.method" for methods. A function is
# wrapped wherever an atlasmorph_cli module binds it (from-imports included), so its call sites need not be known.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("model load (sha256, safetensors)", "atlasmorph_cli.model.shipped", "load"),
    ("read input image(s)", "atlasmorph_cli.io.volumes", "load_volume"),
    ("brain mask (given, skull-stripped or deepbet)", "atlasmorph_cli.inference.brain_extraction", "resolve_brain"),
    ("template network", "atlasmorph_cli.model.networks", "TemplateNet.forward"),
    ("template (rest of make_template)", "atlasmorph_cli.inference.template", "make_template"),
    ("subject brain + normalisation", "atlasmorph_cli.inference.registration", "subject_brain"),
    ("affine (fit_affine)", "atlasmorph_cli.geometry.affine", "fit_affine"),
    ("resample onto the model grid", "atlasmorph_cli.geometry.space", "resample"),
    ("registration network", "atlasmorph_cli.model.networks", "RegNet.forward"),
    ("refinement (refine_velocity)", "atlasmorph_cli.inference.refine", "refine_velocity"),
    ("velocity integration", "atlasmorph_cli.model.networks", "velocity_to_displacements"),
    ("quality check (assess)", "atlasmorph_cli.inference.quality", "assess"),
    ("quality: mask vs deepbet", "atlasmorph_cli.inference.quality", "mask_agreement"),
    ("subject -> template grid", "atlasmorph_cli.inference.registration", "Registration.subject_to_template"),
    ("labels_to_native", "atlasmorph_cli.inference.registration", "Registration.labels_to_native"),
    ("to_native (-O, probabilities)", "atlasmorph_cli.inference.registration", "Registration.to_native"),
    ("-t warp field", "atlasmorph_cli.inference.registration", "Registration.subject_to_template_transform"),
    ("-T warp field", "atlasmorph_cli.inference.registration", "Registration.template_to_subject_transform"),
    ("log Jacobian", "atlasmorph_cli.inference.registration", "Registration.log_jacobian"),
    ("native probabilities (streamed)", "atlasmorph_cli.inference.registration", "save_native_probs"),
    ("write images (save_volume)", "atlasmorph_cli.io.volumes", "save_volume"),
    ("write transforms", "atlasmorph_cli.geometry.transforms", "write_transform"),
    ("write volumes table", "atlasmorph_cli.cli.volumes_table", "write_volumes"),
)
# imported up front so their functions can be wrapped: what register/segment/template import anyway
PIPELINE_MODULES = ("atlasmorph_cli.cli.run", "atlasmorph_cli.inference.registration", "atlasmorph_cli.inference.quality")


class StageClock:
    """Self (exclusive) and total (inclusive) seconds and call counts per stage label."""

    def __init__(self, timer=time.perf_counter) -> None:
        self.timer = timer
        self.self_s: dict[str, float] = defaultdict(float)
        self.total_s: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []  # per open stage: seconds spent in the stages it called
        self._open: list[str] = []

    def wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            recursive = label in self._open  # a stage calling itself is counted once, at the outermost call
            start = self.timer()
            self._inner.append(0.0)
            self._open.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self.timer() - start
                inner = self._inner.pop()
                self._open.pop()
                self.self_s[label] += elapsed - inner
                if not recursive:
                    self.total_s[label] += elapsed
                    self.calls[label] += 1
                if self._inner:
                    self._inner[-1] += elapsed
        timed.__wrapped_stage__ = label
        return timed

    def reset(self) -> None:
        self.self_s.clear()
        self.total_s.clear()
        self.calls.clear()


def install(clock: StageClock, stages=STAGES) -> list[str]:
    """Wrap every stage function where atlasmorph_cli binds it; returns the labels that could not be found."""
    missing = []
    for label, module, name in stages:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(label)
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = getattr(mod, owner_name, None) if owner_name else mod
        fn = getattr(owner, attr, None) if owner is not None else None
        if fn is None:
            missing.append(label)
            continue
        timed = clock.wrap(label, fn)
        if owner_name:
            setattr(owner, attr, timed)
            continue
        for m in list(sys.modules.values()):
            if getattr(m, "__name__", "").startswith("atlasmorph_cli") and getattr(m, attr, None) is fn:
                setattr(m, attr, timed)
    return missing


# ------------------------------------------------------------------------------------ subjects
def ixi_subject(subject: str, data: Path | None = None) -> dict:
    """The IXI row of a subject id (t1, seg, age, sex)."""
    import common

    rows = {r["subject"]: r for r in common.ixi_rows(common.data_folder(data))}
    if subject not in rows:
        raise SystemExit(f"{subject}: not in the IXI subjects")
    return rows[subject]


def write_brain(row: dict, folder: Path) -> Path:
    """The subject's T1 inside its own DLMUSE mask (seg > 0), written as <id>_brain.nii.gz (float32)."""
    import nibabel as nib
    import numpy as np

    out = folder / f"{row['subject']}_brain.nii.gz"
    if not out.exists():
        t1 = nib.load(row["t1"])
        seg = np.asarray(nib.load(row["seg"]).dataobj)
        data = np.where(seg > 0, np.asarray(t1.dataobj, dtype=np.float32), 0).astype(np.float32)
        img = nib.Nifti1Image(data, t1.affine, t1.header)
        img.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)
        nib.save(img, out)
    return out


def subject_argv(command: str, row: dict, image: Path, out: Path) -> list[str]:
    """The command line of `segment`/`register` for one subject, as cli_time.py runs them."""
    base = [str(image), "--age", row["age"], "--sex", row["sex"]]
    if command == "segment":
        return ["segment", *base, "-o", str(out / "seg.nii.gz"), "--vol", str(out / "vol.csv")]
    if command == "register":
        return ["register", *base, "-o", str(out / "moved.nii.gz"), "-t", str(out / "warp.nii.gz"),
                "--labels", str(out / "labels.nii.gz")]
    raise SystemExit(f"--ixi: segment or register, not {command}")


# ------------------------------------------------------------------------------------ profile
def interpreter_startup(repeat: int = 3) -> float:
    """Median wall seconds of `python -c pass` (the interpreter alone)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(argv: list[str], threads: int | None, repeat: int, timer=time.perf_counter) -> dict:
    """Run the command `repeat` times in this process; stage seconds per run (by `timer`), imports, wall."""
    t0 = timer()
    import torch  # noqa: F401

    t1 = timer()
    from atlasmorph_cli.cli.app import app

    t2 = timer()
    for m in PIPELINE_MODULES:
        importlib.import_module(m)
    t3 = timer()
    clock = StageClock(timer)
    missing = install(clock)
    if threads is not None and "--threads" not in argv:
        argv = [*argv, "--threads", str(threads)]
    runs = []
    for _ in range(repeat):
        clock.reset()
        start, cpu, total = time.perf_counter(), time.process_time(), timer()
        app(argv, standalone_mode=False)
        total = timer() - total
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        runs.append({"total_s": total, "wall_s": wall, "cpu_s": cpu, "other_s": total - sum(clock.self_s.values()),
                     "stages": {label: {"self_s": clock.self_s[label], "total_s": clock.total_s[label],
                                        "calls": clock.calls[label]}
                                for label, _, _ in STAGES if clock.calls.get(label)}})
    return {"argv": argv, "clock": timer.__name__, "imports": {"torch_s": t1 - t0, "command_line_s": t2 - t1,
                                      "pipeline_modules_s": t3 - t2},
            "runs": runs, "not_found": missing, "torch_threads": torch.get_num_threads()}


def print_profile(rec: dict) -> None:
    imp = rec["imports"]
    print(f"atlasmorph {' '.join(rec['argv'])}   (torch threads {rec['torch_threads']}, stage clock "
          f"{rec['clock']})")
    print(f"{'stage':<48} {'self s':>8} {'total s':>8} {'calls':>6}" + "".join(
        f"  run {i + 1} self" for i in range(1, len(rec["runs"]))))
    if "python_startup_s" in rec:
        print(f"{'python start-up (python -c pass, child)':<48} {rec['python_startup_s']:8.2f}")
    for key, label in (("torch_s", "import torch"), ("command_line_s", "import atlasmorph_cli.cli.app"),
                       ("pipeline_modules_s", "import pipeline modules (cli.run, ...)")):
        print(f"{label:<48} {imp[key]:8.2f}")
    first, rest = rec["runs"][0], rec["runs"][1:]
    for label, _, _ in STAGES:
        s = first["stages"].get(label)
        if s is None and not any(label in r["stages"] for r in rest):
            continue
        s = s or {"self_s": 0.0, "total_s": 0.0, "calls": 0}
        extra = "".join(f"  {r['stages'].get(label, {}).get('self_s', 0.0):13.2f}" for r in rest)
        print(f"{label:<48} {s['self_s']:8.2f} {s['total_s']:8.2f} {s['calls']:6d}{extra}")
    extra = "".join(f"  {r['other_s']:13.2f}" for r in rest)
    print(f"{'other (parsing, checks, small steps)':<48} {first['other_s']:8.2f}{'':16}{extra}")
    extra = "".join(f"  {r['total_s']:13.2f}" for r in rest)
    print(f"{'command total (in process, stage clock)':<48} {first['total_s']:8.2f}{'':16}{extra}")
    extra = "".join(f"  {r['wall_s']:13.2f}" for r in rest)
    print(f"{'command wall seconds':<48} {first['wall_s']:8.2f}{'':16}{extra}")
    extra = "".join(f"  {r['cpu_s']:13.2f}" for r in rest)
    print(f"{'command CPU seconds (all threads)':<48} {first['cpu_s']:8.2f}{'':16}{extra}")
    startup = rec.get("python_startup_s", 0.0) + sum(imp[k] for k in ("torch_s", "command_line_s", "pipeline_modules_s"))
    print(f"{'start-up + command (a new process, about)':<48} {startup + first['total_s']:8.2f}")
    if rec["not_found"]:
        print("not found (not timed): " + ", ".join(rec["not_found"]))


# ------------------------------------------------------------------------------------ end to end
def timed_run(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MB, CPU seconds) of one command in a new process; a failure stops the benchmark."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {err.read().strip()}")
    return wall, rusage.ru_maxrss / 1024, rusage.ru_utime + rusage.ru_stime


def summary(values: list[dict]) -> dict:
    secs = [v["seconds"] for v in values]
    return {"n": len(secs), "seconds_mean": statistics.mean(secs), "seconds_max": max(secs),
            "seconds_min": min(secs), "cpu_seconds_mean": statistics.mean(v["cpu_s"] for v in values),
            "peak_mb_max": max(v["peak_mb"] for v in values)}


def end_to_end(n: int, threads: int, whole_head: bool, data: Path | None, repeat_startup: int = 3) -> dict:
    """New-process wall time and peak memory of every command over the first n validation subjects."""
    import common

    rows = common.validation_rows(common.data_folder(data), n=n)
    py = [sys.executable, "-m", "atlasmorph_cli"]
    env = dict(os.environ)
    results: dict[str, list[dict]] = defaultdict(list)
    load = []

    def record(name: str, cmd: list[str], **extra) -> None:
        wall, mb, cpu = timed_run(cmd, env)
        results[name].append({"seconds": wall, "cpu_s": cpu, "peak_mb": mb, **extra})
        load.append(os.getloadavg()[0])
        print(f"{name:<28} {extra.get('subject', ''):<16} {wall:6.2f} s (cpu {cpu:6.2f} s) {mb:6.0f} MB  "
              f"load {load[-1]:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        out.mkdir()
        for _ in range(repeat_startup):
            record("python -c pass", [sys.executable, "-c", "pass"])
            for command in ("template", "register", "segment"):
                record(f"{command} --help", [*py, command, "--help"])
        for _ in range(repeat_startup):
            record("template", [*py, "template", "--age", "70", "--sex", "F", "-o", str(out / "t.nii.gz"),
                                "--labels", str(out / "l.nii.gz"), "--threads", str(threads)])
        brains = []
        for r in rows:
            brain = write_brain(r, tmp)
            brains.append({**r, "t1": str(brain)})
            for command in ("segment", "register"):
                record(command, [*py, *subject_argv(command, r, brain, out), "--threads", str(threads)],
                       subject=r["subject"])
                if whole_head:
                    record(f"{command} whole-head", [*py, *subject_argv(command, r, Path(r["t1"]), out),
                                                      "--threads", str(threads)], subject=r["subject"])
        cohort = tmp / "cohort.csv"
        with open(cohort, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["subject", "t1", "age", "sex"])
            w.writeheader()
            w.writerows({k: b[k] for k in ("subject", "t1", "age", "sex")} for b in brains)
        wall, mb, cpu = timed_run([*py, "segment", str(cohort), "--out-dir", str(tmp / "batch"),
                                   "--threads", str(threads)], env)
        results["segment batch (per subject)"].append({"seconds": wall / len(rows), "cpu_s": cpu / len(rows),
                                                       "peak_mb": mb,
                                                       "batch_seconds": wall, "subjects": len(rows)})
        load.append(os.getloadavg()[0])
        print(f"segment batch of {len(rows)}: {wall:.2f} s, {wall / len(rows):.2f} s/subject, {mb:.0f} MB", flush=True)
    return {"subjects": [r["subject"] for r in rows], "threads": threads,
            "load_average_1min_mean": statistics.mean(load), "load_average_1min_max": max(load),
            "summary": {k: summary(v) for k, v in results.items()}, "runs": dict(results)}


def print_end_to_end(rec: dict) -> None:
    print(f"\n{'command (new process)':<28} {'n':>3} {'mean s':>7} {'min s':>7} {'max s':>7} {'CPU s':>7} "
          f"{'peak MB':>8}")
    for name, s in rec["summary"].items():
        print(f"{name:<28} {s['n']:3d} {s['seconds_mean']:7.2f} {s['seconds_min']:7.2f} {s['seconds_max']:7.2f} "
              f"{s['cpu_seconds_mean']:7.2f} {s['peak_mb_max']:8.0f}")
    print(f"load average (1 min) during the runs: mean {rec['load_average_1min_mean']:.2f}, "
          f"max {rec['load_average_1min_max']:.2f}")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["e2e"]:
        ap = argparse.ArgumentParser(description="end to end in new processes over validation subjects")
        ap.add_argument("--n", type=int, default=3, help="first n validation subjects of the shipped model (by id)")
        ap.add_argument("--threads", type=int, default=2)
        ap.add_argument("--whole-head", action="store_true", help="also the raw T1s (brain extracted by the tool)")
        ap.add_argument("--startup-repeat", type=int, default=3, help="runs of the start-up and template commands")
        ap.add_argument("--data", type=Path, default=None)
        ap.add_argument("--json", type=Path, default=None)
        args = ap.parse_args(argv[1:])
        import common

        rec = end_to_end(args.n, args.threads, args.whole_head, args.data, args.startup_repeat)
        print_end_to_end(rec)
        if args.json:
            common.write_json(args.json, {"command": common.command_line("profile_segment.py", argv),
                                          "machine": common.describe_machine(with_torch=True), **common.clean(rec)})
        return 0
    if argv[:1] == ["profile"]:
        argv = argv[1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage="%(prog)s [options] -- COMMAND ARGS")
    ap.add_argument("--threads", type=int, default=2, help="--threads given to the command (unless it has one)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of the command in this process")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="stage seconds by wall clock (perf_counter), or by this process's CPU time (process_time: "
                         "with --threads 1, what a stage costs whatever else the machine runs)")
    ap.add_argument("--ixi", default=None, help="IXI subject id: its brain (T1 x seg > 0) as input, its age and sex")
    ap.add_argument("--whole-head", action="store_true", help="with --ixi: its raw whole-head T1 instead")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- and the atlasmorph command line")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the atlasmorph command line after --")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as tmp:
        if args.ixi:
            row = ixi_subject(args.ixi, args.data)
            image = Path(row["t1"]) if args.whole_head else write_brain(row, Path(tmp))
            command = subject_argv(command[0], row, image, Path(tmp)) + command[1:]
        startup = interpreter_startup()
        rec = profile(command, args.threads, args.repeat,
                      time.process_time if args.clock == "cpu" else time.perf_counter)
    rec["python_startup_s"] = startup
    print_profile(rec)
    if args.json:
        import common

        common.write_json(args.json, {"command": common.command_line("profile_segment.py", argv),
                                      "machine": common.describe_machine(), **common.clean(rec)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
