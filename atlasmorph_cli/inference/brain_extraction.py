"""The brain mask of a subject: given (--mask), the non-zero voxels of a skull-stripped image, or extracted.

Which one is used (`resolve_brain`):

* ``--mask M``: the brain is ``M > 0`` (a mask with fractional values in [0, 1], e.g. a smoothed or
  probabilistic mask, is read as ``M >= 0.5``, with a warning).
* ``--skullstripped``: the image is already brain-extracted; the brain is its non-zero voxels.
* neither (automatic): an image whose non-zero voxels add up to no more than ``SKULLSTRIPPED_MAX_L``
  litres (2.5 L; an adult brain is 1.0-1.9 L, an IXI whole-head scan has 4.4-7.7 L of non-zero voxels
  because air is noise, not zero) is taken as skull-stripped; anything larger is a whole-head scan
  and its brain is extracted with deepbet (Fisch et al. 2024, MIT; its weights ship inside the
  deepbet wheel, nothing is downloaded). See docs/brain-extraction.md for how well that works.

The extractor runs on the CPU, in the closest canonical (RAS) orientation of the image's voxel
grid, and its mask is put back on the image's own grid, so every output stays in the input's space.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np

from ..errors import AtlasMorphError
from ..io.volumes import Volume, same_grid

SKULLSTRIPPED_MAX_L = 2.5
EXTRACTOR = "deepbet"
MASK_SOURCES = ("mask", "skullstripped", "extracted")


@dataclass
class Brain:
    """A subject's brain mask on its own grid, where it came from, and any warnings to show."""

    mask: np.ndarray  # bool, the image's shape
    source: str  # one of MASK_SOURCES
    warnings: list[str]
    given: Volume | None = None  # a --mask on another grid, passed on so that registration.subject_brain names the mismatch

    def as_volume(self, subject: Volume) -> Volume:
        """The mask as a Volume on the subject's grid, for registration.register_subject(mask=...)."""
        if self.given is not None:
            return self.given
        return Volume(self.mask.astype(np.float32), subject.affine, subject.header, subject.source)


def nonzero_litres(vol: Volume) -> float:
    """Volume of the image's non-zero voxels in litres."""
    return float(np.count_nonzero(vol.data)) * float(np.prod(vol.zooms)) / 1e6


@lru_cache(maxsize=1)
def _extractor():
    """deepbet's BrainExtraction on the CPU (loaded once per process)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice, pandas/tqdm chatter
            from deepbet.bet import BrainExtraction

            return BrainExtraction(no_gpu=True)
    except ImportError as exc:
        raise AtlasMorphError(f"brain extraction needs the deepbet package ({exc}); install it with "
                              "`pip install deepbet==1.0.2`, or give --mask / --skullstripped") from None
    except Exception as exc:  # a damaged install: weights missing or unreadable
        raise AtlasMorphError(f"brain extraction: cannot load deepbet's model ({type(exc).__name__}: {exc})") from None


def extract_brain(vol: Volume, threshold: float = 0.5) -> np.ndarray:
    """deepbet's brain mask (bool) of a whole-head T1, on the image's own grid."""
    import torch

    name = f"{vol.source}: " if vol.source is not None else ""
    ornt = nib.io_orientation(vol.affine)
    ras = nib.orientations.apply_orientation(vol.data, ornt).astype(np.float32, copy=True)
    bet = _extractor()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prob = bet.run_model(ras)
            mask = bet.postprocess(prob > threshold)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise AtlasMorphError(f"{name}brain extraction found no brain in this image "
                              f"({' '.join(str(exc).split()) or type(exc).__name__})") from None
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    out = nib.orientations.apply_orientation(np.asarray(mask, dtype=bool), back)
    if not out.any():
        raise AtlasMorphError(f"{name}brain extraction found no brain in this image")
    return np.ascontiguousarray(out)


def _mask_from_file(subject: Volume, mask: Volume) -> tuple[np.ndarray, list[str]]:
    name = f"{mask.source}" if mask.source is not None else "the mask"
    values = mask.data
    if values.min() >= 0 and values.max() <= 1 and np.any((values > 0) & (values < 1)):
        frac = float(np.mean((values[values > 0] < 1)))
        if frac > 0.01:
            return values >= 0.5, [f"{name}: has fractional values (a probabilistic or smoothed mask); "
                                   "the brain is taken as mask >= 0.5"]
    return values > 0, []


def resolve_brain(subject: Volume, mask: Volume | None = None, skullstripped: bool = False) -> Brain:
    """The brain mask to use for `subject` (see the module docstring for the rules)."""
    if mask is not None and skullstripped:
        raise AtlasMorphError("--mask and --skullstripped exclude each other: a mask says where the brain is, "
                              "--skullstripped says the image is the brain")
    if mask is not None:
        if not same_grid(mask, subject):
            return Brain(mask.data > 0, "mask", [], given=mask)  # registration.subject_brain() reports the mismatch
        m, warns = _mask_from_file(subject, mask)
        return Brain(m, "mask", warns)
    if skullstripped or nonzero_litres(subject) <= SKULLSTRIPPED_MAX_L:
        return Brain(subject.data != 0, "skullstripped", [])
    return Brain(extract_brain(subject), "extracted", [])
