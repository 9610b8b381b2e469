"""Probe (issue 14): a full-resolution template residual, fine-tuned with the registration frozen.

v2's template network decodes its attribute-dependent residual at half resolution. This adds the
full-resolution read-out (`TemplateNet(fine_width=...)`, zero-initialised, so the start is v2 exactly) and
trains the template network alone: every step takes one training subject (model space, from the training
cache), registers it to its matched template with v2's frozen registration network, and scores the
full-resolution template against it, 100 x image MSE + soft Dice of the warped label map (the training
losses, at full resolution; with --w-volume also v2's volume-trend term). The registration network, and so the registration, stays v2's. The learning
rate rises over the first 50 steps (fresh Adam moments). Writes a float16 model file for
benchmarks/segmentation_benchmark.py and benchmarks/conditioning.py.

    python benchmarks/fine_residual_probe.py --cache runs/cache --steps 400 --out runs/fine/model.safetensors
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from label_refit_probe import cached_subjects  # noqa: E402


def with_fine_residual(model, width: int):
    """A copy of `model` whose template network has a full-resolution residual of `width` (starting at zero)."""
    from atlasmorph_cli.model.model_file import AtlasMorph

    config = copy.deepcopy(model.config)
    config.template_fine = width
    out = AtlasMorph(config)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("template_net.fine") for k in missing):
        raise ValueError("the model does not fit the network with a full-resolution residual")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_options(ap, cache=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--width", type=int, default=8, help="channels of the full-resolution read-out (0: none, the control)")
    ap.add_argument("--lr-fine", type=float, default=1e-3, help="learning rate of the new read-out")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of the rest of the template network")
    ap.add_argument("--w-seg", type=float, default=1.0, help="weight of the soft Dice term (image MSE: 100)")
    ap.add_argument("--w-volume", type=float, default=0.0,
                    help="weight of the volume-trend term (train --w-volume; v2 used 10), at full resolution")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="atlasmorph-ixi-2mm-v2-fine-probe")
    ap.add_argument("--out", type=Path, required=True, help="the fine-tuned model file")
    common.add_data_option(ap)
    args = ap.parse_args(argv)

    import torch

    from atlasmorph_cli.model import losses
    from atlasmorph_cli.model.layers import warp
    from atlasmorph_cli.model.model_file import load_model, save_model
    from atlasmorph_cli.training.step import one_hot
    from atlasmorph_cli.training.volume_prior import reference_attributes, volume_trends

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = with_fine_residual(load_model(common.model_file(args.model)), args.width)
    model.config.name = args.name
    net = model.template_net
    split = json.loads(args.split.read_text())
    rows = {r["subject"]: r for r in common.ixi_rows(common.data_folder(args.data))}
    tr_t1, tr_lab, tr_a = cached_subjects(model, args.cache, rows, [s for s in split["train"] if s in rows])
    numeric = torch.from_numpy(model.config.encoder.numeric_columns())
    trend = volume_trends(tr_lab, tr_a, numeric, net.n_classes) if args.w_volume else None
    for p in model.reg_net.parameters():
        p.requires_grad_(False)
    fine = [p for n, p in net.named_parameters() if n.startswith("fine")]
    rest = [p for n, p in net.named_parameters() if not n.startswith("fine")]
    groups = [(fine, args.lr_fine), (rest, args.lr)] if fine else [(rest, args.lr)]  # --width 0: the control
    opt = torch.optim.Adam([{"params": p, "lr": lr} for p, lr in groups])
    base_lrs = [lr for _, lr in groups]
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0, hist = time.time(), []
    for step in range(1, args.steps + 1):
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * min(1.0, step / 50)
        i = torch.randint(len(tr_t1), (1,), generator=gen)
        x = tr_t1[i, None]
        t1_t, logits = model.template(tr_a[i])
        with torch.no_grad():
            fwd = model.predict_warps(x, t1_t)["fwd"]
        img = losses.mse(warp(t1_t, fwd), x)
        seg = losses.soft_dice(warp(torch.softmax(logits, 1), fwd), one_hot(tr_lab[i]))
        loss = 100.0 * img + args.w_seg * seg
        if trend is not None:  # the template's log-volume change from its same-sex reference follows the cohort's
            _, ref_logits = model.template(reference_attributes(tr_a[i], numeric))
            vol = losses.volume_trend_loss(losses.log_volumes(torch.softmax(logits, 1)),
                                           losses.log_volumes(torch.softmax(ref_logits, 1)), trend[i])
            loss = loss + args.w_volume * vol
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append((float(img.detach()), float(seg.detach())))
        if step % 25 == 0:
            h = np.mean(hist[-25:], 0)
            print(f"step {step} {time.time() - t0:.0f} s image {h[0]:.5f} seg {h[1]:.4f}", flush=True)
        if step % 100 == 0 or step == args.steps:
            save_model(model, args.out, dtype=torch.float16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
