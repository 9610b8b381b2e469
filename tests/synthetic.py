"""Small synthetic 'brains' with known anatomy, for training and pipeline tests that must run in seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from atlasmorph_cli.io.volumes import save_volume
from atlasmorph_cli.geometry.space import Grid

SMALL_GRID = Grid((32, 32, 32), np.array([[4.0, 0, 0, -62], [0, 4.0, 0, -62], [0, 0, 4.0, -62], [0, 0, 0, 1]]))


def phantom(age: float, shift=(0.0, 0.0, 0.0), scale: float = 1.0, shape=(40, 40, 40), zoom: float = 4.0):
    """A T1-like ellipsoid: cortex (FS 3) around white matter (FS 2) with ventricles (FS 4) that grow with age.

    Returns (t1, seg, affine) on a native grid whose world origin differs from the small model grid.
    """
    aff = np.diag([zoom, zoom, zoom, 1.0])
    aff[:3, 3] = -zoom * (np.array(shape) - 1) / 2 + np.asarray(shift)
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    r = np.sqrt(((xyz / (scale * np.array([48.0, 56.0, 44.0]))) ** 2).sum(1)).reshape(shape)
    vent_r = 0.15 + 0.2 * (age - 20) / 60
    vx = np.sqrt(((xyz / (scale * np.array([30.0, 36.0, 18.0]))) ** 2).sum(1)).reshape(shape)
    seg = np.zeros(shape, np.int16)
    seg[r < 1.0] = 3
    seg[r < 0.8] = 2
    seg[vx < vent_r * 2.2] = 4
    t1 = np.select([seg == 2, seg == 3, seg == 4], [110.0, 75.0, 25.0], 0.0).astype(np.float32)
    return t1, seg, aff


def write_cohort(folder: Path, n: int = 8, seed: int = 0) -> Path:
    """n phantoms with ages 20..80, alternating sex, random shifts/scales; returns the cohort CSV."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["subject,t1,seg,age,sex"]
    for i in range(n):
        age = 20 + 60 * i / max(n - 1, 1)
        t1, seg, aff = phantom(age, shift=rng.uniform(-6, 6, 3), scale=rng.uniform(0.93, 1.07))
        save_volume(t1, aff, folder / f"s{i}_t1.nii.gz")
        save_volume(seg, aff, folder / f"s{i}_seg.nii.gz", dtype=np.int16)
        lines.append(f"s{i},s{i}_t1.nii.gz,s{i}_seg.nii.gz,{age:.1f},{'FM'[i % 2]}")
    (folder / "cohort.csv").write_text("\n".join(lines) + "\n")
    return folder / "cohort.csv"


def small_reference() -> np.ndarray:
    """The middle-aged phantom's brain, normalised, on SMALL_GRID (the affine target in tests)."""
    from atlasmorph_cli.geometry.intensity import normalize
    from atlasmorph_cli.geometry.space import resample

    t1, seg, aff = phantom(50.0)
    ref = resample(t1, aff, SMALL_GRID)
    return normalize(ref, ref > 0)


def small_model(path: Path, seed: int = 0) -> Path:
    """A tiny model on SMALL_GRID (age + sex, ages 20-80) whose template is the age-50 phantom.

    The registration network is untrained; the file is a few MB, so CLI tests run in seconds
    without the real data.
    """
    import torch
    import torch.nn.functional as F

    from atlasmorph_cli.model.attributes import AttributeEncoder
    from atlasmorph_cli.labels import to_index
    from atlasmorph_cli.model.model_file import AtlasMorph, ModelConfig, save_model
    from atlasmorph_cli.geometry.space import resample_labels

    torch.manual_seed(seed)
    rows = [{"age": str(a), "sex": s} for a, s in ((20, "F"), (50, "M"), (80, "F"), (35, "M"))]
    enc = AttributeEncoder.fit(["age", "sex"], rows)
    model = AtlasMorph(ModelConfig(name="test-small", grid=SMALL_GRID.to_dict(), attributes=enc.to_dict(),
                                   template_width=8))
    t1, seg, aff = phantom(50.0)
    labels = resample_labels(to_index(seg), aff, SMALL_GRID)
    onehot = F.one_hot(torch.from_numpy(labels).long(), 35).permute(3, 0, 1, 2).float()
    model.template_net.init_base(torch.from_numpy(small_reference()), 0.9 * onehot + 0.1 / 35)
    return save_model(model, path)
