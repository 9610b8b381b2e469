"""Shared helpers of the benchmark scripts: the data folder, subjects and split, machine, JSON and figures.

The scripts run as `python benchmarks/<name>.py`, so this folder is on sys.path and `import common` works.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SPLIT = ROOT / "docs" / "benchmarks" / "atlasmorph-ixi-2mm-v1_split.json"


# ------------------------------------------------------------------------------ data and subjects
def add_data_option(ap: argparse.ArgumentParser) -> None:
    """The --data option every script that reads the shared data takes."""
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: ATLASMORPH_DATA or ../shared/data)")


def add_model_options(ap: argparse.ArgumentParser, cache: bool = False) -> None:
    """--model and --split (the shipped model and its split by default), and with `cache` the required --cache."""
    ap.add_argument("--model", type=Path, default=None, help="model file (default: the shipped default)")
    ap.add_argument("--split", type=Path, default=SHIPPED_SPLIT, help="split.json (default: the shipped model's)")
    if cache:
        ap.add_argument("--cache", type=Path, required=True, help="the training cache (atlasmorph train --cache) of the split")


def load_cached(cache: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Model-space T1s (N, X, Y, Z) float32 and label maps (N, X, Y, Z) uint8 of subjects in a training cache;
    exits with a one-line message when one is not cached."""
    missing = [s for s in ids if not (cache / f"{s}.npz").is_file()]
    if missing:
        sys.exit(f"{cache}: {len(missing)} subjects are not cached (e.g. {missing[0]}); run atlasmorph train --cache first")
    t1, lab = [], []
    for sid in ids:
        with np.load(cache / f"{sid}.npz") as z:
            t1.append(z["t1"].astype(np.float32))
            lab.append(z["labels"])
    return np.stack(t1), np.stack(lab)


def data_folder(given: Path | None = None) -> Path:
    """The shared data folder (--data, else ATLASMORPH_DATA or ../shared/data); exits with code 2 if absent."""
    from atlasmorph_cli.io.datadir import find_data_dir

    data = given or find_data_dir()
    if data is None or not (data / "ixi" / "subjects.csv").is_file():
        print("no data folder (set ATLASMORPH_DATA or provide ../shared/data)", file=sys.stderr)
        raise SystemExit(2)
    return data


def model_file(given: Path | None) -> Path:
    """The model file to benchmark (--model, else the shipped one); exits with code 2 and the reason if none."""
    from atlasmorph_cli.errors import AtlasMorphError
    from atlasmorph_cli.model.shipped import resolve_model

    try:
        return resolve_model(given)
    except AtlasMorphError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2)


def ixi_rows(data: Path) -> list[dict]:
    """The rows of ixi/subjects.csv, with `t1` and `seg` as absolute paths (strings)."""
    ixi = data / "ixi"
    with open(ixi / "subjects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["t1"] = str(ixi / r["t1"])
        if r.get("seg"):
            r["seg"] = str(ixi / r["seg"])
    return rows


def with_attributes(rows: list[dict], n: int | None = None) -> list[dict]:
    """Rows that have age and sex, sorted by subject id, at most n."""
    out = sorted((r for r in rows if r.get("age") and r.get("sex")), key=lambda r: r["subject"])
    return out[:n] if n else out


def pick_subjects(rows: list[dict], ids, n: int | None) -> list[dict]:
    """Rows of `ids` that have a label map, age and sex, sorted by subject id, at most n."""
    want = set(ids)
    return with_attributes([r for r in rows if r["subject"] in want and r.get("seg")], n)


def split_ids(split_path: Path | None, model_path: Path) -> tuple[dict, str]:
    """The train/validation subject lists: --split, else the model's configuration, else split.json beside it."""
    if split_path is not None:
        return json.loads(Path(split_path).read_text()), str(split_path)
    from atlasmorph_cli.model.model_file import read_config

    training = read_config(model_path).training or {}
    for key in ("split", "subjects"):
        if isinstance(training.get(key), dict) and "validation" in training[key]:
            return training[key], f"{model_path} (configuration: training.{key})"
    if "validation" in training and isinstance(training["validation"], list):
        return {"train": training.get("train", []), "validation": training["validation"]}, f"{model_path} (configuration)"
    beside = Path(model_path).with_name("split.json")
    if beside.is_file():
        return json.loads(beside.read_text()), str(beside)
    raise SystemExit(f"{model_path}: its configuration lists no subjects and there is no split.json beside it; "
                     "pass --split PATH (the split.json written by `atlasmorph train`)")


def tests_module(name: str):
    """A module of tests/ that a benchmark reuses (the tests' own cases and broken inputs), imported with
    the tests folder first on the path, as pytest imports it (its neighbours conftest, synthetic import by name)."""
    import importlib

    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def validation_rows(data: Path, split_path: Path = SHIPPED_SPLIT, n: int | None = None) -> list[dict]:
    """The first n validation subjects of a split (the shipped model's by default), by id."""
    return pick_subjects(ixi_rows(data), json.loads(Path(split_path).read_text())["validation"], n)


# ------------------------------------------------------------------------------ machine and files
def _proc_field(path: str, key: str) -> str | None:
    """The value after `key` in a /proc file (Linux), or None elsewhere."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def describe_machine(with_torch: bool = False) -> str:
    """CPU model, logical CPUs, RAM, OS and kernel, e.g. 'AMD EPYC, 2 logical CPUs, 24 GiB RAM, Linux 6.1'
    (and the torch version when asked)."""
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem = _proc_field("/proc/meminfo", "MemTotal")
    ram = f", {int(mem.split()[0]) / 1024 ** 2:.0f} GiB RAM" if mem else ""
    text = f"{cpu}, {os.cpu_count()} logical CPUs{ram}, {platform.system()} {platform.release()}"
    if with_torch:
        import torch

        text += f", torch {torch.__version__}"
    return text


def platform_record() -> dict:
    """Logical CPUs, Python and platform, as the memory benchmarks record them."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MB; NaN where there is none."""
    value = _proc_field("/proc/self/status", field + ":")
    return int(value.split()[0]) / 1024.0 if value else float("nan")


def peak_mb() -> float:
    """Peak resident memory of this process (VmHWM, else the rusage maximum), MB."""
    mb = proc_status_mb("VmHWM")
    if math.isfinite(mb):
        return mb
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def versions(*dists: str) -> dict:
    """Python, atlasmorph and the given distributions' versions (None when not installed)."""
    import importlib.metadata as md

    import atlasmorph_cli

    out = {"python": platform.python_version(), "atlasmorph": atlasmorph_cli.__version__}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ results
def command_line(script: str, argv: list[str] | None) -> str:
    """How the script was run, for the record: 'python benchmarks/<script> ARGS'."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def clean(obj):
    """JSON-safe copy: NaN/Inf -> None, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path, obj) -> Path:
    """Write obj as indented JSON (folder created, trailing newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on the benchmark machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write at the figures' common resolution and close."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
