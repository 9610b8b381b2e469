"""A quality score for every registered subject, so that a failed registration is not a silent one.

Measured on the model grid after registration (cheap: one more resampling of the subject and its mask):

* ``ncc``: local normalised cross-correlation (9-voxel = 18 mm windows) between the subject's
  normalised brain moved to the template and the template T1, averaged over the template's brain;
  low or negative for another contrast (e.g. an inverted T1), noise, or a wrong alignment;
* ``mask_dice``: Dice between the subject's brain mask moved to the template and the template's
  brain (background probability < 0.5); low when the mask is not a brain (a whole-head image passed
  as skull-stripped, a 2-voxel slab);
* ``scale_min``/``scale_max``: the affine's scale factors (singular values of its linear part,
  template mm -> subject mm); IXI adults are within 0.79-1.05 of the (MNI-sized) template;
* ``rotation_deg``: the rotation angle of the affine (polar decomposition) between the header's
  axes and the anatomy: heads lie within a few tens of degrees of the scanner axes (IXI: 1-26), so a
  large angle means the header's orientation is wrong (flipped or permuted axes); ``reflection``: a
  mirror-image affine;
* ``extraction_dice`` (only when the user gave the mask): Dice between that mask and deepbet's
  extraction of the same image; low for a mask in the wrong place or one taking in the skull.

``score`` = ncc * mask_dice (0.87-0.91 on the IXI validation subjects). A subject is flagged when the
score is below ``SCORE_MIN`` or any other check fails (limits below, calibrated with
benchmarks/quality_calibration.py on the IXI validation subjects and deliberately broken inputs;
docs/quality.md). A left-right flip of the header cannot be seen this way (brains are nearly
symmetric), as with any registration-based check.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import AtlasMorphError
from ..io.volumes import atomic_path
from ..model.layers import box_mean

SCORE_MIN = 0.7
SCALE_RANGE = (0.7, 1.4)
ROTATION_MAX_DEG = 45.0
MASK_AGREEMENT_MIN = 0.88
NCC_WINDOW = 9
CSV_COLUMNS = ("qc_score", "qc_flagged", "qc_reasons")  # appended to the volumes CSV


class QualityError(AtlasMorphError):
    """--strict and a subject failed the quality check: exit code 3 (the outputs were written)."""

    exit_code = 3


@dataclass
class Quality:
    subject: str
    score: float
    ncc: float
    mask_dice: float
    scale_min: float
    scale_max: float
    rotation_deg: float
    reflection: bool
    mask_source: str = ""
    extraction_dice: float | None = None  # a given --mask against deepbet's extraction of the same image
    reasons: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flagged"] = self.flagged
        d["thresholds"] = dict(score_min=SCORE_MIN, scale_range=list(SCALE_RANGE), rotation_max_deg=ROTATION_MAX_DEG,
                               mask_agreement_min=MASK_AGREEMENT_MIN)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def csv_cells(self) -> list[str]:
        score = f"{self.score:.3f}" if math.isfinite(self.score) else "nan"
        return [score, "1" if self.flagged else "0", "; ".join(self.reasons)]

    def warning(self) -> str:
        """One line naming the subject and why it was flagged."""
        return (f"{self.subject}: failed the quality check ({'; '.join(self.reasons)}); "
                "the outputs are probably wrong, look at them (--qc) before using them")


def _local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = NCC_WINDOW) -> torch.Tensor:
    """Voxel-wise local NCC of two (X,Y,Z) volumes over cubic windows (0 where either is flat)."""
    x, y = a[None, None], b[None, None]
    pool = lambda t: box_mean(t, window)  # noqa: E731
    mx, my = pool(x), pool(y)
    cov = pool(x * y) - mx * my
    vx = (pool(x * x) - mx * mx).clamp_min(0)
    vy = (pool(y * y) - my * my).clamp_min(0)
    den = torch.sqrt(vx * vy)
    return torch.where(den > 1e-6, cov / den.clamp_min(1e-6), torch.zeros_like(cov))[0, 0]


def affine_geometry(world: np.ndarray) -> tuple[float, float, float, bool]:
    """(smallest scale, largest scale, rotation angle in degrees, reflection) of a 4x4 world map."""
    a = np.asarray(world, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(a)):
        return math.nan, math.nan, math.nan, False
    u, s, vt = np.linalg.svd(a)
    r = u @ vt  # the rotation (or rotoreflection) closest to a
    reflection = bool(np.linalg.det(r) < 0)
    if reflection:
        r = r @ np.diag([1.0, 1.0, -1.0])
    angle = math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))
    return float(s.min()), float(s.max()), angle, reflection


def mask_agreement(subject, mask: np.ndarray) -> float | None:
    """Dice between a given brain mask and deepbet's extraction of the same image (None if that fails)."""
    from .brain_extraction import extract_brain

    try:
        ext = extract_brain(subject)
    except AtlasMorphError:
        return None
    denom = int(ext.sum()) + int(mask.sum())
    return 2.0 * int((ext & mask).sum()) / denom if denom else None


def assess(reg, mask: np.ndarray, subject: str = "", mask_source: str = "") -> Quality:
    """The quality of a registration.Registration whose subject brain mask (native grid, bool) is `mask`.

    A mask the user gave (`mask_source` "mask") is also compared with deepbet's extraction of the image
    (a few seconds more): a mask in the wrong place or taking in the skull is flagged even when the
    registration makes the best of it."""
    with torch.no_grad():
        t1 = torch.from_numpy(np.ascontiguousarray(reg.template.t1, dtype=np.float32))
        tbrain = torch.from_numpy(np.ascontiguousarray(reg.template.probs[0] < 0.5))
        both = torch.from_numpy(reg.subject_to_template(np.stack([reg.brain, mask]).astype(np.float32)))
        moved, moved_mask = both[0], both[1] > 0.5  # one map into the subject for both
        ncc_map = _local_ncc(moved, t1)
        n_t = int(tbrain.sum())
        ncc = float(ncc_map[tbrain].mean()) if n_t else math.nan
        inter = int((moved_mask & tbrain).sum())
        denom = int(moved_mask.sum()) + n_t
        mask_dice = 2.0 * inter / denom if denom else 0.0
    if not (math.isfinite(ncc) and np.all(np.isfinite(reg.template.t1))):
        ncc = math.nan
    smin, smax, angle, reflection = affine_geometry(reg.world)
    score = ncc * mask_dice if math.isfinite(ncc) else math.nan
    agreement = mask_agreement(reg.subject, mask) if mask_source == "mask" else None
    reasons: list[str] = []
    if not math.isfinite(score):
        reasons.append("the score is not a number (non-finite template or image)")
    elif score < SCORE_MIN:
        why = []
        if ncc < 0.8:
            why.append(f"the image does not look like the template T1: local NCC {ncc:.2f}"
                       + (" (another contrast, e.g. inverted, or not a brain?)" if ncc < 0.4 else ""))
        if mask_dice < 0.9:
            why.append(f"the brain mask does not match the template's brain: Dice {mask_dice:.2f}")
        reasons.append(f"score {score:.2f} < {SCORE_MIN}" + (f" ({'; '.join(why)})" if why else ""))
    if math.isfinite(smin) and (smin < SCALE_RANGE[0] or smax > SCALE_RANGE[1]):
        reasons.append(f"implausible brain size: affine scale factors {smin:.2f}-{smax:.2f} "
                       f"(expected {SCALE_RANGE[0]}-{SCALE_RANGE[1]})")
    if math.isfinite(angle) and angle > ROTATION_MAX_DEG:
        reasons.append(f"the anatomy is rotated {angle:.0f} degrees from the header's axes "
                       "(wrong orientation in the header?)")
    if reflection:
        reasons.append("the affine is a mirror image (flipped header?)")
    if agreement is not None and agreement < MASK_AGREEMENT_MIN:
        reasons.append(f"the given mask does not match the brain extracted from the image: Dice {agreement:.2f} "
                       f"< {MASK_AGREEMENT_MIN} (mask in the wrong place, or taking in skull or scalp?)")
    return Quality(subject, score, ncc, mask_dice, smin, smax, angle, reflection, mask_source, agreement, reasons)


def write_json(path: Path, qualities: list[Quality]) -> None:
    """One subject: its quality as an object; several: a list."""
    obj = qualities[0].to_dict() if len(qualities) == 1 else [q.to_dict() for q in qualities]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1) + "\n")
