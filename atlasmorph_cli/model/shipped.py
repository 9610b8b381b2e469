"""Which model file to use and whether to trust it: the shipped models, their sha256 check, a checked load.

A shipped model (models/, installed as atlasmorph_cli.models) must match the sha256 in the one-line file
beside it, `models/<name>.sha256` (`<hex>  <file name>`, as `sha256sum` writes it); `load` verifies it,
checks the stored configuration's limits before building the network, and refuses NaN/Inf weights.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch

from ..errors import AtlasMorphError
from ..limits import check_model_config
from .model_file import AtlasMorph, load_model, read_config

MODEL_GLOB = "atlasmorph-*.safetensors"


def shipped_models() -> list[Path]:
    """Model files installed with the package (or, from a source checkout, in ./models)."""
    found: list[Path] = []
    try:
        found = sorted(Path(str(p)) for p in resources.files("atlasmorph_cli.models").iterdir()
                       if p.name.endswith(".safetensors"))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    if not found:
        found = sorted((Path(__file__).resolve().parents[2] / "models").glob(MODEL_GLOB))
    return found


def is_shipped(path: Path) -> bool:
    """Whether `path` is one of the model files installed with the package."""
    try:
        p = path.resolve()
        return any(p == m.resolve() for m in shipped_models())
    except OSError:
        return False


def resolve_model(path: Path | None) -> Path:
    """The model to use: the one asked for, else the newest shipped model."""
    if path is not None:
        return path
    models = shipped_models()
    if not models:
        raise AtlasMorphError("no shipped model found; pass --model PATH (e.g. a model from `atlasmorph train`)")
    return models[-1]


def load(path: Path | None, threads: int | None = None) -> tuple[Path, AtlasMorph]:
    """Resolve and load a model (the shipped one by default, checksum-verified), setting torch's threads."""
    if threads:
        torch.set_num_threads(threads)
    p = resolve_model(path)
    if is_shipped(p):
        verify_shipped(p)  # its sha256 must match models/<name>.sha256
    check_model_config(read_config(p), p)  # before building it: int_steps, grid and widths in range
    model = load_model(p)
    # amax propagates NaN and abs makes -inf inf: one reduction per tensor instead of a boolean map (5x faster)
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and t.numel()
           and not bool(torch.isfinite(t.abs().amax()))]
    if bad:
        raise AtlasMorphError(f"{p}: the model has NaN/Inf weights ({len(bad)} tensors, e.g. {bad[0]}); "
                              "it cannot give meaningful outputs (a diverged training run?)")
    return p, model


def sha256(path: Path | str) -> str:
    """sha256 of a file, as printed in the model card."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_file(path: Path | str) -> Path:
    """Where a shipped model's checksum lives: models/<name>.sha256 beside models/<name>.safetensors."""
    path = Path(path)
    return path.with_name(_stem(path) + ".sha256")


def _stem(path: Path) -> str:
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem


def verify_shipped(path: Path | str) -> str:
    """Check a shipped model against `<name>.sha256` beside it; returns the digest, raises on any doubt.

    The checksum file is one line as `sha256sum` writes it: `<64 hex digits>  <file name>`. A missing
    or malformed checksum file, a different file name or a different digest are all errors: a shipped
    model is never used unverified.
    """
    path = Path(path)
    sums = checksum_file(path)
    if not sums.is_file():
        raise AtlasMorphError(f"{path}: shipped model has no checksum file {sums.name}; the installation is incomplete")
    fields = sums.read_text().split()
    digest = fields[0].lower() if fields else ""
    name = fields[1].lstrip("*") if len(fields) > 1 else path.name
    if len(fields) not in (1, 2) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise AtlasMorphError(f"{sums}: not a sha256 checksum line ('<64 hex digits>  {path.name}')")
    if name != path.name:
        raise AtlasMorphError(f"{sums}: lists '{name}', not '{path.name}'")
    actual = sha256(path)
    if actual != digest:
        raise AtlasMorphError(
            f"{path}: sha256 {actual[:12]}... does not match {digest[:12]}... in {sums.name}; the model file is "
            "corrupt or was replaced (reinstall atlasmorph)"
        )
    return actual
