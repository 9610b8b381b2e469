"""Time full AtlasMorph training steps on random data (batch 1) and report s/step and peak RSS."""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasmorph_cli.nn.layers import resize_field, warp  # noqa: E402
from atlasmorph_cli.nn.losses import CentralityMemory, gradient_l2, mse, soft_dice  # noqa: E402
from atlasmorph_cli.nn.networks import RegNet, TemplateNet, n_params, velocity_to_displacements  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=(80, 96, 80))
    p.add_argument("--classes", type=int, default=35)
    p.add_argument("--attrs", type=int, default=3)
    p.add_argument("--subjects", type=int, default=150)
    p.add_argument("--int-steps", type=int, default=7)
    return p.parse_args()


def make_data(shape: tuple[int, int, int], n_classes: int, n_attrs: int, gen: torch.Generator):
    """One random subject: T1, one-hot labels, attributes."""
    t1 = torch.rand(1, 1, *shape, generator=gen)
    lab = torch.randint(0, n_classes, (1, *shape), generator=gen)
    onehot = torch.nn.functional.one_hot(lab, n_classes).permute(0, 4, 1, 2, 3).float()
    return t1, onehot, torch.randn(1, n_attrs, generator=gen)


def main() -> None:
    """Build the networks, run warm-up + timed steps, print timings."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    tnet = TemplateNet(n_attrs=args.attrs, shape=shape, n_classes=args.classes)
    reg = RegNet(int_steps=args.int_steps)
    quarter = tuple(s // 4 for s in shape)
    memory = CentralityMemory(args.subjects, quarter, args.attrs)
    gen = torch.Generator().manual_seed(0)
    for i in range(args.subjects):  # a full memory, as late in training
        memory.update(torch.tensor([i]), 0.1 * torch.randn(1, 3, *quarter, generator=gen), torch.randn(1, args.attrs, generator=gen))
    opt = torch.optim.Adam(list(tnet.parameters()) + list(reg.parameters()), lr=1e-4)
    data = [make_data(shape, args.classes, args.attrs, gen) for _ in range(2)]

    times = []
    for step in range(args.warmup + args.steps):
        t1, onehot, attrs = data[step % 2]
        t0 = time.perf_counter()
        out = tnet(attrs)
        tmpl_t1, logits = TemplateNet.split(out)
        vel = reg(t1, tmpl_t1)
        fwd, _inv, fwd_half = velocity_to_displacements(vel, args.int_steps)
        moved_t1 = warp(tmpl_t1, fwd)
        moved_probs = warp(torch.softmax(logits, dim=1), fwd)
        low = resize_field(fwd_half, 0.5)
        idx = torch.tensor([step % args.subjects])
        loss = (
            mse(moved_t1, t1)
            + soft_dice(moved_probs, onehot)
            + 0.01 * gradient_l2(vel)
            + memory.loss(low, attrs, idx, bandwidth=1.0)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        memory.update(idx, low, attrs)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
        print(f"step {step}: {dt:.3f} s loss {loss.item():.4f}", flush=True)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"grid {shape}, classes {args.classes}, threads {torch.get_num_threads()}")
    print(f"params: TemplateNet {n_params(tnet):,} (base {tnet.base.numel():,}), RegNet {n_params(reg):,}")
    print(f"mean {statistics.mean(times):.3f} s/step, median {statistics.median(times):.3f} s/step over {len(times)} steps")
    print(f"peak RSS {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
