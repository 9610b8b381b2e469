"""Peak memory of the commands of issue 18 (items 5-6): each one a fresh `atlasmorph` process.

Cases (the shipped model, `--threads 1`, brain masks given with --mask so that no brain extraction runs):

* ``template --age 20:80:1`` with labels, probabilities and a PNG (61 ages; 5.6 GB before streaming);
* ``template --age 0:130:0.01`` (13,001 ages: refused before any work);
* ``segment --probs --vol`` on a 1 mm 256 x 256 x 180 image (4.1 GB before streaming);
* ``register`` with every output (-o -O -t -T --labels --jacobian --affine) on the same image;
* ``segment --probs`` and ``register`` with every output on an image at the voxel limit
  (`limits.MAX_VOXELS`: 2^25 voxels, 322 x 322 x 323 at 0.6 mm);
* ``segment`` of a 2 MB gzip bomb whose header claims 1300^3 voxels (refused from the header).

The inputs are a real IXI brain (its DLMUSE seg > 0 as the mask) resampled onto those grids
(trilinear). The peak is the child's VmHWM (/proc/self/status at exit; Linux only: the rusage of a
child forked from this large process would count the parent's pages). Writes
docs/benchmarks/memory_limits.json and prints a Markdown table. Takes about 20 minutes on 2 busy cores.

    OMP_NUM_THREADS=1 python benchmarks/memory_limits.py
"""
from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import common
from atlasmorph_cli.limits import MAX_VOXELS
from atlasmorph_cli.geometry.space import Grid, resample

LIMIT_GB = 3.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_data_option(p)
    p.add_argument("--out", type=Path, default=common.ROOT / "docs" / "benchmarks" / "memory_limits.json")
    p.add_argument("--skip-limit", action="store_true", help="leave out the cases at the voxel limit (the slow ones)")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    return p.parse_args()


def grid_around(affine: np.ndarray, shape_src, shape: tuple[int, int, int], zoom: float) -> Grid:
    """A grid of `shape` voxels of `zoom` mm with the source's axis directions, centred on the source's centre."""
    dirs = affine[:3, :3] / np.sqrt((affine[:3, :3] ** 2).sum(0))
    centre = affine[:3, :3] @ ((np.array(shape_src) - 1) / 2) + affine[:3, 3]
    a = np.eye(4)
    a[:3, :3] = dirs * zoom
    a[:3, 3] = centre - a[:3, :3] @ ((np.array(shape) - 1) / 2)
    return Grid(shape, a)


def make_inputs(data: Path, work: Path, with_limit: bool) -> dict[str, Path]:
    row = common.with_attributes(common.ixi_rows(data), 1)[0]
    t1 = nib.load(row["t1"])
    seg = nib.load(row["seg"])
    brain = np.asarray(t1.dataobj, dtype=np.float32) * (np.asarray(seg.dataobj) > 0)
    mask = (np.asarray(seg.dataobj) > 0).astype(np.float32)
    grids = {"1mm": ((256, 256, 180), 1.0)}
    if with_limit:
        n = round(MAX_VOXELS ** (1 / 3))
        while n * n * (n + 1) <= MAX_VOXELS:
            n += 1
        grids["limit"] = ((n - 1, n - 1, MAX_VOXELS // ((n - 1) * (n - 1))), 0.6)
    paths = {}
    for name, (shape, zoom) in grids.items():
        g = grid_around(t1.affine, t1.shape, shape, zoom)
        for kind, vol, dtype in (("brain", brain, np.int16), ("mask", mask, np.uint8)):
            out = np.zeros(shape, dtype=np.float32)
            step = max(1, (1 << 22) // (shape[1] * shape[2]))
            for i in range(0, shape[0], step):  # slab by slab: the benchmark itself stays small
                a = g.affine.copy()
                a[:3, 3] += a[:3, 0] * i
                rows = min(step, shape[0] - i)
                out[i:i + rows] = resample(vol, t1.affine, Grid((rows, *shape[1:]), a))
            data_out = np.rint(out).astype(dtype) if kind == "brain" else (out >= 0.5).astype(dtype)
            p = work / f"{kind}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(data_out, g.affine), str(p))
            paths[f"{kind}_{name}"] = p
    # a gzip bomb: a header claiming 1300^3 uint8 voxels, then 2.2 GB of zeros as repeated gzip members
    hdr = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).header
    hdr.set_data_shape((1300, 1300, 1300))
    zeros = gzip.compress(b"\x00" * (1 << 24), compresslevel=9)
    bomb = work / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(hdr.binaryblock + b"\x00" * 4) + zeros * -(-1300 ** 3 // (1 << 24)))
    paths["bomb"] = bomb
    paths["age"], paths["sex"] = row["age"], row["sex"]
    return paths


CHILD = """
import atexit, os, sys
def _peak():  # VmHWM: the peak resident set of this process image (not of the forked parent's pages)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                with open(os.environ["ATLASMORPH_PEAK_FILE"], "w") as out:
                    out.write(line.split()[1])
atexit.register(_peak)
from atlasmorph_cli.cli import main
sys.argv = ["atlasmorph", *sys.argv[1:]]
main()
"""


def run_case(argv: list[str], cwd: Path) -> dict:
    peak_file = cwd / ".peak_kb"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATLASMORPH_PEAK_FILE": str(peak_file)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    err = r.stderr.decode(errors="replace")
    peak_kb = int(peak_file.read_text()) if peak_file.is_file() else float("nan")
    return {"exit": r.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_mb": round(peak_kb / 1024, 1), "stderr_last": err.strip().splitlines()[-1] if err.strip() else ""}


def main() -> None:
    args = parse_args()
    data = common.data_folder(args.data)
    work = Path(tempfile.mkdtemp(prefix="memory_limits."))
    p = make_inputs(data, work, not args.skip_limit)
    attrs = ["--age", str(p["age"]), "--sex", p["sex"], "--threads", "1"]
    every_register_output = ["-o", "moved.nii.gz", "-O", "tmpl.nii.gz", "-t", "warp.nii.gz", "-T", "inv.nii.gz",
                             "--labels", "labels.nii.gz", "--jacobian", "jac.nii.gz", "--affine", "aff.txt"]
    cases = [
        ("template --age 20:80:1 (61 ages: T1, labels, probs, PNG)",
         ["template", "--age", "20:80:1", "--sex", "F", "--threads", "1", "-o", "t.nii.gz", "--labels", "l.nii.gz",
          "--probs", "p.nii.gz", "--png", "t.png"], 0),
        ("template --age 0:130:0.01 (refused)", ["template", "--age", "0:130:0.01", "--sex", "F", "-o", "u.nii.gz"], 1),
        ("segment --probs --vol, 1 mm 256x256x180",
         ["segment", str(p["brain_1mm"]), "--mask", str(p["mask_1mm"]), *attrs, "-o", "s1.nii.gz", "--probs",
          "p1.nii.gz", "--vol", "v1.csv"], 0),
        ("register, every output, 1 mm 256x256x180",
         ["register", str(p["brain_1mm"]), "--mask", str(p["mask_1mm"]), *attrs,
          *[a.replace(".nii.gz", "_1.nii.gz").replace(".txt", "_1.txt") for a in every_register_output]], 0),
        ("segment of a gzip bomb (1300^3 voxels, 2 MB; refused)",
         ["segment", str(p["bomb"]), *attrs, "-o", "b.nii.gz"], 1),
    ]
    if not args.skip_limit:
        shape = nib.load(str(p["brain_limit"])).shape
        size = "x".join(map(str, shape))
        cases += [
            (f"segment --probs --vol at the voxel limit ({size}, 0.6 mm)",
             ["segment", str(p["brain_limit"]), "--mask", str(p["mask_limit"]), *attrs, "-o", "s2.nii.gz",
              "--probs", "p2.nii.gz", "--vol", "v2.csv"], 0),
            (f"register, every output, at the voxel limit ({size}, 0.6 mm)",
             ["register", str(p["brain_limit"]), "--mask", str(p["mask_limit"]), *attrs,
              *[a.replace(".nii.gz", "_2.nii.gz").replace(".txt", "_2.txt") for a in every_register_output]], 0),
        ]
    if args.only:
        cases = [c for c in cases if args.only in c[0]]
    results = []
    for name, argv, expected in cases:
        r = run_case(argv, work)
        r.update({"case": name, "command": "atlasmorph " + " ".join(a if "/" not in a else Path(a).name for a in argv),
                  "expected_exit": expected, "within_limit": r["peak_mb"] <= LIMIT_GB * 1024})
        results.append(r)
        print(f"{name}: exit {r['exit']}, peak {r['peak_mb']:.0f} MB, {r['seconds']} s  {r['stderr_last'][:120]}",
              flush=True)
    out = {"what": "peak resident memory (ru_maxrss) of one atlasmorph process per case", "limit_gb": LIMIT_GB,
           "max_voxels": MAX_VOXELS, "machine": common.platform_record(), "cases": results}
    common.write_json(args.out, out)
    print("\n| case | exit | peak (MB) | seconds |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['exit']} | {r['peak_mb']:.0f} | {r['seconds']} |")
    bad = [r["case"] for r in results if r["exit"] != r["expected_exit"] or not r["within_limit"]]
    if bad:
        sys.exit(f"memory_limits: over {LIMIT_GB} GB or unexpected exit code: {bad}")


if __name__ == "__main__":
    main()
