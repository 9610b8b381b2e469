"""Shared fixtures: the real shared data (skipped with a reason when absent) and small synthetic volumes."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from atlasmorph_cli.io.datadir import ENV_VAR, find_data_dir

# The package may be installed (not editable), so it cannot see ../shared beside the checkout; the
# tests can. Exporting the location lets the CLI subprocesses under test find it too.
_SIBLING = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not os.environ.get(ENV_VAR, "").strip() and _SIBLING.is_dir():
    os.environ[ENV_VAR] = str(_SIBLING)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = find_data_dir()
    if d is None or not (d / "ixi" / "subjects.csv").is_file():
        pytest.skip("real data not found: set ATLASMORPH_DATA or place the shared data at ../shared/data")
    return d


@pytest.fixture(scope="session")
def ixi_rows(data_dir) -> list[dict]:
    with open(data_dir / "ixi" / "subjects.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["age"]]


def psr_affine(origin=(-88.0, 118.0, -135.0), zoom: float = 2.0) -> np.ndarray:
    """An oblique-free PSR voxel-to-world affine like the IXI scans (i: P, j: S, k: R)."""
    a = np.zeros((4, 4))
    a[0, 2] = zoom  # k -> x (R)
    a[1, 0] = -zoom  # i -> -y (P)
    a[2, 1] = zoom  # j -> z (S)
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


@pytest.fixture(scope="session")
def mni_model(tmp_path_factory, data_dir, ixi_rows) -> Path:
    """A model file whose template is the MNI152 atlas (T1 + labels) and whose RegNet is untrained (~identity).

    Geometry tests use it: registration then reduces to the affine, whose result is known.
    """
    import torch
    import torch.nn.functional as F

    from atlasmorph_cli.model.attributes import AttributeEncoder
    from atlasmorph_cli.model.model_file import AtlasMorph, ModelConfig, save_model
    from atlasmorph_cli.training.reference import mni_reference
    from atlasmorph_cli.geometry.space import MODEL_GRID

    enc = AttributeEncoder.fit(["age", "sex"], ixi_rows)
    model = AtlasMorph(ModelConfig(name="test-mni", grid=MODEL_GRID.to_dict(), attributes=enc.to_dict()))
    ref, labels = mni_reference(data_dir)
    onehot = F.one_hot(torch.from_numpy(labels).long(), 35).permute(3, 0, 1, 2).float()
    model.template_net.init_base(torch.from_numpy(ref), 0.9 * onehot + 0.1 / 35)
    return save_model(model, tmp_path_factory.mktemp("model") / "mni.safetensors")


@pytest.fixture(scope="session")
def subject(tmp_path_factory, data_dir, ixi_rows):
    """A brain-extracted IXI T1 (its own seg > 0) in native PSR space, and its labels as FreeSurfer ids."""
    import nibabel as nib

    from atlasmorph_cli.labels import to_index

    row = ixi_rows[3]
    t1 = nib.load(str(data_dir / "ixi" / row["t1"]))
    seg = np.asarray(nib.load(str(data_dir / "ixi" / row["seg"])).dataobj)
    brain = np.asarray(t1.dataobj, dtype=np.float32) * (seg > 0)
    path = tmp_path_factory.mktemp("subj") / "brain.nii.gz"
    nib.save(nib.Nifti1Image(brain, t1.affine, t1.header), str(path))
    return path, to_index(seg), row
