"""Seconds and peak memory of one `atlasmorph train` step on the model grid (batch 1), on CPU or a GPU.

It times the very module the training loop runs (`train.TrainingStep`: template forward at full
resolution for T1 and half resolution for labels, RegNet, scaling and squaring, warps, MSE + soft Dice +
smoothness + magnitude + centrality, backward) plus the fused Adam step, on a subject from the
prepared IXI cache when `--cache` is given (random volumes otherwise), with a full centrality memory
as late in training.

The "other" column is the share of the machine's CPUs used by OTHER processes during the step
(/proc/stat): timings with other > 0.1 are inflated by contention, not by this code.

    python benchmarks/step_time.py --steps 20 --threads 2 --json docs/benchmarks/step_time.json
    python benchmarks/step_time.py --steps 50 --device cuda --json docs/benchmarks/step_time_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from atlasmorph_cli.model.attributes import AttributeEncoder  # noqa: E402
from atlasmorph_cli.training.cohort import load_prepared  # noqa: E402
from atlasmorph_cli.labels import N_CLASSES  # noqa: E402
from atlasmorph_cli.model.model_file import AtlasMorph, ModelConfig  # noqa: E402
from atlasmorph_cli.model.networks import n_params  # noqa: E402
from atlasmorph_cli.geometry.space import MODEL_GRID  # noqa: E402
from atlasmorph_cli.training.augment import augment  # noqa: E402
from atlasmorph_cli.training.loop import TrainSettings  # noqa: E402
from atlasmorph_cli.training.step import TrainingStep  # noqa: E402


def busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (Linux /proc/stat; nan elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def subject_data(cache: Path | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(T1 (1,1,X,Y,Z), labels (1,X,Y,Z)): the first cached subject, or random volumes."""
    if cache is not None:
        files = sorted(cache.glob("*.npz"))
        if files:
            t1, lab, _ = load_prepared(files[:1])
            return torch.from_numpy(t1)[:, None], torch.from_numpy(lab)
    shape = MODEL_GRID.shape
    return torch.rand(1, 1, *shape, generator=gen), torch.randint(0, N_CLASSES, (1, *shape), generator=gen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--cache", type=Path, default=None, help="prepared-cohort cache folder (real subject)")
    ap.add_argument("--subjects", type=int, default=130, help="centrality memory size (default 130)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the step runs (default cpu)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)

    def sync() -> None:  # GPU work is asynchronous: wait for it before reading the clock
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows = [{"age": str(a), "sex": s} for a, s in zip(np.linspace(20, 86, 10), "FM" * 5)]
    enc = AttributeEncoder.fit(["age", "sex"], rows)
    settings = TrainSettings(data=Path("."), out=Path("."))  # the defaults of `atlasmorph train`
    model = AtlasMorph(ModelConfig(name="bench", grid=MODEL_GRID.to_dict(), attributes=enc.to_dict(),
                                   template_deform=settings.template_deform)).to(dev)
    step = TrainingStep(model, settings)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=True)
    low = [d // 4 for d in MODEL_GRID.shape]
    mem_fields = (0.1 * torch.randn(args.subjects, 3, *low, generator=gen)).to(dev)
    mem_attrs = torch.randn(args.subjects, enc.width, generator=gen).to(dev)
    mem_filled = torch.ones(args.subjects, dtype=torch.bool, device=dev)
    x, labels = (t.to(dev) for t in subject_data(args.cache, gen))
    attrs = mem_attrs[:1].clone()
    has = torch.ones(1, dtype=torch.bool, device=dev)
    n_cpu = os.cpu_count() or 1

    times, others, cpus = [], [], []
    for i in range(args.warmup + args.steps):
        sync()
        busy0, cpu0, t0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        x_seen = augment(x.cpu(), gen).to(dev) if settings.augment else x  # as the training loop does
        total, terms, low_disp, _ = step(x, x_seen, labels, has, attrs, torch.tensor([i % args.subjects], device=dev),
                                         mem_fields, mem_attrs, mem_filled)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        mem_fields[i % args.subjects] = low_disp[0]
        sync()
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        other = (busy_cpu_seconds() - busy0 - cpu) / (n_cpu * dt)
        if i >= args.warmup:
            times.append(dt)
            others.append(other)
            cpus.append(cpu)
        print(f"step {i}: {dt:.3f} s  cpu {cpu:.2f} s  other {other:.2f}  loss {float(total):.4f}", flush=True)

    clean = [t for t, o in zip(times, others) if o < 0.1]
    res = {
        "command": common.command_line("step_time.py", argv),
        "machine": common.describe_machine(with_torch=True),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "grid": list(MODEL_GRID.shape),
        "data": "cached IXI subject" if args.cache else "random volumes",
        "params": {"template_net": n_params(model.template_net), "reg_net": n_params(model.reg_net)},
        "steps_timed": len(times),
        "seconds_per_step": {"mean": statistics.mean(times), "median": statistics.median(times)},
        "uncontended_steps": len(clean),
        "seconds_per_step_uncontended_median": statistics.median(clean) if clean else None,
        "cpu_seconds_per_step_median": statistics.median(cpus),
        "other_processes_cpu_share_mean": statistics.mean(others),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
