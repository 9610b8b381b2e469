"""Calibrate the quality check (atlasmorph_cli/inference/quality.py): its figures on the IXI validation subjects
(whole-head T1, no mask, as a user runs `segment`; and again with their own DLMUSE mask, seg > 0, as
--mask) and on deliberately broken inputs made from some of
them (tests/broken_inputs.py: a whole-head scan passed as skull-stripped, flipped and rotated headers,
inverted contrast, noise, a mask in the air, a mask taking in the skull, a 2-voxel slab; plus a
smoothed probabilistic mask, which must pass).

    OMP_NUM_THREADS=1 python benchmarks/quality_calibration.py --threads 1 --broken-n 3 \\
        --json docs/benchmarks/quality_calibration.json

A broken input is caught when it is flagged or refused with an error; a validation subject must not be.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import common  # noqa: E402
from atlasmorph_cli.inference.brain_extraction import resolve_brain  # noqa: E402
from atlasmorph_cli.errors import AtlasMorphError  # noqa: E402
from atlasmorph_cli.io.volumes import Volume, load_volume  # noqa: E402
from atlasmorph_cli.inference.registration import register_subject  # noqa: E402
from atlasmorph_cli.inference.template import encode_attributes  # noqa: E402
from atlasmorph_cli.model.shipped import load  # noqa: E402
from atlasmorph_cli.inference.quality import assess  # noqa: E402

BROKEN_INPUTS = common.tests_module("broken_inputs")  # the tests' own broken inputs
BROKEN, PASSING = BROKEN_INPUTS.BROKEN, BROKEN_INPUTS.PASSING


def run_case(model, vec, subj: Volume, mask: Volume | None, skullstripped: bool, name: str) -> dict:
    """Brain, registration and quality check of one input; a refused input counts as caught."""
    t0 = time.perf_counter()
    try:
        brain = resolve_brain(subj, mask, skullstripped)
        reg = register_subject(model, subj, vec, brain.as_volume(subj))
        q = assess(reg, brain.mask, name, brain.source)
        out = q.to_dict()
        out["caught"] = q.flagged
    except AtlasMorphError as exc:
        out = dict(subject=name, error=" ".join(str(exc).split()), caught=True)
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=common.SHIPPED_SPLIT)
    ap.add_argument("--n", type=int, default=None, help="first N validation subjects only")
    ap.add_argument("--broken-n", type=int, default=3, help="validation subjects each broken input is made from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    common.add_data_option(ap)
    args = ap.parse_args()
    subjects = common.validation_rows(common.data_folder(args.data), args.split, args.n)
    _, model = load(None, args.threads)
    valid, valid_mask, broken = [], [], []
    for r in subjects:
        sid = r["subject"]
        vec, _ = encode_attributes(model, {"age": r["age"], "sex": r["sex"]})
        t1 = load_volume(r["t1"])
        valid.append(run_case(model, vec, t1, None, False, sid))
        seg = load_volume(r["seg"]).data
        valid_mask.append(run_case(model, vec, t1, Volume((seg > 0).astype(np.float32), t1.affine), False,
                                   f"{sid}:own_mask"))
    for r in subjects[: args.broken_n]:
        sid = r["subject"]
        vec, _ = encode_attributes(model, {"age": r["age"], "sex": r["sex"]})
        t1 = load_volume(r["t1"])
        seg = load_volume(r["seg"]).data.astype(np.int32)
        for kind, maker in {**BROKEN, **PASSING}.items():
            c = maker(t1.data, t1.affine, seg)
            subj = Volume(c.data.astype(np.float32), c.affine, None)
            mask = Volume(c.mask.astype(np.float32), c.affine) if c.mask is not None else None
            res = run_case(model, vec, subj, mask, c.skullstripped, f"{sid}:{kind}")
            res["kind"], res["must_pass"] = kind, kind in PASSING
            broken.append(res)
    keys = ("score", "ncc", "mask_dice", "scale_min", "scale_max", "rotation_deg")
    summary = {}
    for name, group in (("validation", valid), ("validation_own_mask", valid_mask)):
        summary[name] = {"n": len(group), "flagged": sum(bool(v["caught"]) for v in group)}
        for k in (*keys, "extraction_dice"):
            vals = [v[k] for v in group if v.get(k) is not None]
            if vals:
                summary[name][k] = dict(min=min(vals), max=max(vals), mean=float(np.mean(vals)))
    summary["broken"] = {}
    for kind in {**BROKEN, **PASSING}:
        these = [b for b in broken if b["kind"] == kind]
        summary["broken"][kind] = dict(n=len(these), caught=sum(bool(b["caught"]) for b in these),
                                       must_pass=kind in PASSING,
                                       scores=[b.get("score") for b in these],
                                       errors=[b.get("error") for b in these if b.get("error")])
    print(json.dumps(summary, indent=1))
    if args.json:
        common.write_json(args.json, dict(summary=summary, validation=valid, validation_own_mask=valid_mask,
                                          broken=broken))


if __name__ == "__main__":
    main()
