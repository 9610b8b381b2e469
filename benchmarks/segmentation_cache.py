"""Per-(method, subject) result files of the segmentation and OOD benchmarks, keyed by what was computed.

A result is reused only when its key (method, subject file names, the content of the model or template
files, the settings) matches the task. Its file lives in a folder named after the content of the model
(or template) that produced it, so results of two models sit side by side instead of overwriting
each other: RESULTS/<method>/[<part>/...]<model-ab12cd34ef56>/<subject>.json. Files of the older flat
layout (RESULTS/<method>/[<part>/...]<subject>.json) are still read when their key matches, never written.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

import common
from segmentation_methods import in_fresh_process

# task entries that say where things go or how fast, not what is computed
_NOT_IN_KEY = ("scratch", "threads", "log", "out_template", "out_labels", "pred_out")


@functools.lru_cache(maxsize=None)
def _content_sha256(path: str, size: int, mtime_ns: int) -> str:
    if path.endswith((".nii", ".nii.gz")):  # voxels + affine: a gzip header carries its write time
        import nibabel as nib

        img = nib.load(path)
        h = hashlib.sha256(np.ascontiguousarray(img.dataobj, dtype=np.float32).tobytes())
        h.update(np.asarray(img.affine, dtype=np.float64).tobytes())
        return h.hexdigest()
    return common.file_sha256(Path(path))


def content_sha256(path) -> str | None:
    """What an input file holds, as sha256 (NIfTI: voxel data and affine), or None if it is missing."""
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    return _content_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


def task_key(task: dict) -> str:
    """What a cached result must match to be reused: method, subject, the content of the model/template
    files and the names of the subject's files; no absolute path, so results move between machines."""
    keep = {k: v for k, v in task.items() if k not in _NOT_IN_KEY}
    for k in ("model", "template", "template_labels"):
        if k in keep:
            keep[k] = content_sha256(keep[k])
    for k in ("t1", "seg", "mask"):
        if k in keep:
            keep[k] = Path(keep[k]).name
    if "subjects" in keep:
        keep["subjects"] = [[Path(f).name for f in pair] for pair in keep["subjects"]]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def refine_loss_entry(loss: str, refine: int) -> dict:
    """The task entry of the refinement's image term: none for the model's own term or without refinement,
    so results cached before --refine-loss existed (or before NCC became the default) keep their keys."""
    return {"refine_loss": loss} if loss != "model" and refine != 0 else {}


def producer(task: dict) -> str:
    """The folder name of the file that produced a task's result: 'model-<sha12>' or 'template-<sha12>'."""
    for k in ("model", "template"):
        if task.get(k):
            return f"{k}-{(content_sha256(task[k]) or 'missing')[:12]}"
    return "none"


def result_file(results: Path, task: dict, *parts: str) -> Path:
    """Where a task's result is kept: RESULTS/<method>/<parts...>/<producer>/<subject>.json."""
    return results.joinpath(task["method"], *parts, producer(task), f"{task['subject']}.json")


def legacy_file(cache: Path) -> Path:
    """The same result in the older flat layout (no producer folder), read but never written."""
    return cache.parent.parent / cache.name


def save_result(cache: Path, rec: dict) -> None:
    """Write a result atomically (a stopped run never leaves half a file)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".part")
    tmp.write_text(json.dumps(common.clean(rec), indent=1))
    tmp.replace(cache)


def _matching(path: Path, key: str) -> dict | None:
    """The result in `path` if it exists, has this key and did not fail."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    return old if old.get("key") == key and "error" not in old else None


def run_cached(task: dict, cache: Path | None, run: bool = True, legacy: bool = True) -> tuple[dict | None, bool]:
    """The cached result of `task` (in `cache`, or its legacy flat path) if one matches, else a fresh run
    saved to `cache`; (None, False) when there is none and `run` is False."""
    key = task_key(task)
    if cache is not None:
        for path in (cache, legacy_file(cache)) if legacy else (cache,):
            old = _matching(path, key)
            if old is not None:
                return old, True
    if not run:
        return None, False
    rec = in_fresh_process(task)
    rec["key"] = key
    rec["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rec["load_average"] = list(os.getloadavg())
    if cache is not None:
        save_result(cache, rec)
    return rec, False
