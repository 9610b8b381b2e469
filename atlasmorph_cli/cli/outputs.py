"""What `register` and `segment` write for one subject: each output as a deferred writer.

A writer computes its output when it runs and frees it once written, so memory holds one output at a
time (a 1 mm image with every output: 1.7 GB before); run them inside io.volumes.all_or_nothing() so
that they appear together or not at all. Output names are those of a batch's --outputs (cli.batch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import AtlasMorphError
from ..inference.brain_extraction import Brain
from ..inference.quality import Quality
from ..io.volumes import Volume, check_output_dir, save_volume, suffix_of

Writer = Callable[[], object]
MNI_XFORM = 4  # NIfTI xform code "MNI152" for outputs on the model grid
AFFINE_FORMAT = "itk-txt"  # --affine is ITK/ANTs text whatever --warp-format says (geometry.transforms.FORMATS)
# output name -> command-line option, in the order the outputs are checked and written
REGISTER_FLAGS = {"moved": "--moved", "template": "--template-out", "warp": "--trans", "inverse": "--inverse",
                  "affine": "--affine", "labels": "--labels", "jacobian": "--jacobian"}
SEGMENT_FLAGS = {"dseg": "--output", "probseg": "--probs"}
SUBJECT_FLAGS = {"brainmask": "--brain-mask", "brain": "--brain", "quality": "--quality", "qc": "--qc"}


def save_template(t, output: Path, labels: Path | None = None, probs: Path | None = None) -> None:
    """Write a template on the model grid (MNI xform): its T1, and its hard labels and 4D probabilities when asked."""
    save_volume(t.t1.astype(np.float32), t.grid.affine, output, xform_code=MNI_XFORM)
    if labels is not None:
        save_volume(t.labels, t.grid.affine, labels, dtype=np.int32, xform_code=MNI_XFORM)
    if probs is not None:
        save_volume(np.moveaxis(t.probs, 0, -1), t.grid.affine, probs, dtype=np.float32, xform_code=MNI_XFORM)


def check_warp_format(warp_format: str) -> None:
    """--warp-format names one of the displacement formats."""
    from ..geometry.transforms import WARP_FORMATS  # here: it imports scipy, which template and segment do not need

    if warp_format not in WARP_FORMATS:
        raise AtlasMorphError(f"--warp-format must be one of {', '.join(WARP_FORMATS)}, got '{warp_format}'")


def check_outputs(paths: list[Path | None]) -> list[Path]:
    """Validate output paths up front (suffix, existing writable folder) so no work is wasted."""
    out = [p for p in paths if p is not None]
    if len(set(str(p.resolve()) for p in out)) != len(out):
        raise AtlasMorphError("two outputs were given the same path")
    for p in out:
        if p.suffix.lower() not in (".csv", ".txt", ".png", ".tfm", ".json"):
            suffix_of(p)
        check_output_dir(p)
    return out


def register_writes(reg, warp_format: str, paths: dict[str, Path]) -> list[Writer]:
    """Writers of the requested register outputs (REGISTER_FLAGS names) of a Registration."""
    if not any(paths.get(n) for n in REGISTER_FLAGS):
        return []
    from ..geometry.transforms import write_transform  # here: it imports scipy, which segment does not need

    subj = reg.subject
    g = reg.grid
    makers: dict[str, Writer] = {
        "moved": lambda: save_volume(reg.subject_to_template(subj.data), g.affine, paths["moved"],
                                     xform_code=MNI_XFORM),
        "template": lambda: save_volume(reg.to_native(reg.template.t1), subj.affine, paths["template"],
                                        header=subj.header),
        "warp": lambda: write_transform(reg.subject_to_template_transform(), paths["warp"], warp_format),
        "inverse": lambda: write_transform(reg.template_to_subject_transform(), paths["inverse"], warp_format),
        "affine": lambda: write_transform(reg.affine_transform(), paths["affine"], AFFINE_FORMAT),
        "labels": lambda: save_volume(reg.labels_to_native()[0], subj.affine, paths["labels"], header=subj.header,
                                      dtype=np.int32),
        "jacobian": lambda: save_volume(reg.log_jacobian(), g.affine, paths["jacobian"], dtype=np.float32,
                                        xform_code=MNI_XFORM),
    }
    return [makers[n] for n in REGISTER_FLAGS if paths.get(n)]


def brain_writes(subj: Volume, brain: Brain, paths: dict[str, Path]) -> list[Writer]:
    """Writers of the brain mask used (uint8, 'brainmask') and the skull-stripped image ('brain'), both on
    the input's grid."""
    writes: list[Writer] = []
    if paths.get("brainmask"):
        writes.append(lambda: save_volume(brain.mask, subj.affine, paths["brainmask"], header=subj.header,
                                          dtype=np.uint8))
    if paths.get("brain"):
        writes.append(lambda: save_volume(np.where(brain.mask, subj.data, 0).astype(np.float32), subj.affine,
                                          paths["brain"], header=subj.header, dtype=np.float32))
    return writes


def attributes_text(attrs: dict | None) -> str:
    """'age 70, sex F' for a QC picture's title ('population-average template' without attributes)."""
    if not attrs:
        return "population-average template"
    return ", ".join(f"{k} {v}" for k, v in attrs.items() if v is not None)


def qc_write(reg, brain: Brain, q: Quality, path: Path, attrs: dict | None,
             labels: np.ndarray | None = None) -> Writer:
    """The writer of a subject's QC picture (inference.qc); labels: its segmentation, if computed."""
    from ..inference.qc import qc_figure

    def write():
        lab = labels if labels is not None else reg.labels_to_native()[0]
        return qc_figure(reg.subject, brain.mask, lab, q, path, attributes_text(attrs))

    return write
