"""A training run folder: safe cache names, refusing to overwrite a run, checking what --resume may change.

* Cohort ids become cache file names only through `cache_name`: an id that is not a plain name
  (``/abs/path``, ``../up``, ``a/b``, control characters) gets a sanitised name plus a hash of the id,
  so nothing is ever written outside the cache folder and two ids never share a file.
* `check_out_folder`: ``atlasmorph train --out R`` without ``--resume`` is refused when R already holds
  a run (checkpoint, model, split or history), as FreeSurfer's recon-all refuses an existing subject.
* `settings_record` / `check_resume`: the checkpoint stores every setting plus a fingerprint of the
  cohort and split; ``--resume`` compares them generically and refuses any difference except the
  settings a resumed run may legitimately change (`RESUMABLE`).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from dataclasses import asdict
from pathlib import Path

from ..errors import AtlasMorphError

# files a training run writes into --out (their presence means the folder holds a run)
RUN_FILES = ("checkpoint.safetensors", "model.safetensors", "split.json", "history.csv")
# settings that --resume may change: the length of the run, the learning rate (annealing), where and how
# fast it runs and how often it reports; everything else must match the checkpoint
RESUMABLE = frozenset({"steps", "lr", "threads", "quiet", "val_every", "checkpoint_every", "workers", "device",
                       "resume"})
# paths that may legitimately differ (a moved folder): what they hold is compared through the cohort record
NOT_COMPARED = frozenset({"data", "out", "cache", "split"})
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def cache_name(subject_id: str) -> str:
    """The cache file name (without .npz) for a cohort id: the id itself when it is a plain name,
    else its letters, digits, '-', '_' and '.' plus 10 hex digits of its sha256 (never a path)."""
    if _SAFE.fullmatch(subject_id) and ".." not in subject_id:
        return subject_id
    text = unicodedata.normalize("NFC", subject_id)
    stem = re.sub(r"[^\w.-]+", "_", text).strip("._-")[:80] or "subject"
    digest = hashlib.sha256(subject_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stem}-{digest}"


def cache_path(cache_dir: Path, subject_id: str) -> Path:
    """`cache_dir/<cache_name>.npz`, checked to lie directly in `cache_dir`."""
    path = Path(cache_dir) / f"{cache_name(subject_id)}.npz"
    if path.parent != Path(cache_dir) or path.name.startswith("."):  # cannot happen; a guard, not a feature
        raise AtlasMorphError(f"subject id {subject_id!r}: cannot make a safe cache file name")
    return path


def check_out_folder(out: Path, resume: bool) -> None:
    """Refuse to start a new run in a folder that already holds one (its model, checkpoint, split, history)."""
    if resume or not out.is_dir():
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise AtlasMorphError(
            f"--out {out}: already holds a training run ({', '.join(found)}); continue it with --resume, "
            "or choose another --out (or remove that folder) to start a new one"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def cohort_record(train_subjects: list, val_subjects: list, names: list[str]) -> str:
    """A fingerprint of the subjects a run trains and validates on: ids, the attributes it uses, which
    files (names and sizes; a moved cohort folder matches) and the split."""
    h = hashlib.sha256()
    for group, subjects in (("train", train_subjects), ("validation", val_subjects)):
        for s in sorted(subjects, key=lambda x: x.id):
            files = []
            for p in (s.t1, s.seg, s.mask):
                files.append(f"{p.name}:{p.stat().st_size}" if p is not None and p.exists() else "-")
            attrs = {n: s.attrs.get(n, "") for n in names}
            h.update(json.dumps([group, s.id, attrs, files], sort_keys=True).encode())
    return h.hexdigest()[:16]


def settings_record(settings, train_subjects: list, val_subjects: list, names: list[str]) -> str:
    """The JSON stored in every checkpoint: all settings (grid excluded) and the cohort fingerprint."""
    d = {k: v for k, v in asdict(settings).items() if k != "grid"}
    d["cohort"] = cohort_record(train_subjects, val_subjects, names)
    d["n_train"], d["n_validation"] = len(train_subjects), len(val_subjects)
    return json.dumps(d, default=str)


def check_resume(checkpoint: Path, current_json: str) -> None:
    """Refuse --resume when a setting other than those in RESUMABLE differs from the checkpoint's.

    Compared generically (every key, nested loss weights included), so settings added later are
    covered; a key only one side has (a checkpoint from an older version) is not compared.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint), framework="pt") as f:
            old = json.loads((f.metadata() or {}).get("settings", "{}"))
    except Exception as exc:  # damaged: load_checkpoint reports it in its own words
        raise AtlasMorphError(f"--resume: cannot read the settings of {checkpoint} ({type(exc).__name__})") from exc
    new = json.loads(current_json)
    a, b = _flatten(old), _flatten(new)
    differ = [k for k in sorted(a.keys() & b.keys())
              if k.split(".")[0] not in RESUMABLE | NOT_COMPARED and a[k] != b[k]]
    if differ:
        def show(k: str) -> str:
            if k == "cohort":
                return "the cohort (its subjects, their attributes or files, or the split) differs"
            return f"{k}: {a[k]} -> {b[k]}"

        listed = "; ".join(show(k) for k in differ[:6]) + (f"; ... ({len(differ) - 6} more)" if len(differ) > 6 else "")
        raise AtlasMorphError(
            f"--resume: {checkpoint.parent} was trained with other settings ({listed}); a resumed run may only "
            f"change {', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE - {'resume'}))}. "
            "Give the original options, or start a new run in another --out"
        )


def warn(message: str) -> None:
    """A warning on stderr, as the other commands print them."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_small_cohort(train_subjects: list, val_subjects: list, names: list[str], finetune: bool,
                       loud: bool = True) -> None:
    """A conditional template needs subjects that differ in their attributes; say so before training.

    Fewer than 2 training subjects without --init is refused (the attribute encoder has nothing to learn
    from); no validation subject, or an attribute with a single value in training, is a warning.
    """
    if names and not finetune and len(train_subjects) < 2:
        raise AtlasMorphError(
            f"only {len(train_subjects)} training subject(s): a conditional template needs at least 2 (with "
            "different attributes); add subjects, train an unconditional model (--attributes none), or fine-tune "
            "a model with --init"
        )
    say = warn if loud else (lambda m: None)  # warnings from rank 0 only; the error on every rank
    if not val_subjects:
        say("no validation subject (cohort too small or --val-fraction 0): validation Dice is not measured")
    if not finetune:
        for n in names:
            values = {str(s.attrs.get(n, "")).strip() for s in train_subjects}
            if len(values) == 1:
                say(f"every training subject has {n} = {next(iter(values))}: the model learns nothing about {n} "
                "(other values are extrapolated or unknown)")
