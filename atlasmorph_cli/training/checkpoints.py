"""Training checkpoints: weights, optimiser, sampler RNG, subject memories and history in one safetensors file.

Written atomically and without pickle; `--resume` restores all of it, so a killed run continues exactly.
The tensor names (`model.*`, `opt.<param>.<state>`, `rng`, `mem.*`) and metadata keys are the format.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import AtlasMorphError
from ..io.volumes import atomic_path, canonical_safetensors


def save_checkpoint(path: Path, model, optimizer, gen: torch.Generator, step: int, memory: dict,
                    history: list[dict], settings_json: str) -> None:
    """Weights, optimiser state, sampler RNG, centrality memory and history, atomically, no pickle."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
    tensors["rng"] = gen.get_state()
    for k, v in memory.items():
        tensors[f"mem.{k}"] = v.contiguous().cpu()
    meta = {"step": str(step), "history": json.dumps(history), "settings": settings_json,
            "config": json.dumps(asdict(model.config)), "opt_groups": json.dumps(opt["param_groups"])}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        canonical_safetensors(tmp)


def load_checkpoint(path: Path, model, optimizer, gen: torch.Generator, memory: dict) -> tuple[int, list[dict]]:
    """Restore what save_checkpoint wrote; returns (step, history). A damaged checkpoint, or one written
    with other settings (attributes, network width, cohort), is an error, not a silent fresh start."""
    try:
        return _load_checkpoint(path, model, optimizer, gen, memory)
    except AtlasMorphError:
        raise
    except Exception as exc:
        raise AtlasMorphError(
            f"--resume: cannot continue from {path}: it is damaged or was written with other settings "
            f"(attributes, network, cohort) ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
        ) from exc


def _load_checkpoint(path: Path, model, optimizer, gen: torch.Generator, memory: dict) -> tuple[int, list[dict]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        get = f.get_tensor
        model.load_state_dict({k[6:]: get(k) for k in keys if k.startswith("model.")})
        state: dict[int, dict] = {}
        for k in keys:
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = get(k)
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["opt_groups"])})
        gen.set_state(get("rng"))
        for k in memory:
            memory[k].copy_(get(f"mem.{k}"))
    return int(meta["step"]), json.loads(meta["history"])
