"""Model files: float16 release copies load back as float32 models that give the same template."""
from __future__ import annotations

import torch

from atlasmorph_cli.model import load_model, save_model, sha256
from synthetic import small_model


def test_float16_release_roundtrip(tmp_path):
    full = load_model(small_model(tmp_path / "full.safetensors"))
    half_path = save_model(full, tmp_path / "half.safetensors", dtype=torch.float16)
    half = load_model(half_path)
    assert half_path.stat().st_size < 0.6 * (tmp_path / "full.safetensors").stat().st_size
    assert all(p.dtype == torch.float32 for p in half.parameters())
    attrs = torch.zeros(1, full.config.encoder.width)
    with torch.no_grad():
        (t_full, l_full), (t_half, l_half) = full.template(attrs), half.template(attrs)
    torch.testing.assert_close(t_half, t_full, atol=2e-3 * float(t_full.abs().max()), rtol=0)
    torch.testing.assert_close(l_half.softmax(1), l_full.softmax(1), atol=5e-3, rtol=0)
    # saving the same model twice gives the same bytes (the shipped sha256 is reproducible)
    again = save_model(full, tmp_path / "half2.safetensors", dtype=torch.float16)
    assert sha256(again) == sha256(half_path)
