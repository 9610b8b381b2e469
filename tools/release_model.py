"""Turn a trained model into a shipped one: float16 weights in models/<name>.safetensors plus its .sha256.

    python tools/release_model.py runs/v1/model.safetensors --name atlasmorph-ixi-2mm-v1

The float16 copy is half the size; `benchmarks/` figures and the model card are measured on the
released file itself, so they describe exactly what users get.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atlasmorph_cli.model.model_file import load_model, save_model
from atlasmorph_cli.model.shipped import sha256


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model.safetensors written by `atlasmorph train`")
    ap.add_argument("--name", required=True, help="versioned release name, e.g. atlasmorph-ixi-2mm-v1")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    model.config.name = args.name
    dest = save_model(model, args.out / f"{args.name}.safetensors", dtype=torch.float16)
    digest = sha256(dest)
    (args.out / f"{args.name}.sha256").write_text(f"{digest}  {dest.name}\n")
    print(f"{dest} ({dest.stat().st_size / 1e6:.1f} MB) sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
