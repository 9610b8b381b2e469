"""Accuracy of cheaper affine and refinement settings (issue 19): final Dice and CPU seconds per variant.

For the validation subjects of the shipped model (T1 inside its own DLMUSE mask, scored in the native grid as
segmentation_benchmark.py does), the attribute-matched template is registered with each affine variant (the
levels of geometry.affine.fit_affine) and, on each affine, with each refinement setting (steps@lr); one thread.

    python benchmarks/speed_settings.py --split docs/benchmarks/atlasmorph-ixi-2mm-v1_split.json \\
        --json docs/benchmarks/speed_settings.json
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import common  # noqa: E402
from segmentation_methods import load_subject, score  # noqa: E402


# the variants measured for issue 19 (docs/benchmarks.md, section 3); "4mm40+2mm5" is the schedule of 463ab20
VARIANTS = ("4mm40+2mm5", "4mm40", "4mm20", "4mm40+2mm3", "mi40+4mm40+2mm3", "4mm25+2mm3", "cand15+4mm40+2mm3",
            "cand15+mi40+4mm25+2mm3", "mi40+4mm25+2mm3")


def affine_schedule(name: str):
    """(levels, candidate steps) that a variant's name spells, "+"-separated: candN (steps per candidate rotation,
    default 30), miN (MI at 8 mm, default 80 steps), 4mmN and 2mmN (local NCC steps at 4 and 2 mm; a level that
    is not named is left out)."""
    from atlasmorph_cli.geometry.affine import CANDIDATE_ITERATIONS, Level

    steps = {"cand": CANDIDATE_ITERATIONS, "mi": 80}
    for token in name.split("+"):
        key = next((k for k in ("cand", "mi", "4mm", "2mm") if token.startswith(k)), None)
        if key is None or not token[len(key):].isdigit():
            raise SystemExit(f"affine variant {name!r}: cannot read {token!r} (candN, miN, 4mmN, 2mmN)")
        steps[key] = int(token[len(key):])
    levels = [Level("mi", 8.0, 4.0, steps["mi"], 1.0)]
    if "4mm" in steps:
        levels.append(Level("lncc", 4.0, 2.0, steps["4mm"], 0.3, radius=2))
    if "2mm" in steps:
        levels.append(Level("lncc", 2.0, 0.0, steps["2mm"], 0.1, radius=3))
    return tuple(levels), steps["cand"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", type=Path, default=None, help="split.json with the validation subjects")
    common.add_data_option(ap)
    ap.add_argument("--n", type=int, default=None, help="first N validation subjects (by id)")
    ap.add_argument("--refine", default="0@0,10@0.03,5@0.05,6@0.05", help="comma list of steps@lr (0@0: no refinement)")
    ap.add_argument("--affine", default=",".join(VARIANTS),
                    help="comma list of affine variants, e.g. mi40+4mm25+2mm3 (affine_schedule; default: VARIANTS)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    variants = {name: affine_schedule(name) for name in args.affine.split(",")}

    import torch

    from atlasmorph_cli import labels
    from atlasmorph_cli.geometry import affine
    from atlasmorph_cli.inference.registration import register_subject, subject_brain
    from atlasmorph_cli.inference.template import encode_attributes, make_template
    from atlasmorph_cli.io.volumes import Volume
    from atlasmorph_cli.model.shipped import load

    torch.set_num_threads(1)
    path, model = load(None, 1)
    split, source = common.split_ids(args.split, path)
    rows = common.pick_subjects(common.ixi_rows(common.data_folder(args.data)), split["validation"], args.n)
    refine = [(int(s), float(lr)) for s, lr in (item.split("@") for item in args.refine.split(","))]
    per: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        brain, mask, truth = load_subject(r)
        mask_vol = Volume(mask.astype(np.float32), brain.affine)
        vec, _ = encode_attributes(model, {"age": float(r["age"]), "sex": r["sex"]})
        tmpl = make_template(model, vec)
        _, norm = subject_brain(brain, mask_vol)
        line = [r["subject"]]
        for name, (levels, candidates) in variants.items():
            t0 = time.process_time()
            world = affine.fit_affine(norm, brain.affine, tmpl.t1 * (tmpl.probs[0] < 0.5), tmpl.grid, levels=levels,
                                      candidate_iterations=candidates)
            t_aff = time.process_time() - t0
            for steps, lr in refine:
                t0 = time.process_time()
                reg = register_subject(model, brain, vec, mask_vol, refine=steps, refine_lr=lr, template=tmpl,
                                       world=world)
                t_reg = time.process_time() - t0
                seg, _ = reg.labels_to_native()
                d = score(labels.to_index(seg, "freesurfer"), truth)["dice"]
                rec = per.setdefault(f"{name}|{steps}@{lr:g}", {"dice": [], "affine_cpu_s": [], "rest_cpu_s": []})
                rec["dice"].append(d)
                rec["affine_cpu_s"].append(t_aff)
                rec["rest_cpu_s"].append(t_reg)
                line.append(f"{name}|{steps}@{lr:g} {d:.4f}")
        print("  ".join(line), flush=True)
    summary = {k: {"dice_mean": float(np.mean(v["dice"])), "affine_cpu_s": float(np.mean(v["affine_cpu_s"])),
                   "network_refine_cpu_s": float(np.mean(v["rest_cpu_s"]))} for k, v in per.items()}
    print()
    for k, v in summary.items():
        print(f"{k:22s} Dice {v['dice_mean']:.4f}  affine {v['affine_cpu_s']:.2f} s  "
              f"network+refinement {v['network_refine_cpu_s']:.2f} s (CPU, 1 thread)")
    if args.json:
        common.write_json(args.json, {"command": common.command_line("speed_settings.py", argv),
                                      "machine": common.describe_machine(), "threads": 1, "split": source,
                                      "subjects": [r["subject"] for r in rows], "summary": summary,
                                      "per_subject": per})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
