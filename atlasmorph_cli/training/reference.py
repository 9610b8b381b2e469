"""The affine target of training on the model grid: the MNI152 reference brain and labels, --reference, or --init."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import labels
from ..errors import AtlasMorphError
from ..geometry.intensity import normalize
from ..io.volumes import load_volume
from ..geometry.space import MODEL_GRID, resample, resample_labels

MNI_T1 = Path("mni152") / "MNI152_T1_2mm.nii.gz"
MNI_LABELS = Path("mni152") / "MNI152_1mm_DLMUSE.nii.gz"


def mni_reference(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(brain, labels) on MODEL_GRID: the normalised MNI152 T1 inside its DLMUSE > 0 mask (float32),
    and the DLMUSE labels as class indices 0..34 (uint8, partial-volume resampling).

    Both files are resampled by their affines (MNI world coordinates), never by voxel index.
    """
    data_dir = Path(data_dir)
    t1_path, lab_path = data_dir / MNI_T1, data_dir / MNI_LABELS
    for p in (t1_path, lab_path):
        if not p.exists():
            raise AtlasMorphError(f"{p}: MNI152 reference file not found")
    t1 = load_volume(t1_path)
    lab = load_volume(lab_path)
    t1_grid = resample(t1.data, t1.affine, MODEL_GRID, order=1)
    mask = resample((lab.data > 0).astype(np.float32), lab.affine, MODEL_GRID, order=1) >= 0.5
    brain = normalize(t1_grid, mask)
    index = resample_labels(labels.to_index(lab.data, "muse"), lab.affine, MODEL_GRID)
    return brain, index.astype(np.uint8)


def training_reference(reference: Path | None, init: Path | None) -> np.ndarray:
    """The affine target for cohort preparation, on the model grid (see `atlasmorph train --help`): the
    --reference brain, else the --init model's population-average template brain, else MNI152 from the data folder
    (also `--reference mni152`: a fine-tuning run then prepares its subjects as a run from scratch did)."""
    if reference is not None and str(reference).lower() != "mni152":
        ref = load_volume(reference)
        grid = resample(ref.data, ref.affine, MODEL_GRID)
        return normalize(grid, grid > 0)
    if init is not None and reference is None:
        from ..inference.template import encode_attributes, make_template
        from ..model.shipped import load

        _, model = load(init)
        t = make_template(model, encode_attributes(model, None)[0])
        return t.t1 * (t.probs[0] < 0.5)
    from ..io.datadir import find_data_dir

    data = find_data_dir()
    if data is None:
        raise AtlasMorphError("no affine reference: pass --reference (a brain T1 in MNI space) or --init MODEL, "
                              "or set ATLASMORPH_DATA to a folder holding mni152/")
    return mni_reference(data)[0]
