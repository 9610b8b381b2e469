"""The segmentation benchmark's figures over subjects: statistics, age groups, paired comparisons, wins, ratios."""
from __future__ import annotations

import math

import numpy as np

from segmentation_methods import ANTS, NAMES, OURS

AGE_GROUPS = (("<40", 0.0, 40.0), ("40-60", 40.0, 60.0), (">=60", 60.0, math.inf))


def age_group(age: float) -> str:
    """The AGE_GROUPS name of an age (ages outside every group go to the nearest end)."""
    for name, lo, hi in AGE_GROUPS:
        if lo <= age < hi:
            return name
    return AGE_GROUPS[0][0] if age < AGE_GROUPS[0][1] else AGE_GROUPS[-1][0]


def stats(values) -> dict:
    """mean, std, min, max and n of the finite values (None entries and NaN ignored)."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    if not a.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}


def summarise(subjects: list[dict], methods: list[str]) -> dict:
    """Per method over its successful subjects: Dice (overall, per structure, per age group) and costs."""
    out = {}
    for m in methods:
        recs = [(s, s["methods"][m]) for s in subjects if m in s["methods"] and "error" not in s["methods"][m]]
        per_struct = {n: stats([r["dice_per_structure"][n] for _, r in recs]) for n in NAMES}
        by_age = {}
        for g, _, _ in AGE_GROUPS:
            by_age[g] = stats([r["dice"] for s, r in recs if age_group(s["age"]) == g])
        out[m] = {
            "n": len(recs),
            "dice": stats([r["dice"] for _, r in recs]),
            "dice_per_structure": per_struct,
            "dice_by_age_group": by_age,
            **{k: stats([r.get(k) for _, r in recs])
               for k in ("folding_pct", "seconds", "cpu_seconds", "load_seconds", "peak_mb", "mean_disp_mm")},
        }
    return out


def paired_subjects(subjects: list[dict], methods: list[str]) -> list[dict]:
    """The subjects on which every method has a successful result (the side-by-side comparison)."""
    return [s for s in subjects
            if all(m in s["methods"] and "error" not in s["methods"][m] for m in methods)]


def wins(subjects: list[dict], methods: list[str]) -> dict:
    """For every (ours, ANTs) pair: on how many subjects ours has the higher mean Dice, of how many."""
    out = {}
    for m in (x for x in methods if x in OURS):
        for a in (x for x in methods if x in ANTS):
            both = [s for s in subjects if "dice" in s["methods"].get(m, {}) and "dice" in s["methods"].get(a, {})]
            out[f"{m}:{a}"] = {"ours_higher": sum(s["methods"][m]["dice"] > s["methods"][a]["dice"] for s in both),
                               "n": len(both)}
    return out


def ratios(summary: dict, ants_method: str = "ants-syncc-mni") -> dict:
    """ours : an ANTs method for wall seconds and peak memory (give it the summary over paired subjects)."""
    out = {}
    a = summary.get(ants_method)
    for m in OURS:
        if m in summary and a:
            for k in ("seconds", "peak_mb"):
                num, den = summary[m][k]["mean"], a[k]["mean"]
                if num is not None and den:
                    out[f"{m}:{ants_method} {k}"] = num / den
    return out


def side_by_side(subjects: list[dict], methods: list[str]) -> dict:
    """For every ANTs method: ours and it on the subjects it ran on (summary, wins, ratios)."""
    ours = [m for m in methods if m in OURS]
    out = {}
    for a in (m for m in methods if m in ANTS):
        both = paired_subjects(subjects, ours + [a])
        if not both:
            continue
        summ = summarise(both, ours + [a])
        out[a] = {"subjects": [s["subject"] for s in both], "methods": ours + [a], "summary": summ,
                  "wins": wins(both, ours + [a]), "ratios": ratios(summ, a)}
    return out



def template_gain(subjects: list[dict], a: str = "atlasmorph", b: str = "atlasmorph-average") -> dict | None:
    """What the attribute-matched template buys over the average one (issue 14): per age group, the paired
    mean over subjects of Dice(a) - Dice(b), overall and per structure (a structure absent from a subject
    is skipped there), and of the mean displacement (closer = negative); the subjects where `a` has the higher
    Dice. None unless both methods ran on some subject."""
    both = paired_subjects(subjects, [a, b])
    if not both:
        return None
    out = {}
    for g in [name for name, _, _ in AGE_GROUPS] + ["all"]:
        grp = [s for s in both if g == "all" or age_group(s["age"]) == g]
        ra, rb = [s["methods"][a] for s in grp], [s["methods"][b] for s in grp]
        per = {}
        for n in NAMES:
            d = [x["dice_per_structure"][n] - y["dice_per_structure"][n] for x, y in zip(ra, rb)
                 if x["dice_per_structure"].get(n) is not None and y["dice_per_structure"].get(n) is not None]
            per[n] = float(np.mean(d)) if d else None
        out[g] = {"n": len(grp), "dice": stats([x["dice"] - y["dice"] for x, y in zip(ra, rb)]),
                  "a_higher": sum(x["dice"] > y["dice"] for x, y in zip(ra, rb)), "per_structure": per,
                  "mean_disp_mm": stats([x.get("mean_disp_mm") - y.get("mean_disp_mm") for x, y in zip(ra, rb)
                                         if x.get("mean_disp_mm") is not None and y.get("mean_disp_mm") is not None])}
    return out
