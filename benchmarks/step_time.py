"""Time full AtlasMorph training steps on random data (batch 1): seconds per step and peak RSS.

A step: template forward, RegNet forward, integrate (+ and -), warp template T1 and the 35-class
softmax into the subject frame, MSE + soft Dice + gradient L2 + centrality, backward, Adam step
(fused). The label term uses warped_soft_dice (exactly soft_dice of the warped softmax, computed
sparsely); --full-warp-dice warps all 35 channels instead.
The "other" column is the share of the machine's CPUs used by OTHER processes during the step (from
/proc/stat): timings with other > ~0.1 are inflated by contention, not by this code.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasmorph_cli.nn.layers import resize_field, warp  # noqa: E402
from atlasmorph_cli.nn.losses import CentralityMemory, gradient_l2, mse, soft_dice, warped_soft_dice  # noqa: E402
from atlasmorph_cli.nn.networks import RegNet, TemplateNet, n_params, velocity_to_displacements  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=(80, 96, 80))
    p.add_argument("--classes", type=int, default=35)
    p.add_argument("--attrs", type=int, default=3)
    p.add_argument("--subjects", type=int, default=150)
    p.add_argument("--int-steps", type=int, default=7)
    p.add_argument("--enc", type=int, nargs=4, default=None, help="RegNet encoder widths (default: RegNet's)")
    p.add_argument("--dec", type=int, nargs=3, default=None, help="RegNet decoder widths (default: RegNet's)")
    p.add_argument("--no-fused-adam", action="store_true", help="use the foreach Adam instead of fused=True")
    p.add_argument("--full-warp-dice", action="store_true", help="warp all class channels, then soft_dice (slow)")
    return p.parse_args()


def busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (Linux /proc/stat; nan elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def make_data(shape: tuple[int, int, int], n_classes: int, n_attrs: int, gen: torch.Generator):
    """One random subject: T1, labels (and their one-hot), attributes."""
    t1 = torch.rand(1, 1, *shape, generator=gen)
    lab = torch.randint(0, n_classes, (1, *shape), generator=gen)
    onehot = torch.nn.functional.one_hot(lab, n_classes).permute(0, 4, 1, 2, 3).float()
    return t1, lab, onehot, torch.randn(1, n_attrs, generator=gen)


def main() -> None:
    """Build the networks, run warm-up + timed steps, print timings."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    tnet = TemplateNet(n_attrs=args.attrs, shape=shape, n_classes=args.classes)
    reg_kw = {k: tuple(v) for k, v in (("enc", args.enc), ("dec", args.dec)) if v is not None}
    reg = RegNet(int_steps=args.int_steps, **reg_kw)
    quarter = tuple(s // 4 for s in shape)
    memory = CentralityMemory(args.subjects, quarter, args.attrs)
    gen = torch.Generator().manual_seed(0)
    for i in range(args.subjects):  # a full memory, as late in training
        memory.update(torch.tensor([i]), 0.1 * torch.randn(1, 3, *quarter, generator=gen), torch.randn(1, args.attrs, generator=gen))
    params = list(tnet.parameters()) + list(reg.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, fused=not args.no_fused_adam)
    data = [make_data(shape, args.classes, args.attrs, gen) for _ in range(2)]
    n_cpu = os.cpu_count() or 1

    times, others, cpus = [], [], []
    for step in range(args.warmup + args.steps):
        t1, labels, onehot, attrs = data[step % 2]
        busy0, cpu0, t0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        tmpl_t1, logits = TemplateNet.split(tnet(attrs))
        vel = reg(t1, tmpl_t1)
        fwd, _inv, fwd_half = velocity_to_displacements(vel, args.int_steps)
        moved_t1 = warp(tmpl_t1, fwd)
        probs = torch.softmax(logits, dim=1)
        if args.full_warp_dice:
            dice = soft_dice(warp(probs, fwd), onehot)
        else:  # same value and gradient, without building the warped 35-channel volume
            dice = warped_soft_dice(probs, fwd, labels)
        low = resize_field(fwd_half, 0.5)
        idx = torch.tensor([step % args.subjects])
        loss = (
            mse(moved_t1, t1)
            + dice
            + 0.01 * gradient_l2(vel)
            + memory.loss(low, attrs, idx, bandwidth=1.0)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        memory.update(idx, low, attrs)
        dt = time.perf_counter() - t0
        other = (busy_cpu_seconds() - busy0 - (time.process_time() - cpu0)) / (n_cpu * dt)
        cpu = time.process_time() - cpu0
        if step >= args.warmup:
            times.append(dt)
            others.append(other)
            cpus.append(cpu)
        print(f"step {step}: {dt:.3f} s  cpu {cpu:.2f} s  other {other:.2f}  loss {loss.item():.4f}", flush=True)

    clean = [t for t, o in zip(times, others) if o < 0.1]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dice_kind = "full warp + soft_dice" if args.full_warp_dice else "warped_soft_dice"
    print(f"grid {shape}, classes {args.classes}, threads {torch.get_num_threads()}, RegNet enc/dec {reg_kw or 'default'}, {dice_kind}")
    print(f"params: TemplateNet {n_params(tnet):,} (base {tnet.base.numel():,}), RegNet {n_params(reg):,}")
    print(f"mean {statistics.mean(times):.3f} s/step, median {statistics.median(times):.3f} s/step over {len(times)} steps")
    if clean:
        print(f"uncontended steps (other < 0.1): {len(clean)}, median {statistics.median(clean):.3f} s/step")
    print(f"process CPU time: median {statistics.median(cpus):.3f} CPU-s/step")
    print(f"mean CPU share of other processes during steps: {statistics.mean(others):.2f}")
    print(f"peak RSS {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
