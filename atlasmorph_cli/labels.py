"""The 34 anatomical structures every AtlasMorph label map and Dice figure uses.

FreeSurfer LUT ids, names and colours (so freeview shows the maps as it shows ``aseg``),
and the mapping from DLMUSE/MUSE region ids onto them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Structure:
    """One structure: FreeSurfer id, FreeSurfer name, RGB colour, and the MUSE ids merged into it."""

    fs_id: int
    name: str
    rgb: tuple[int, int, int]
    muse_ids: tuple[int, ...]


_L_CORTEX = tuple(range(101, 208, 2))  # MUSE cortical GM regions: odd ids are left
_R_CORTEX = tuple(range(100, 208, 2))
_L_WM = (82, 84, 86, 88, 90, 92, 94, 75)  # lobar WM, fornix, internal capsule, basal forebrain
_R_WM = (81, 83, 85, 87, 89, 91, 93, 76)

STRUCTURES: tuple[Structure, ...] = (
    Structure(2, "Left-Cerebral-White-Matter", (245, 245, 245), _L_WM),
    Structure(3, "Left-Cerebral-Cortex", (205, 62, 78), _L_CORTEX),
    Structure(4, "Left-Lateral-Ventricle", (120, 18, 134), (52,)),
    Structure(5, "Left-Inf-Lat-Vent", (196, 58, 250), (50,)),
    Structure(7, "Left-Cerebellum-White-Matter", (220, 248, 164), (41,)),
    Structure(8, "Left-Cerebellum-Cortex", (230, 148, 34), (39,)),
    Structure(10, "Left-Thalamus", (0, 118, 14), (60,)),
    Structure(11, "Left-Caudate", (122, 186, 220), (37,)),
    Structure(12, "Left-Putamen", (236, 13, 176), (58,)),
    Structure(13, "Left-Pallidum", (12, 48, 255), (56,)),
    Structure(14, "3rd-Ventricle", (204, 182, 142), (4,)),
    Structure(15, "4th-Ventricle", (42, 204, 164), (11,)),
    Structure(16, "Brain-Stem", (119, 159, 176), (35,)),
    Structure(17, "Left-Hippocampus", (220, 216, 20), (48,)),
    Structure(18, "Left-Amygdala", (103, 255, 255), (32,)),
    Structure(24, "CSF", (60, 60, 60), (1,)),
    Structure(26, "Left-Accumbens-area", (255, 165, 0), (30,)),
    Structure(28, "Left-VentralDC", (165, 42, 42), (62,)),
    Structure(41, "Right-Cerebral-White-Matter", (245, 245, 245), _R_WM),
    Structure(42, "Right-Cerebral-Cortex", (205, 62, 78), _R_CORTEX),
    Structure(43, "Right-Lateral-Ventricle", (120, 18, 134), (51,)),
    Structure(44, "Right-Inf-Lat-Vent", (196, 58, 250), (49,)),
    Structure(46, "Right-Cerebellum-White-Matter", (220, 248, 164), (40,)),
    Structure(47, "Right-Cerebellum-Cortex", (230, 148, 34), (38,)),
    Structure(49, "Right-Thalamus", (0, 118, 14), (59,)),
    Structure(50, "Right-Caudate", (122, 186, 220), (36,)),
    Structure(51, "Right-Putamen", (236, 13, 176), (57,)),
    Structure(52, "Right-Pallidum", (13, 48, 255), (55,)),
    Structure(53, "Right-Hippocampus", (220, 216, 20), (47,)),
    Structure(54, "Right-Amygdala", (103, 255, 255), (31,)),
    Structure(58, "Right-Accumbens-area", (255, 165, 0), (23,)),
    Structure(60, "Right-VentralDC", (165, 42, 42), (61,)),
    Structure(172, "Vermis", (119, 100, 176), (71, 72, 73)),
    Structure(192, "Corpus_Callosum", (250, 255, 50), (95,)),
)

FS_IDS: tuple[int, ...] = tuple(s.fs_id for s in STRUCTURES)
NAMES: dict[int, str] = {s.fs_id: s.name for s in STRUCTURES}
N_CLASSES = len(STRUCTURES) + 1  # + background (index 0)


def _lut(pairs: dict[int, int], size: int) -> np.ndarray:
    lut = np.zeros(size, dtype=np.int64)
    for src, dst in pairs.items():
        lut[src] = dst
    return lut


_MUSE_TO_INDEX = _lut({m: i + 1 for i, s in enumerate(STRUCTURES) for m in s.muse_ids}, 1024)
_FS_TO_INDEX = _lut({s.fs_id: i + 1 for i, s in enumerate(STRUCTURES)}, 1024)
_INDEX_TO_FS = np.array((0,) + FS_IDS, dtype=np.int32)
_MUSE_ONLY_IDS = frozenset(m for s in STRUCTURES for m in s.muse_ids) - frozenset(FS_IDS)


def looks_like_muse(labels: np.ndarray) -> bool:
    """True when a label map uses MUSE numbering (cortical ids >= 100) rather than FreeSurfer's aseg."""
    present = set(np.unique(labels).astype(int).tolist())
    # MUSE has no ids 2, 3 or 42 (FreeSurfer's cerebral white matter / cortex), which every aseg-style
    # map has; MUSE does use 172 (PosteriorInsula_R) and 192 (SupplementaryMotorCortex_R).
    return len(present & _MUSE_ONLY_IDS) > 0 and not present & {2, 3, 42}


def to_index(labels: np.ndarray, scheme: str = "auto") -> np.ndarray:
    """Map a MUSE or FreeSurfer label map to class indices 0..34 (0 = background, unlisted ids too)."""
    lab = np.asarray(np.rint(labels), dtype=np.int64)
    if scheme == "auto":
        scheme = "muse" if looks_like_muse(lab) else "freesurfer"
    lut = {"muse": _MUSE_TO_INDEX, "freesurfer": _FS_TO_INDEX}[scheme]
    lab = np.where((lab >= 0) & (lab < lut.size), lab, 0)
    return lut[lab].astype(np.uint8)


def to_freesurfer(index: np.ndarray) -> np.ndarray:
    """Map class indices 0..34 back to FreeSurfer ids (int32)."""
    return _INDEX_TO_FS[np.asarray(index, dtype=np.int64)]


def write_lut(path: Path) -> None:
    """Write a FreeSurfer-style colour table (``id name R G B A``) for the 34 structures."""
    with open(path, "w") as fh:
        fh.write("0\tUnknown\t0\t0\t0\t0\n")
        for s in STRUCTURES:
            fh.write(f"{s.fs_id}\t{s.name}\t{s.rgb[0]}\t{s.rgb[1]}\t{s.rgb[2]}\t0\n")


def write_coarse_csv(path: Path) -> None:
    """Write the structure table as CSV: fs_id, name, muse_ids (space-separated)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fs_id", "name", "muse_ids"])
        for s in STRUCTURES:
            w.writerow([s.fs_id, s.name, " ".join(map(str, s.muse_ids))])
