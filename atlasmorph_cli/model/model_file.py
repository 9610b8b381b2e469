"""The AtlasMorph model (template network + registration network), its configuration and its safetensors file.

A model file is a safetensors file whose metadata holds the whole configuration (architecture,
model grid, attribute encoding, label table, loss weights, versions), so the file alone rebuilds
the model. Loading never unpickles: pickle-based files (.pt/.pth/.pkl/.ckpt, torch.save zips) are
refused before anything reads them. Which file to use and its checksum: shipped.py.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from .attributes import AttributeEncoder
from ..errors import AtlasMorphError
from ..io.volumes import atomic_path, canonical_safetensors
from ..labels import N_CLASSES, STRUCTURES
from .networks import RegNet, TemplateNet, velocity_to_displacements
from ..geometry.space import Grid

FORMAT = "atlasmorph-model"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tar")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model besides its weights."""

    name: str
    grid: dict
    attributes: list[dict]
    template_width: int = 32
    reg_enc: list[int] = field(default_factory=lambda: [0, 32, 32, 32])
    reg_dec: list[int] = field(default_factory=lambda: [32, 32, 16])
    int_steps: int = 7
    template_deform: bool = False  # template = base o exp(w(attributes)) + residual (v2); False in v1 files
    n_classes: int = N_CLASSES
    labels: list[list] = field(default_factory=lambda: [[s.fs_id, s.name] for s in STRUCTURES])
    loss_weights: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    package_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def encoder(self) -> AttributeEncoder:
        return AttributeEncoder.from_dict(self.attributes)

    @property
    def model_grid(self) -> Grid:
        return Grid.from_dict(self.grid)


class AtlasMorph(torch.nn.Module):
    """The conditional template network and the registration network that share one model grid."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        shape = tuple(config.grid["shape"])
        self.template_net = TemplateNet(config.encoder.width, shape, config.n_classes, config.template_width,
                                        deform=config.template_deform, int_steps=config.int_steps)
        self.reg_net = RegNet(2, tuple(config.reg_enc), tuple(config.reg_dec))

    def template(self, attrs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Template T1 (B,1,...) and label logits (B,C,...) for encoded attributes (B, A)."""
        return TemplateNet.split(self.template_net(attrs))

    def predict_warps(self, subject: torch.Tensor, template_t1: torch.Tensor) -> dict[str, torch.Tensor]:
        """The registration network's velocity and displacements between a subject and a template, both
        on the model grid (`vel`, `fwd`, `inv`, `fwd_half`: see networks.velocity_to_displacements).

        `fwd` warps the template into the subject's frame; `inv` warps the subject into the template's.
        """
        vel = self.reg_net(subject, template_t1)
        fwd, inv, fwd_half = velocity_to_displacements(vel, self.config.int_steps)
        return {"vel": vel, "fwd": fwd, "inv": inv, "fwd_half": fwd_half}


def save_model(model: AtlasMorph, path: Path | str, dtype: torch.dtype | None = None) -> Path:
    """Write weights + configuration to a safetensors file, atomically.

    `dtype` (e.g. torch.float16) stores the floating-point weights at that precision (half the size of a
    shipped file); load_model casts them back to float32.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.config))}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        canonical_safetensors(tmp)  # same weights + configuration -> same bytes
    return Path(path)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file opens with its JSON header's length (u64, little-endian) and then '{'."""
    return len(head) >= 9 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def _refuse_pickle(path: Path) -> None:
    """Refuse pickle-based files by name and by content (zip from torch.save, raw pickle opcodes). A safetensors
    header may start with the byte 0x80 (its length), so the content test applies only to non-safetensors files."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    pickled = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
    if path.suffix.lower() in PICKLE_SUFFIXES or (pickled and not _looks_like_safetensors(head, path.stat().st_size)):
        raise AtlasMorphError(
            f"{path}: refusing a pickle/.pt file (unpickling can run arbitrary code); "
            "AtlasMorph only loads .safetensors model files"
        )


def read_config(path: Path | str) -> ModelConfig:
    """The configuration stored in a model file, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise AtlasMorphError(f"{path}: no such model file")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise AtlasMorphError(f"{path}: not a safetensors model file ({exc})") from exc
    if meta.get("format") != FORMAT or "config" not in meta:
        if "step" in meta and "opt_groups" in meta:
            raise AtlasMorphError(f"{path}: this is a training checkpoint, not a model; use model.safetensors "
                                  "from the same folder")
        raise AtlasMorphError(f"{path}: not an AtlasMorph model (no AtlasMorph configuration in its metadata)")
    try:
        cfg = json.loads(meta["config"])
        version = cfg.get("format_version")
    except (ValueError, AttributeError) as exc:
        raise AtlasMorphError(f"{path}: the model's configuration is damaged ({exc})") from exc
    if version != FORMAT_VERSION:
        raise AtlasMorphError(
            f"{path}: model format version {version} is not supported by "
            f"atlasmorph {__version__} (expects {FORMAT_VERSION})"
        )
    known = set(ModelConfig.__dataclass_fields__)
    try:
        config = ModelConfig(**{k: v for k, v in cfg.items() if k in known})
        _ = (config.encoder, config.model_grid)  # parse them now, not mid-run
    except Exception as exc:
        raise AtlasMorphError(f"{path}: the model's configuration is incomplete or damaged ({exc})") from exc
    return config


def load_model(path: Path | str, device: str = "cpu") -> AtlasMorph:
    """Rebuild a model from its file (configuration from the metadata, weights from the tensors)."""
    config = read_config(path)
    try:
        model = AtlasMorph(config)
    except Exception as exc:
        raise AtlasMorphError(f"{path}: the stored configuration does not build a model ({exc})") from exc
    state = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except Exception as exc:
        raise AtlasMorphError(f"{path}: damaged model file ({exc})") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise AtlasMorphError(f"{path}: weights do not match the stored configuration ({exc})") from exc
    return model.to(device).eval()
