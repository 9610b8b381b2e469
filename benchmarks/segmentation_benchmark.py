"""Atlas-based segmentation of held-out IXI subjects: AtlasMorph's templates against ANTs SyNCC.

For the validation subjects of a trained model (the split.json `atlasmorph train` writes), every method
gets the same input, the subject's T1 skull-stripped with its own DLMUSE mask (seg > 0) in its native
grid, and returns a 34-structure label map on that grid, scored (Dice) against the subject's own
DLMUSE labels mapped to the 34 structures:

  atlasmorph           the conditional template for the subject's true age and sex
                       (register_subject + labels_to_native, what `atlasmorph segment` runs)
  atlasmorph-average   the same model, no attributes (population-average template)
  atlasmorph-baseline  an unconditional model (`atlasmorph train --attributes none`), --baseline
  ants-syncc-mni       ants.registration(fixed=subject brain at 2 mm, moving=MNI152 brain, 'SyNCC'),
                       then the MNI152 DLMUSE labels (1 mm) pulled into the native grid ('genericLabel')
  ants-syncc-built     as ants-syncc-mni, against a template built by ants.build_template from
                       --template-subjects training subjects (labels: majority vote), off by default

Also reported: folding (% of brain voxels with a non-positive Jacobian determinant of the deformable
part), wall seconds and peak memory (VmHWM) per subject with every (method, subject) run in a fresh
worker process, the mean displacement (mm) of the deformable part (centrality) and Dice by age group.

    python benchmarks/segmentation_benchmark.py --model runs/v1/model.safetensors --split runs/v1/split.json \\
        [--baseline runs/uncond/model.safetensors] [--methods ...,ants-syncc-built] --out docs/benchmarks

writes <out>/segmentation.json, <out>/segmentation.md and <out>/dice_boxplot.png. ANTs (antspyx, the
`bench` extra) is optional: without it only the AtlasMorph methods are reported. The AtlasMorph methods
run first on every subject, then the ANTs ones, one method at a time over the subjects (on the first
--ants-n subjects only, if given: SyNCC takes 10-20 min per subject on 2 cores). `--results DIR` (default WORK/results) keeps every finished
(method, subject) result and the built ANTs template, in a folder per model (or template) content
(segmentation_cache.py); a result is reused whenever its inputs match (the content of the model and
template files, the subject, the method), so a run that was stopped, or one on another machine with
the same folder, continues where the last one stopped, and two models never overwrite each other; `--cached-only` runs
nothing new and reports what the folder holds. Every ANTs method is compared with ours on the subjects
that method ran on (a side-by-side section each).

This file is the command line and the order of the runs; segmentation_methods.py runs one method on one
subject (worker side), segmentation_cache.py keeps the results, segmentation_summary.py computes the
figures over subjects and segmentation_report.py writes the page and the plot.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# OpenMP worker threads that spin while idle make torch 10-20x slower whenever another process keeps a
# core busy (shared 2-core machine); must be set before torch is imported, here and in the workers
# (spawned workers import this file first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import common  # noqa: E402
from atlasmorph_cli.inference.refine_defaults import REFINE_LOSS  # noqa: E402
from segmentation_cache import refine_loss_entry, result_file, run_cached  # noqa: E402
from segmentation_methods import (  # noqa: E402
    ALL_METHODS, ANTS, ANTS_TRANSFORM, ANTS_WORKING_MM, DEFAULT_METHODS, NAMES, OURS, prepare_mni,
)
from segmentation_report import boxplot, console_summary, markdown  # noqa: E402
from segmentation_summary import (  # noqa: E402
    AGE_GROUPS, age_group, paired_subjects, side_by_side, summarise, template_gain)

SHORT = {"atlasmorph": "ours", "atlasmorph-average": "avg", "atlasmorph-baseline": "uncond",
         "ants-syncc-mni": "SyNCC-MNI", "ants-syncc-built": "SyNCC-built"}


def parser() -> argparse.ArgumentParser:
    """The command line (unchanged since the benchmark was one file)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    ap.add_argument("--split", type=Path, default=None,
                    help="split.json from `atlasmorph train` (default: the model's configuration, else split.json beside it)")
    ap.add_argument("--baseline", type=Path, default=None, help="unconditional model (trained with --attributes none)")
    ap.add_argument("--methods", default=None,
                    help=f"comma list from {','.join(ALL_METHODS)} (default: {','.join(DEFAULT_METHODS)}"
                         " + atlasmorph-baseline when --baseline is given)")
    ap.add_argument("--n", type=int, default=None, help="at most this many validation subjects (default: all)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="output folder (default docs/benchmarks)")
    common.add_data_option(ap)
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and ITK (default 2)")
    ap.add_argument("--template-subjects", type=int, default=10, help="training subjects for ants-syncc-built (default 10)")
    ap.add_argument("--template-iterations", type=int, default=2, help="ants.build_template iterations (default 2)")
    ap.add_argument("--ants-transform", default=ANTS_TRANSFORM,
                    help="type_of_transform of the ANTs methods (default SyNCC, what the method names say; "
                         "another one, e.g. 'antsRegistrationSyNQuick[s]', is named in the report)")
    ap.add_argument("--ants-n", type=int, default=None,
                    help="run the ANTs methods on the first N of those subjects only (10-20 min each on 2 cores)")
    ap.add_argument("--refine", type=int, default=None,
                    help="instance-optimisation steps of the AtlasMorph methods (default: what `atlasmorph segment` does)")
    ap.add_argument("--refine-loss", default=REFINE_LOSS,
                    help=f"image term of that refinement: 'ncc' or 'model' (the trained one); default: what "
                         f"`atlasmorph segment` does ({REFINE_LOSS})")
    ap.add_argument("--cached-only", action="store_true",
                    help="run nothing new: report only the results the --results folder already holds")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder of per-(method, subject) results, reused whenever the inputs match (default: WORK/results)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the MNI/ANTs files and per-task results, reused by a later run (default: temporary)")
    return ap


def chosen_methods(args, notes: list[str]) -> list[str]:
    """The methods to run: --methods or the default, without the ANTs ones when antspyx is missing."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else (
        list(DEFAULT_METHODS[:2]) + (["atlasmorph-baseline"] if args.baseline else []) + list(DEFAULT_METHODS[2:]))
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        print(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}", file=sys.stderr)
        raise SystemExit(2)
    if "atlasmorph-baseline" in methods and args.baseline is None:
        print("atlasmorph-baseline needs --baseline MODEL", file=sys.stderr)
        raise SystemExit(2)
    if any(m in ANTS for m in methods):
        try:
            import ants  # noqa: F401  (the optional `bench` dependency; the workers import it themselves)
        except ImportError as exc:
            notes.append(f"antspyx not available ({exc}); ANTs methods not run")
            print(notes[-1], file=sys.stderr)
            methods = [m for m in methods if m not in ANTS]
    return methods


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # inherited by the workers
    import torch

    from atlasmorph_cli.inference.refine_defaults import REFINE_LR, REFINE_STEPS

    torch.set_num_threads(args.threads)
    if args.refine is None:
        args.refine = REFINE_STEPS
    data_dir = common.data_folder(args.data)
    model_path = common.model_file(args.model)
    notes: list[str] = []
    methods = chosen_methods(args, notes)

    split, split_source = common.split_ids(args.split, model_path)
    rows = common.ixi_rows(data_dir)
    val = common.pick_subjects(rows, split.get("validation", []), args.n)
    if not val:
        print(f"no validation subject of {split_source} with labels, age and sex in {data_dir}/ixi", file=sys.stderr)
        return 2

    work_ctx = None
    if args.work is None:
        work_ctx = tempfile.TemporaryDirectory(prefix="atlasmorph-seg-bench-")
        work = Path(work_ctx.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    results_dir = args.results or (work / "results" if args.work is not None else None)
    ants_val = val[:args.ants_n] if args.ants_n is not None else val

    def make_task(m: str, r: dict) -> dict:
        base = {"threads": args.threads, "scratch": str(scratch), "subject": r["subject"], "t1": r["t1"], "seg": r["seg"]}
        if m in OURS:
            model = args.baseline if m == "atlasmorph-baseline" else model_path
            return {**base, "kind": "ours", "method": m, "model": str(Path(model).resolve()), "refine": args.refine,
                    "refine_lr": REFINE_LR, "conditional": m == "atlasmorph",
                    "attrs": {"age": float(r["age"]), "sex": r["sex"]}, **refine_loss_entry(args.refine_loss, args.refine)}
        tmpl = (mni_t1, mni_labels) if m == "ants-syncc-mni" else built
        return {**base, "kind": "ants", "method": m, "transform": args.ants_transform,
                "template": str(tmpl[0]), "template_labels": str(tmpl[1])}

    per_subject = [{"subject": r["subject"], "age": float(r["age"]), "sex": r["sex"],
                    "age_group": age_group(float(r["age"])), "methods": {}} for r in val]

    def run_all(ms: list[str], rows: list[dict]) -> None:
        """Every (method, subject) of ms x rows, one line each; cached results are reused."""
        for rec, r in zip(per_subject, val):
            if r not in rows:
                continue
            for m in ms:
                task = make_task(m, r)
                cache = result_file(results_dir, task) if results_dir else None
                res, cached = run_cached(task, cache, run=not args.cached_only)
                if res is None:  # --cached-only and not in the results folder
                    continue
                res.pop("key", None)
                rec["methods"][m] = res
                head = f"{r['subject']:<16} {float(r['age']):5.1f} {r['sex']:>3} {SHORT[m]:<11}"
                if "error" in res:
                    print(f"{head} FAILED: {res['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"{head} Dice {res['dice']:.4f}  {res['seconds']:7.1f} s  {res['peak_mb']:5.0f} MB"
                          + ("  (cached)" if cached else ""), flush=True)

    ours_methods = [m for m in methods if m in OURS]
    print(f"{len(val)} validation subjects ({split_source}); ANTs methods on the first {len(ants_val)}", flush=True)
    run_all(ours_methods, val)  # the fast methods first, on every subject

    mni_t1, mni_labels = prepare_mni(data_dir, work) if any(m in ANTS for m in methods) else (None, None)
    template_build, built = None, None
    if "ants-syncc-built" in methods:
        # the built template is kept with the results: the SyNCC-built results are only valid against it
        home = (results_dir or work) / "ants-syncc-built"
        home.mkdir(parents=True, exist_ok=True)
        built = (home / "template.nii.gz", home / "template_labels.nii.gz")
        train_rows = common.pick_subjects(rows, split.get("train", []), args.template_subjects)
        task = {"kind": "build", "threads": args.threads, "scratch": str(scratch), "template": str(mni_t1),
                "iterations": args.template_iterations,
                "subjects": [(r["t1"], r["seg"]) for r in train_rows],
                "out_template": str(built[0]), "out_labels": str(built[1]), "log": str(work / "build_template.log")}
        print(f"building an ANTs template from {len(train_rows)} training subjects "
              f"({args.template_iterations} iterations) ...", flush=True)
        template_build, cached = run_cached(task, home / "build.json", run=not args.cached_only, legacy=False)
        if cached and not all(p.is_file() for p in built):
            template_build, _ = run_cached(task, None, run=not args.cached_only)
        if template_build is None:
            template_build = {"error": "not in the results folder (--cached-only)"}
        template_build.pop("key", None)
        template_build["subjects"] = [r["subject"] for r in train_rows]
        if "error" in template_build:
            notes.append(f"ants.build_template failed: {template_build['error']}; ants-syncc-built not run")
            print(notes[-1], file=sys.stderr)
            methods.remove("ants-syncc-built")
        else:
            print(f"  built in {template_build['build_seconds']:.0f} s, labels in "
                  f"{template_build['label_seconds']:.0f} s, peak {template_build['peak_mb']:.0f} MB", flush=True)
    for m in (m for m in methods if m in ANTS):  # one method over all its subjects, then the next
        run_all([m], ants_val)
    if args.cached_only:
        missing = [f"{m} on {sum(m not in r['methods'] for r in per_subject)}" for m in methods
                   if any(m not in r["methods"] for r in per_subject)]
        if missing:
            notes.append("Not run yet (reported from the results folder only, `--cached-only`): "
                         + ", ".join(missing) + " subjects.")

    summary = summarise(per_subject, methods)
    paired = paired_subjects(per_subject, methods)
    result = common.clean({
        "command": common.command_line("segmentation_benchmark.py", argv),
        "machine": common.describe_machine(),
        "versions": common.versions("torch", "numpy", "nibabel", "antspyx"),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_end": list(os.getloadavg()),
        "model": str(model_path),
        "model_sha256": common.file_sha256(model_path),
        "baseline": str(args.baseline) if args.baseline else None,
        "baseline_sha256": common.file_sha256(args.baseline) if args.baseline else None,
        "split": split_source,
        "methods": methods,
        "ants_transform": args.ants_transform,
        "ants_n": len(ants_val) if any(m in ANTS for m in methods) and len(ants_val) < len(val) else None,
        "cached_only": args.cached_only,
        "refine": args.refine,
        "refine_lr": REFINE_LR,
        "refine_loss": args.refine_loss,
        "ants_working_resolution_mm": ANTS_WORKING_MM,
        "template_build": template_build,
        "age_groups": [g for g, _, _ in AGE_GROUPS],
        "structures": NAMES,
        "n_subjects": len(per_subject),
        "summary": summary,
        "paired_subjects": [r["subject"] for r in paired],
        "paired_summary": summarise(paired, methods),
        "side_by_side": side_by_side(per_subject, methods),
        "template_gain": template_gain(per_subject),
        "notes": notes,
        "subjects": per_subject,
    })
    print(console_summary(result))

    common.write_json(args.out / "segmentation.json", result)
    (args.out / "segmentation.md").write_text(markdown(result))
    boxplot(result, args.out / "dice_boxplot.png")
    print(f"wrote {args.out / 'segmentation.json'}, {args.out / 'segmentation.md'} and {args.out / 'dice_boxplot.png'}")
    if work_ctx is not None:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
