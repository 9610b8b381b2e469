"""The attribute-matched template: attributes -> encoded vector -> template network -> T1, labels, probabilities."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.space import Grid
from ..labels import to_freesurfer
from ..model.model_file import AtlasMorph


def encode_attributes(model: AtlasMorph, values: dict[str, object] | None) -> tuple[torch.Tensor, list[str]]:
    """(1, A) attribute vector (population average when `values` is None) and any warnings."""
    enc = model.config.encoder
    if values is None or all(v is None for v in values.values()):
        return torch.from_numpy(enc.encode_average())[None], []
    enc.check_names({k: v for k, v in values.items() if v is not None})
    parsed, warnings = enc.parse(values)
    return torch.from_numpy(enc.encode(parsed))[None], warnings


@dataclass
class Template:
    """A template on the model grid: T1 (X,Y,Z), label probabilities (C,X,Y,Z), hard FreeSurfer labels."""

    t1: np.ndarray
    probs: np.ndarray
    grid: Grid

    @property
    def labels(self) -> np.ndarray:
        return to_freesurfer(self.probs.argmax(0)).astype(np.int32)


@torch.no_grad()
def make_template(model: AtlasMorph, attrs: torch.Tensor) -> Template:
    """Run the template network for one attribute vector."""
    t1, logits = model.template(attrs)
    probs = torch.softmax(logits, 1)
    return Template(t1[0, 0].clamp(0, 1).numpy(), probs[0].numpy(), model.config.model_grid)
