"""The segmentation benchmark's report: the markdown page, the console summary and the Dice box plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import common
from segmentation_methods import ANTS, ANTS_TRANSFORM, NAMES, OURS

LABEL = {
    "atlasmorph": "AtlasMorph (age, sex)",
    "atlasmorph-average": "AtlasMorph, average template",
    "atlasmorph-baseline": "AtlasMorph, unconditional model",
    "ants-syncc-mni": "ANTs SyNCC to MNI152",
    "ants-syncc-built": "ANTs SyNCC to built template",
}
TICK = {"atlasmorph": "AtlasMorph (age, sex)", "atlasmorph-average": "AtlasMorph average",
        "atlasmorph-baseline": "AtlasMorph unconditional", "ants-syncc-mni": "ANTs SyNCC MNI152",
        "ants-syncc-built": "ANTs SyNCC built template"}


def _pm(s: dict, fmt: str = ".3f") -> str:
    """'mean ± std' of a stats() record, '–' when empty."""
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def _loss_name(loss: str | None) -> str:
    """The refinement's image term as the report names it (results before the option existed used the model's)."""
    return "local NCC (`--refine-loss ncc`)" if loss == "ncc" else "the model's own (`--refine-loss model`)"


def markdown(res: dict) -> str:
    """The report page (segmentation.md) of a benchmark result."""
    s, methods = res["summary"], res["methods"]
    tb = res.get("template_build")
    lines = [
        "# Atlas-based segmentation of held-out subjects",
        "",
        f"{res['n_subjects']} IXI validation subjects of the model (split: `{res['split']}`), sorted by id"
        + (f"; the ANTs methods on the first {res['ants_n']} of them" if res.get("ants_n") is not None else "") + ". Every",
        "method gets the subject's T1 skull-stripped with its own DLMUSE mask (seg > 0) in its native grid",
        "(120 x 120 x 90, 2 mm, PSR) and returns a label map on that grid; Dice against the subject's own DLMUSE",
        "labels mapped to the 34 structures (`atlasmorph_cli.labels`), mean over the structures present, then",
        "mean ± std over subjects.",
        "",
        "- **AtlasMorph (age, sex)**: `register_subject` + `Registration.labels_to_native` with the subject's true",
        "  age and sex, i.e. what `atlasmorph segment brain.nii.gz --mask seg.nii.gz --age A --sex S` computes"
        + (f", with {res['refine']} instance-optimisation steps (lr {res['refine_lr']:g}) on the network's velocity"
           f" (`--refine {res['refine']}`), image term {_loss_name(res.get('refine_loss'))}."
           if res.get("refine") else ", the network's warp as is (`--refine 0`)."),
        "- **AtlasMorph, average template**: the same model without attributes (mean age, equal sex mix).",
        "- **AtlasMorph, unconditional model**: a model trained with `--attributes none` (when given).",
        f"- **ANTs SyNCC to MNI152**: `ants.registration(fixed=subject, moving=MNI152 brain, type_of_transform='{res['ants_transform']}')`",
        "  (rigid + affine + SyN with CC, antspyx defaults), then `ants.apply_transforms(..., interpolator='genericLabel')`",
        "  of the MNI152 DLMUSE labels. Moving image: the MNI152 T1 (FSL, 2 mm) resampled onto the model grid",
        "  and masked with its DLMUSE labels > 0, the very reference our affine step uses. Fixed image: the",
        f"  subject's normalised brain at {res['ants_working_resolution_mm']:g} mm isotropic (the IXI scans already are 2 mm,",
        "  so no resampling; other inputs are resampled linearly), the working resolution of our model grid.",
        "  Labels: the 1 mm DLMUSE map (34 structures) pulled straight into the subject's native grid, so the",
        "  labels are interpolated once.",
    ]
    if tb:
        lines += [
            f"- **ANTs SyNCC to built template**: `ants.build_template` (iterations: {tb.get('iterations')}, SyN, initialised",
            f"  with the MNI152 brain, so it stays on the model grid in MNI space) from {tb.get('n_subjects')} training",
            "  subjects' brains (first by id); its labels are the voxel-wise majority vote of those subjects' labels,",
            "  each warped to the built template by one more `SyN` registration (`genericLabel`; build_template does not",
            "  return its final transforms). Then registration + label transfer as above. Built in "
            f"{tb.get('build_seconds', float('nan')):.0f} s (labels {tb.get('label_seconds', float('nan')):.0f} s, peak "
            f"{tb.get('peak_mb', float('nan')):.0f} MB), once, not counted per subject.",
        ]
    lines += [
        "",
        "**Folding**: % of brain voxels where the Jacobian determinant of the deformable part is ≤ 0. Ours: the",
        "field that pulls the template into the subject's affinely aligned frame (model grid), inside the subject's",
        "brain mask carried there (central differences). ANTs: `ants.create_jacobian_determinant_image` of the",
        "forward warp (on the subject's 2 mm grid), inside the subject's brain mask.",
        "**Seconds**: wall time from the in-memory brain to the native label map (ours: template + affine + RegNet",
        "+ refinement + label resampling; ANTs: resampling, registration, label transfer), without reading files or loading the",
        "model. **Peak MB**: VmHWM of a fresh worker process that ran only that (method, subject), imports and",
        "model included. **Mean displacement**: mean length (mm) of the deformable part; ours: the template → subject field",
        "on the template grid inside the template's brain (centrality: a central template needs small fields);",
        "ANTs: the forward warp inside the subject's brain.",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']}; threads {res['threads']} (torch, ITK); load average at end "
        f"{', '.join(f'{x:.1f}' for x in res['load_average_at_end'])}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
        "",
        f"Model: `{res['model']}` (sha256 {res['model_sha256'][:12]}…)"
        + (f"; baseline `{res['baseline']}` (sha256 {res['baseline_sha256'][:12]}…)" if res.get("baseline") else ""),
        "",
        "## Summary",
        "",
        "| method | n | Dice (mean ± std) | folding % | s/subject | CPU s/subject | peak MB | model/template load s | mean displacement mm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        v = s[m]
        lines.append(f"| {LABEL[m]} | {v['n']} | {_pm(v['dice'], '.4f')} | {_pm(v['folding_pct'], '.3f')} | "
                     f"{_pm(v['seconds'], '.1f')} | {_pm(v['cpu_seconds'], '.1f')} | {_pm(v['peak_mb'], '.0f')} | "
                     f"{_pm(v['load_seconds'], '.2f')} | {_pm(v['mean_disp_mm'], '.2f')} |")
    if any(m in ANTS for m in methods) and res["ants_transform"] != ANTS_TRANSFORM:
        lines += ["", f"**Note**: the ANTs methods ran `type_of_transform='{res['ants_transform']}'`, not "
                  f"{ANTS_TRANSFORM}; their names are kept for the table."]
    def paired_table(ms: list[str], summ: dict) -> list[str]:
        out = ["| method | Dice (mean ± std) | " + " | ".join(f"{g} (n)" for g in res["age_groups"])
               + " | folding % | s/subject | peak MB | mean displacement mm |", "|---|---|" + "---|" * (len(res["age_groups"]) + 4)]
        for m in ms:
            v = summ[m]
            cells = [f"{_pm(v['dice_by_age_group'][g], '.4f')} ({v['dice_by_age_group'][g]['n']})" for g in res["age_groups"]]
            out.append(f"| {LABEL[m]} | {_pm(v['dice'], '.4f')} | " + " | ".join(cells)
                       + f" | {_pm(v['folding_pct'], '.3f')} | {_pm(v['seconds'], '.1f')} | {_pm(v['peak_mb'], '.0f')}"
                       + f" | {_pm(v['mean_disp_mm'], '.2f')} |")
        return out

    for a, sb in (res.get("side_by_side") or {}).items():
        lines += ["", f"## Side by side with {LABEL[a]}: the {len(sb['subjects'])} subjects it ran on", "",
                  "Subjects: " + ", ".join(sb["subjects"]) + ".", ""]
        lines += paired_table(sb["methods"], sb["summary"])
        lines += [""] + [f"- {LABEL[k.split(':')[0]]} has the higher Dice than {LABEL[k.split(':')[1]]} on "
                         f"{v['ours_higher']} of {v['n']} subjects" for k, v in sb["wins"].items()]
        lines += [f"- ratio of the means, {k.split(':')[0]} : {k.split(':')[1]} = {v:.3g}"
                  + (f" (ANTs takes {1 / v:.0f}x as long)" if k.endswith("seconds") else "")
                  for k, v in sb["ratios"].items()]
    if sum(m in ANTS for m in methods) > 1 and res.get("paired_subjects"):
        lines += ["", f"## All methods on the {len(res['paired_subjects'])} subjects every method ran on", "",
                  "Subjects: " + ", ".join(res["paired_subjects"]) + ".", ""]
        lines += paired_table(methods, res["paired_summary"])
    for n in res.get("notes") or []:
        lines += ["", n]
    lines += ["", "## Dice by age group", "", "| method | " + " | ".join(f"{g} (n)" for g in res["age_groups"]) + " |",
              "|---|" + "---|" * len(res["age_groups"])]
    for m in methods:
        cells = [f"{_pm(s[m]['dice_by_age_group'][g], '.4f')} ({s[m]['dice_by_age_group'][g]['n']})" for g in res["age_groups"]]
        lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    gain = res.get("template_gain")
    if gain:
        groups, oldest = list(gain), res["age_groups"][-1]
        lines += ["", "## Matched minus average template (paired, mean over subjects)", "",
                  "What the attribute-matched template buys over the population-average one of the same model: overall, "
                  f"and the 8 structures with the largest change in each direction in the oldest group ({oldest}).", "",
                  "| | " + " | ".join(f"{g} (n = {gain[g]['n']})" for g in groups) + " |", "|---|" + "---|" * len(groups),
                  "| mean Dice | " + " | ".join(f"{gain[g]['dice']['mean']:+.4f}" if gain[g]["n"] else "–" for g in groups) + " |",
                  "| subjects where matched is higher | " + " | ".join(f"{gain[g]['a_higher']} of {gain[g]['n']}" for g in groups) + " |",
                  "| mean displacement (mm; < 0: matched is closer) | "
                  + " | ".join(f"{gain[g]['mean_disp_mm']['mean']:+.3f}" if gain[g]["mean_disp_mm"]["n"] else "–" for g in groups) + " |"]
        old = gain.get(oldest, {}).get("per_structure") or {}
        ranked = sorted((n for n in old if old[n] is not None), key=lambda n: old[n])
        for n in ranked[-8:][::-1] + ranked[:8]:
            cells = [f"{gain[g]['per_structure'][n]:+.4f}" if gain[g]["per_structure"].get(n) is not None else "–" for g in groups]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Dice per structure (mean ± std over subjects)", "",
              "| structure | " + " | ".join(LABEL[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for n in res["structures"]:
        lines.append(f"| {n} | " + " | ".join(_pm(s[m]['dice_per_structure'][n]) for m in methods) + " |")
    ours = [m for m in methods if m in OURS]
    if ours:
        lines += ["", "## Centrality: mean displacement of the deformable part (mm), per subject", "",
                  "| subject | age | sex | " + " | ".join(LABEL[m] for m in ours) + " |", "|---|---|---|" + "---|" * len(ours)]
        for r in res["subjects"]:
            cells = [f"{r['methods'][m]['mean_disp_mm']:.2f}" if r["methods"].get(m, {}).get("mean_disp_mm") is not None
                     else "–" for m in ours]
            lines.append(f"| {r['subject']} | {r['age']:.1f} | {r['sex']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per subject (mean Dice / seconds / peak MB)", "",
              "| subject | age | sex | " + " | ".join(LABEL[m] for m in methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for r in res["subjects"]:
        cells = []
        for m in methods:
            v = r["methods"].get(m, {})
            cells.append("not run" if not v else "failed" if v.get("dice") is None
                         else f"{v['dice']:.4f} / {v['seconds']:.1f} / {v['peak_mb']:.0f}")
        lines.append(f"| {r['subject']} | {r['age']:.1f} | {r['sex']} | " + " | ".join(cells) + " |")
    lines += ["", "![Dice per method](dice_boxplot.png)"]
    return "\n".join(lines) + "\n"


def _merged_structures() -> list[tuple[str, list[str]]]:
    """Structure names with Left-/Right- merged (the order of labels.STRUCTURES)."""
    groups: dict[str, list[str]] = {}
    for n in NAMES:
        key = n.replace("Left-", "").replace("Right-", "")
        groups.setdefault(key, []).append(n)
    return list(groups.items())


def box_labels(methods: list[str], counts: list[int]) -> list[str]:
    """One-line tick label per method with its number of subjects (the slow ANTs methods may have fewer)."""
    return [f"{TICK[m]} (n = {n})" for m, n in zip(methods, counts)]


def boxplot(res: dict, path: Path) -> Path:
    """Mean Dice per subject for each method (left) and per structure, left and right pooled (right)."""
    plt = common.pyplot()
    methods = res["methods"]
    colours = plt.get_cmap("tab10").colors
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1.3, 4.2]})
    data = [[r["methods"][m]["dice"] for r in res["subjects"] if r["methods"].get(m, {}).get("dice") is not None]
            for m in methods]
    bp = ax0.boxplot(data, patch_artist=True, widths=0.6)
    for patch, c in zip(bp["boxes"], colours):
        patch.set_facecolor(c)
        patch.set_alpha(0.6)
    for k, d in enumerate(data):
        ax0.scatter(np.full(len(d), k + 1.0) + np.linspace(-0.12, 0.12, len(d)), d, s=8, color="k", zorder=3)
    ax0.set_xticks(range(1, len(methods) + 1), box_labels(methods, [len(d) for d in data]),
                   rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
    ax0.set_ylabel("mean Dice over 34 structures")
    ax0.set_title("per validation subject", fontsize=10)
    ax0.grid(axis="y", alpha=0.3)

    groups = _merged_structures()
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        per = []
        for _, names in groups:
            vals = [r["methods"][m]["dice_per_structure"][n] for r in res["subjects"]
                    if r["methods"].get(m, {}).get("dice_per_structure") for n in names]
            per.append([v for v in vals if v is not None])
        pos = np.arange(len(groups)) + (k - (len(methods) - 1) / 2) * width
        b = ax1.boxplot(per, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False,
                        manage_ticks=False)
        for patch in b["boxes"]:
            patch.set_facecolor(colours[k % len(colours)])
            patch.set_alpha(0.6)
        ax1.plot([], [], color=colours[k % len(colours)], lw=6, alpha=0.6, label=LABEL[m])
    ax1.set_xticks(range(len(groups)), [g for g, _ in groups], rotation=60, ha="right", fontsize=8)
    ax1.set_ylabel("Dice (left and right pooled)")
    ax1.set_ylim(0, 1)
    ax1.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(methods), frameon=False)
    return common.save_figure(fig, path)



def console_summary(result: dict) -> str:
    """A few lines per method and per side-by-side comparison, for the terminal."""
    lines = [""]
    for m in result["methods"]:
        s = result["summary"][m]
        if not s["n"]:
            lines.append(f"{m:<20} no successful subject")
            continue
        lines.append(f"{m:<20} Dice {s['dice']['mean']:.4f} ± {s['dice']['std']:.4f}   folding {s['folding_pct']['mean']:.3f} %   "
                     f"{s['seconds']['mean']:.1f} s/subject   peak {s['peak_mb']['mean']:.0f} MB   "
                     f"|u| {s['mean_disp_mm']['mean']:.2f} mm")
    for a, sb in result["side_by_side"].items():
        lines.append(f"\nside by side with {a} on the {len(sb['subjects'])} subjects it ran on:")
        for m in sb["methods"]:
            d = sb["summary"][m]["dice"]
            lines.append(f"{m:<20} Dice {d['mean']:.4f} ± {d['std']:.4f}   {sb['summary'][m]['seconds']['mean']:.1f} s/subject")
        lines += [f"{k.replace(':', ' above ')} on {v['ours_higher']} of {v['n']} subjects" for k, v in sb["wins"].items()]
        lines += [f"ratio {k}: {v:.3g}" for k, v in sb["ratios"].items()]
    return "\n".join(lines)
