"""The training loop and its distribution: cohort -> model space -> steps -> checkpoints -> model file (DDP).

Every step draws a batch with a seeded generator whose state is checkpointed together with the
weights, the optimiser and the centrality memory, so `--resume` continues exactly where a killed
run stopped. Under `torchrun` the training subjects are split across ranks (gloo on CPU, nccl on
GPU) and only rank 0 writes files.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import TextColumn

from ..bids.layout import BidsSelection, is_bids_root
from ..errors import AtlasMorphError
from ..geometry.space import MODEL_GRID, Grid
from ..io.volumes import atomic_path
from ..model.attributes import AttributeEncoder
from ..model.loss_weights import LossWeights
from ..model.model_file import AtlasMorph, ModelConfig, load_model, save_model
from ..progress import progress_bar
from . import runs
from .augment import AugmentSettings, augment
from .bids_cohort import read_bids_cohort
from .checkpoints import load_checkpoint, save_checkpoint
from .cohort import Subject, cache_file, check_attribute_values, load_prepared, prepare_cohort, read_cohort
from .split import apply_split, read_split, split_subjects, usable_subjects
from .step import TrainingStep, fill_shape_memory, label_frequencies, refit_template_shape, validate
from .volume_prior import volume_trends

STAGES = ("joint", "template", "registration")
DEFAULT_NAME = "atlasmorph-custom"  # the model name when --name is not given


@dataclass
class TrainSettings:
    """Everything `atlasmorph train` can be told."""

    data: Path  # a cohort CSV or a BIDS dataset
    out: Path
    attributes: list[str] = field(default_factory=lambda: ["age", "sex"])
    steps: int = 1500
    batch_size: int = 1
    lr: float = 1e-3
    warmup: int = 0  # steps over which the lr rises linearly to `lr` (a run --init from a model: fresh Adam moments)
    weights: LossWeights = field(default_factory=LossWeights)
    image_loss: str = "mse"
    val_fraction: float = 0.15
    split: Path | None = None  # a split.json of an earlier run: the same train/validation subjects
    val_every: int = 100
    val_max: int = 12
    checkpoint_every: int = 50
    seed: int = 0
    resume: bool = False
    init: Path | None = None
    reference: Path | None = None
    cache: Path | None = None
    threads: int | None = None
    workers: int = 2
    device: str = "cpu"
    bandwidth: float = 0.5
    template_width: int = 32
    template_deform: bool = True  # template = base o exp(w(a)) + residual; --init from a v1 model adds it
    shape_every: int = 25  # steps between closed-form refits of the deformable template on the subjects' warps
    augment: bool = True  # RegNet sees bias/contrast/noise/thick-slice perturbed subjects; losses use the clean ones
    augment_fraction: float = 1.0  # of the subjects shown to RegNet, the fraction perturbed (the rest clean)
    # "joint": both networks learn; "template": the template network alone, the registration of --init frozen and
    # every loss at full resolution (a short second stage; docs/conditioning.md); "registration": the registration
    # network alone, the template of --init frozen and not refitted
    stage: str = "joint"
    name: str = DEFAULT_NAME
    quiet: bool = False
    bids: BidsSelection | None = None  # BIDS dataset: --participant-label/--session-label/--bids-filter
    seg_derivatives: str | None = None  # BIDS dataset: the derivatives folder with the dseg files
    grid: Grid = MODEL_GRID  # tests use a smaller grid; shipped models use MODEL_GRID


def load_init(model: AtlasMorph, init_model: AtlasMorph) -> None:
    """Copy a model's weights into `model`; a template deformation the init lacks starts at zero (the
    identity), so fine-tuning a v1 model into a deformable template starts from v1 exactly."""
    missing, unexpected = model.load_state_dict(init_model.state_dict(), strict=False)
    new = [k for k in missing if k not in ("template_net.shape_coef", "template_net.attr_lo", "template_net.attr_hi")]
    if unexpected or new:
        raise AtlasMorphError(f"--init: the model's weights do not fit this network ({(unexpected or new)[0]})")


# ----------------------------------------------------------------------------------------- main loop
def read_subjects(s: TrainSettings, loud: bool) -> list[Subject]:
    """The cohort: a BIDS dataset (its warnings printed by rank 0) or a cohort CSV."""
    if not is_bids_root(s.data):
        return read_cohort(s.data)
    subjects, warnings = read_bids_cohort(s.data, s.bids, s.seg_derivatives)
    for m in warnings if loud else []:
        runs.warn(m)
    return subjects


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world


def train(s: TrainSettings, reference: np.ndarray) -> Path:
    """Run training; returns the path of the final model file (written on rank 0)."""
    rank, world = _dist_info()
    device = torch.device(s.device if s.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    subjects = read_subjects(s, loud=rank == 0)
    ckpt = s.out / "checkpoint.safetensors"
    if s.resume and not ckpt.is_file():  # before hours of preparation
        raise AtlasMorphError(f"--resume: no checkpoint at {ckpt}")
    runs.check_out_folder(s.out, s.resume)  # a new run never replaces a finished (or killed) one
    s.out.mkdir(parents=True, exist_ok=True)
    if s.stage not in STAGES:
        raise AtlasMorphError(f"--stage must be one of {', '.join(STAGES)}; got '{s.stage}'")
    if s.stage != "joint" and s.init is None:
        raise AtlasMorphError(f"--stage {s.stage} fine-tunes one network of a trained model: give it with --init")
    init_model = load_model(s.init) if s.init else None
    names = init_model.config.encoder.names if init_model else s.attributes
    subjects, dropped = usable_subjects(subjects, names)
    if not subjects:
        raise AtlasMorphError("no subject has all of the attributes " + ", ".join(names))
    check_attribute_values(subjects, names)
    unnamed: list[Subject] = []
    if s.split is not None:  # the subjects of an earlier run's split (e.g. a baseline on the same data)
        train_subj, val_subj = apply_split(subjects, read_split(s.split))
        unnamed = [x for x in subjects if x not in train_subj and x not in val_subj]
        subjects = train_subj + val_subj
    else:
        train_subj, val_subj = split_subjects(subjects, s.val_fraction, s.seed)
    runs.check_small_cohort(train_subj, val_subj, names, finetune=init_model is not None, loud=rank == 0)
    run_record = runs.settings_record(s, train_subj, val_subj, names)
    if s.resume:  # before preparation and before split.json is rewritten
        runs.check_resume(ckpt, run_record)
    encoder = init_model.config.encoder if init_model else AttributeEncoder.fit(names, [x.attrs for x in train_subj])

    cache = s.cache or (s.out / "cache")
    if rank == 0:
        prepare_cohort(subjects, cache, reference, workers=s.workers, quiet=s.quiet, grid=s.grid)
    if world > 1:
        dist.barrier()
    paths = {x.id: cache_file(cache, x) for x in subjects}

    def stack(group: list[Subject]):
        t1, lab, has = load_prepared([paths[x.id] for x in group])
        a = np.stack([encoder.encode(encoder.parse(x.attrs)[0]) for x in group]).reshape(len(group), encoder.width)
        return torch.from_numpy(t1), torch.from_numpy(lab), torch.from_numpy(has), torch.from_numpy(a).float()

    tr_t1, tr_lab, has_lab, tr_attr = stack(train_subj)
    val_labelled = [x for x in val_subj if x.seg is not None][: s.val_max]
    va_t1, va_lab, _, va_attr = stack(val_labelled) if val_labelled else (None, None, None, None)

    settings_json = run_record  # every setting + the cohort fingerprint, compared on --resume (training.runs)
    if rank == 0:
        with atomic_path(s.out / "split.json") as tmp:
            tmp.write_text(json.dumps({"train": [x.id for x in train_subj], "validation": [x.id for x in val_subj],
                                       "excluded_missing_attributes": [x.id for x in dropped],
                                       "excluded_not_in_split": [x.id for x in unnamed],
                                       "seed": s.seed, "val_fraction": s.val_fraction,
                                       "split_from": str(s.split) if s.split else None}, indent=1))

    config = init_model.config if init_model else ModelConfig(
        name=s.name, grid=s.grid.to_dict(), attributes=encoder.to_dict(), template_width=s.template_width,
        template_deform=s.template_deform)
    if init_model is not None and s.template_deform:
        config.template_deform = True
    if init_model is not None and s.name != DEFAULT_NAME:  # a fine-tune keeps --init's name unless given one
        config.name = s.name
    config.loss_weights = asdict(s.weights)
    config.training = {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "image_loss": s.image_loss,
                       "seed": s.seed, "n_train": len(train_subj), "n_val": len(val_subj),
                       "bandwidth": s.bandwidth, "world_size": world, "stage": s.stage}
    model = AtlasMorph(config).to(device)
    if init_model is not None:
        load_init(model, init_model)
    else:
        model.template_net.init_base(tr_t1.mean(0), label_frequencies(tr_lab[has_lab]))
    model.train()
    template_only = s.stage == "template"
    frozen = {"template": model.reg_net, "registration": model.template_net}.get(s.stage)
    if frozen is not None:  # a stage trains one network; the other stays as --init has it
        for p in frozen.parameters():
            p.requires_grad_(False)

    trend, numeric = None, None
    if s.weights.volume:
        if not bool(has_lab.any()):
            raise AtlasMorphError("--w-volume needs label maps (seg) for the training subjects")
        numeric = torch.from_numpy(encoder.numeric_columns())
        trend = volume_trends(tr_lab[has_lab], tr_attr[has_lab], numeric, model.template_net.n_classes)
        full = torch.full((len(train_subj), trend.shape[1]), float("nan"))
        full[has_lab] = trend  # an unlabelled subject's row stays NaN: not scored
        trend, numeric = full.to(device), numeric.to(device)
    step_module = TrainingStep(model, s, trend, numeric)
    aug_settings = AugmentSettings(fraction=s.augment_fraction)
    runner = (torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
              if world > 1 else step_module)
    # fused Adam: one kernel over all parameters, ~10x faster than the per-tensor loop on CPU
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=s.lr, fused=True)
    gen = torch.Generator().manual_seed(s.seed + rank)
    my_idx = torch.arange(len(train_subj))[rank::world]
    low_shape = [d // 4 for d in s.grid.shape]
    # the centrality memory lives where the model does (the loss reads all of it every step)
    memory = {"fields": torch.zeros(len(train_subj), 3, *low_shape, device=device), "attrs": tr_attr.clone().to(device),
              "filled": torch.zeros(len(train_subj), dtype=torch.bool, device=device)}
    deform = model.template_net.deform
    if deform:  # the deformable template's regression targets, one per training subject (checkpointed)
        memory["shape"] = torch.zeros(len(train_subj), 3, *low_shape, device=device)
        memory["shape_filled"] = torch.zeros(len(train_subj), dtype=torch.bool, device=device)
    if rank == 0:  # temporary files of writes interrupted by a kill (the real files are intact)
        for stale in s.out.glob(".*.part*"):
            stale.unlink(missing_ok=True)
    step, history = 0, []
    if s.resume:  # its presence was checked before the cohort was prepared
        step, history = load_checkpoint(ckpt, model, optimizer, gen, memory)
    elif deform and s.stage == "joint":  # (a stage keeps --init's deformation and its range)
        model.template_net.set_attribute_range(tr_attr.to(device))
        fill_shape_memory(model, tr_t1, tr_attr, memory, my_idx)
        refit_template_shape(model, memory)

    cols = TextColumn("{task.fields[info]}")
    plain_log = rank == 0 and not s.quiet and not sys.stderr.isatty()  # nohup/cluster logs get text lines
    t0, steps_done = time.time(), 0
    with progress_bar(s.quiet or rank != 0, cols) as bar:
        task = bar.add_task("training", total=s.steps, completed=step, info="")
        while step < s.steps:
            for group in optimizer.param_groups:  # --lr on --resume anneals; the same --lr continues exactly
                group["lr"] = warmup_lr(s.lr, step, s.warmup)
            pick = my_idx[torch.randint(len(my_idx), (s.batch_size,), generator=gen)]
            x = tr_t1[pick, None]
            x_seen = augment(x, gen, aug_settings) if s.augment and not template_only else x
            x, x_seen = x.to(device), x_seen.to(device)
            total, terms, low, target = runner(
                x, x_seen, tr_lab[pick].to(device), has_lab[pick].to(device), tr_attr[pick].to(device),
                pick.to(device), memory["fields"], memory["attrs"], memory["filled"])
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if low is not None:
                memory["fields"][pick] = low
                memory["filled"][pick] = True
            if target is not None:
                memory["shape"][pick.to(device)] = target
                memory["shape_filled"][pick.to(device)] = True
                if (step + 1) % s.shape_every == 0:
                    refit_template_shape(model, memory)
            step += 1
            steps_done += 1
            rec = {"step": step, "lr": optimizer.param_groups[0]["lr"], "loss": float(total.detach()),
                   **{k: float(v.detach()) for k, v in terms.items()}}
            if rank == 0 and va_t1 is not None and (step % s.val_every == 0 or step == s.steps):
                d = validate(model, va_t1.to(device), va_lab, va_attr.to(device))
                rec["val_dice"] = float(np.nanmean(d))
            history.append(rec)
            rate = steps_done / (time.time() - t0)
            info = " ".join(f"{k}={v:.4g}" if k == "lr" else f"{k}={v:.4f}" for k, v in rec.items() if k != "step")
            info += f" {rate:.2f} it/s"
            bar.update(task, completed=step, info=info)
            if plain_log and (step % 10 == 0 or "val_dice" in rec):
                print(f"step {step}/{s.steps} {info}", file=sys.stderr, flush=True)
            if rank == 0 and (step % s.checkpoint_every == 0 or step == s.steps):
                save_checkpoint(ckpt, model, optimizer, gen, step, memory, history, settings_json)
    final = s.out / "model.safetensors"
    if rank == 0:
        save_model(model, final)
        write_history(s.out / "history.csv", history)
    if world > 1:
        dist.barrier()
    return final


def warmup_lr(lr: float, step: int, warmup: int) -> float:
    """The learning rate of 0-based `step`: rising linearly from lr/warmup to lr over the run's first `warmup`
    steps (counted from the run's start, so a resumed run continues the same schedule), then `lr`.
    Adam's first steps, with fresh moment estimates, move every parameter by about lr: from a trained
    model (--init) that undoes part of it (docs/conditioning.md, the fresh-Adam shock)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def write_history(path: Path, history: list[dict]) -> None:
    """Loss terms and validation Dice per step, as CSV."""
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
