"""Byte-identity check of the shipped model's outputs: a sha256 manifest of every file the commands write.

Runs `python -m atlasmorph_cli` (whatever package is first on PYTHONPATH, so old and new code can be
compared) in subprocesses with `--threads 1` on fixed inputs: `template`, `register` (every output, warps
in both formats), `segment`, and batch `register`/`segment` over two subjects. `--write` stores the
manifest; `--check` reruns the commands and exits 1 listing every file whose bytes differ.

    PYTHONPATH=/work/train-src python tools/output_identity.py --write tools/output_identity_0580008.json \
        --model models/atlasmorph-ixi-2mm-v1.safetensors
    python tools/output_identity.py --check tools/output_identity_0580008.json --model models/atlasmorph-ixi-2mm-v1.safetensors

The inputs are the first two validation subjects of the shipped model's split (their T1 with `seg > 0`
as the brain mask, so no brain extraction is run). The tool never imports atlasmorph_cli itself.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLIT = ROOT / "docs" / "benchmarks" / "atlasmorph-ixi-2mm-v1_split.json"
# a fixed work folder: output files that record their own or their inputs' paths then stay comparable
DEFAULT_WORK = Path(tempfile.gettempdir()) / "atlasmorph-output-identity"


def data_folder(given: Path | None) -> Path:
    """The shared data folder: --data, else ATLASMORPH_DATA, else ../shared/data beside the repository."""
    if given is not None:
        return given
    env = os.environ.get("ATLASMORPH_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def subjects(data: Path, n: int) -> list[dict[str, str]]:
    """The first n validation subjects of the shipped model's split, with absolute t1/seg paths."""
    wanted = json.loads(SPLIT.read_text())["validation"][:n]
    with open(data / "ixi" / "subjects.csv", newline="") as fh:
        rows = {r["subject"]: r for r in csv.DictReader(fh)}
    out = []
    for sid in wanted:
        r = rows[sid]
        out.append({"subject": sid, "t1": str(data / "ixi" / r["t1"]), "seg": str(data / "ixi" / r["seg"]),
                    "age": r["age"], "sex": r["sex"]})
    return out


def commands(work: Path, subs: list[dict[str, str]]) -> dict[str, list[str]]:
    """Name -> atlasmorph argument list for every run; outputs go to work/<name>/."""
    one = subs[0]
    single = [one["t1"], "--mask", one["seg"], "--age", one["age"], "--sex", one["sex"]]
    cohort = work / "cohort.csv"
    reg = {f: work / f"register_{f}" for f in ("fs", "itk")}
    return {
        "template": ["template", "--age", "70", "--sex", "F", "-o", f"{work}/template/T1.nii.gz",
                     "--labels", f"{work}/template/labels.nii.gz", "--probs", f"{work}/template/probs.nii.gz"],
        "register_fs": ["register", *single, "--warp-format", "fs",
                        "-o", f"{reg['fs']}/moved.nii.gz", "-O", f"{reg['fs']}/template.nii.gz",
                        "-t", f"{reg['fs']}/warp.nii.gz", "-T", f"{reg['fs']}/inverse.nii.gz",
                        "--affine", f"{reg['fs']}/affine.txt", "--labels", f"{reg['fs']}/labels.nii.gz",
                        "--jacobian", f"{reg['fs']}/logjacobian.nii.gz", "--brain-mask", f"{reg['fs']}/mask.nii.gz",
                        "--brain", f"{reg['fs']}/brain.nii.gz", "--quality", f"{reg['fs']}/quality.json"],
        "register_itk": ["register", *single, "--warp-format", "itk",
                         "-t", f"{reg['itk']}/warp.nii.gz", "-T", f"{reg['itk']}/inverse.nii.gz",
                         "--affine", f"{reg['itk']}/affine.txt", "--labels", f"{reg['itk']}/labels.nii.gz"],
        "segment": ["segment", *single, "-o", f"{work}/segment/dseg.nii.gz", "--probs", f"{work}/segment/probs.nii.gz",
                    "--vol", f"{work}/segment/volumes.csv", "--quality", f"{work}/segment/quality.json",
                    "--brain-mask", f"{work}/segment/mask.nii.gz"],
        "batch_register": ["register", str(cohort), "--out-dir", f"{work}/batch_register",
                           "--outputs", "moved,template,warp,inverse,affine,labels,jacobian,brainmask,brain"],
        "batch_segment": ["segment", str(cohort), "--out-dir", f"{work}/batch_segment",
                          "--outputs", "dseg,probseg,brainmask,brain"],
    }


def write_cohort(path: Path, subs: list[dict[str, str]]) -> None:
    """The batch runs' cohort CSV: id, T1, seg (seg > 0 is the mask), age, sex."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["subject", "t1", "seg", "age", "sex"])
        w.writeheader()
        w.writerows(subs)


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of the file's bytes and, for .gz files, of the decompressed bytes (tells data from header changes)."""
    raw = path.read_bytes()
    out = {"sha256": hashlib.sha256(raw).hexdigest()}
    if path.suffix == ".gz":
        out["data_sha256"] = hashlib.sha256(gzip.decompress(raw)).hexdigest()
    return out


def run_all(work: Path, model: Path | None, data: Path, only: list[str] | None) -> tuple[dict, dict]:
    """Run every command into a fresh work folder; (files: relative path -> hashes, info about the run)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    subs = subjects(data, 2)
    write_cohort(work / "cohort.csv", subs)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    info: dict = {"subjects": [s["subject"] for s in subs], "python": sys.version.split()[0]}
    # cwd is the work folder: `python -m` puts the cwd first on sys.path, which must not shadow PYTHONPATH
    where = subprocess.run([sys.executable, "-c", "import atlasmorph_cli; print(atlasmorph_cli.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    info["package"] = where.stdout.strip()
    for name, args in commands(work, subs).items():
        if only and name not in only:
            continue
        (work / name).mkdir(exist_ok=True)  # single-file outputs need an existing folder; batch ones create it
        cmd = [sys.executable, "-m", "atlasmorph_cli", *args, "--threads", "1"]
        if model is not None:
            cmd += ["--model", str(model)]
        print(f"[{name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    files = {str(p.relative_to(work)): file_hashes(p) for p in sorted(work.rglob("*")) if p.is_file()
             and p.name != "cohort.csv"}
    return files, info


def differences(expected: dict[str, dict[str, str]], got: dict[str, dict[str, str]]) -> list[str]:
    """One line per file that is missing, new, or whose hashes differ."""
    lines = []
    for name in sorted(set(expected) | set(got)):
        if name not in got:
            lines.append(f"missing: {name}")
        elif name not in expected:
            lines.append(f"new:     {name}")
        elif expected[name] != got[name]:
            same_data = "data_sha256" in got[name] and expected[name].get("data_sha256") == got[name]["data_sha256"]
            lines.append(f"differs: {name}" + (" (decompressed data identical: header/gzip only)" if same_data else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="MANIFEST", help="run and write the manifest")
    mode.add_argument("--check", type=Path, metavar="MANIFEST", help="run and compare with the manifest (exit 1 on differences)")
    ap.add_argument("--model", type=Path, default=None, help="model file passed to every command (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: ATLASMORPH_DATA or ../shared/data)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"scratch folder, wiped first (default {DEFAULT_WORK})")
    ap.add_argument("--only", nargs="+", default=None, help="run only these commands (names as in the manifest's files)")
    a = ap.parse_args(argv)
    data = data_folder(a.data)
    if not (data / "ixi" / "subjects.csv").exists():
        print(f"no data folder at {data} (set ATLASMORPH_DATA or --data)", file=sys.stderr)
        return 2
    model = a.model.resolve() if a.model else None
    files, info = run_all(a.work.resolve(), model, data, a.only)
    if model is not None:
        info["model_sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
    if a.write:
        a.write.write_text(json.dumps({"info": info, "files": files}, indent=1, sort_keys=True) + "\n")
        print(f"{len(files)} files -> {a.write}")
        return 0
    expected = json.loads(a.check.read_text())["files"]
    if a.only:
        expected = {k: v for k, v in expected.items() if k.split("/")[0] in a.only}
    diff = differences(expected, files)
    print("\n".join(diff) if diff else f"all {len(files)} files byte-identical to {a.check}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
