"""Model files: float16 release copies load back as float32 models that give the same template."""
from __future__ import annotations

import pytest
import torch

from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.model.model_file import load_model, save_model
from atlasmorph_cli.model.shipped import sha256
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


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors file opens with its header length; a low byte of 0x80 (a pickle's first opcode) must
    not make the pickle check refuse about 1 in 256 valid model files."""
    from safetensors.torch import save_file

    from atlasmorph_cli.model.model_file import read_config

    path = tmp_path / "m.safetensors"
    for pad in range(300):
        save_file({"a": torch.zeros(1)}, str(path), metadata={"format": "atlasmorph-model", "config": "{}",
                                                                "pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    with pytest.raises(AtlasMorphError) as err:
        read_config(path)
    assert "refusing a pickle" not in str(err.value) and "format version None" in str(err.value)
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a real pickle is still refused
    with pytest.raises(AtlasMorphError, match="refusing a pickle"):
        read_config(tmp_path / "p.safetensors")


def read_config_text(path) -> str:
    """The raw configuration JSON of a model file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["config"]


def test_a_configuration_key_this_version_does_not_know_is_ignored(tmp_path):
    """A model file may carry configuration keys of another version (v3 was written while a `template_fine`
    option existed, at 0): they are ignored, the model loads with the same weights."""
    import json

    from safetensors.torch import load_file, save_file

    from atlasmorph_cli.model.model_file import FORMAT

    path = small_model(tmp_path / "small.safetensors")
    config = json.loads(read_config_text(path))
    config["template_fine"] = 0
    future = tmp_path / "future.safetensors"
    save_file(load_file(str(path)), str(future), metadata={"format": FORMAT, "config": json.dumps(config)})
    a, b = load_model(path).state_dict(), load_model(future).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not hasattr(load_model(future).config, "template_fine")

