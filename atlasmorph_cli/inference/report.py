"""Figures a researcher puts in a paper: template montages across ages (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.volumes import atomic_path


def template_montage(templates: list, path: Path, sex: str | None = None) -> Path:
    """Axial, coronal and sagittal mid-slices (rows) of each template (columns), labelled by age."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(templates)
    fig, axes = plt.subplots(3, n, figsize=(2.2 * n, 6.6), squeeze=False)
    for col, (age, t) in enumerate(templates):
        v = t.t1
        cx, cy, cz = (s // 2 for s in v.shape)
        slices = (v[:, :, cz + 4].T, v[:, cy + 6, :].T, v[cx + 6, :, :].T)  # axial, coronal, sagittal (RAS grid)
        for row, img in enumerate(slices):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.set_axis_off()
        title = "average" if age is None else f"age {age:g}"
        axes[0, col].set_title(title + (f", {sex}" if sex else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
