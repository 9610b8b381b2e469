"""Probe (issue 14, not kept): refit the template's label map to the mean of the subjects' carried labels.

A classical atlas build registers the subjects to the template and averages their label maps. This probe does
that for v2's conditional template: every training subject (model space, from the training cache) is registered
to its attribute-matched template by the frozen registration network, its one-hot labels are carried into the
template's frame, and the template network is trained on them by cross-entropy, whose minimiser is the mean
of the carried maps of the subjects that share the attributes. The T1 channel is held by a squared-error anchor,
so registration is unchanged. The result is written as a model file for benchmarks/segmentation_benchmark.py.

    python benchmarks/label_refit_probe.py --cache runs/cache --steps 400 --lr 2e-3 --out runs/lr/model.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from empirical_atlas import carried_labels  # noqa: E402

QUANT = 255.0  # carried label probabilities are stored as uint8 (x / 255): 35 maps x N subjects fit in memory


def carry_labels(model, t1, labels, attrs):
    """Each subject (N, X, Y, Z) registered to its matched template: its one-hot labels pulled into the
    template's frame (N, C, X, Y, Z, uint8 probabilities x 255) and the template T1s (N, 1, X, Y, Z, float16)."""
    import torch

    carried = torch.empty(len(t1), model.template_net.n_classes, *t1.shape[1:], dtype=torch.uint8)
    anchors = torch.empty(len(t1), 1, *t1.shape[1:], dtype=torch.float16)
    with torch.no_grad():
        for i in range(len(t1)):
            t1_t, _ = model.template(attrs[i : i + 1])
            carried[i] = (carried_labels(model, t1[i], labels[i], t1_t) * QUANT).round().clamp(0, QUANT).to(torch.uint8)
            anchors[i] = t1_t[0].half()
    return carried, anchors


def label_refit_loss(model, attrs, carried, anchor, w_t1: float):
    """Cross-entropy of the full-resolution template label map against the carried labels (B, C, ..., uint8),
    plus w_t1 x the squared difference of the template T1 from its anchor (B, 1, ...); (total, terms)."""
    import torch.nn.functional as F

    t1_t, logits = model.template(attrs)
    target = carried.float() / QUANT
    terms = {"label_ce": -(target * F.log_softmax(logits, dim=1)).sum(1).mean(),
             "t1_anchor": F.mse_loss(t1_t, anchor.float())}
    return terms["label_ce"] + w_t1 * terms["t1_anchor"], terms


def cached_subjects(model, cache: Path, rows: dict, ids: list[str]):
    """(t1 (N,X,Y,Z), labels (N,X,Y,Z) uint8, encoded attributes (N,A)) of cached subjects, as training stacks them."""
    import torch

    enc = model.config.encoder
    t1, lab = common.load_cached(cache, ids)
    a = [enc.encode(enc.parse({"age": rows[sid]["age"], "sex": rows[sid]["sex"]})[0]) for sid in ids]
    return torch.from_numpy(t1), torch.from_numpy(lab), torch.from_numpy(np.stack(a)).float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_options(ap, cache=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--w-t1", type=float, default=100.0, help="weight of the T1 anchor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="the refitted model file")
    common.add_data_option(ap)
    args = ap.parse_args(argv)

    import torch

    from atlasmorph_cli.model.model_file import load_model, save_model
    from atlasmorph_cli.training.step import validate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(common.model_file(args.model))
    split = json.loads(args.split.read_text())
    rows = {r["subject"]: r for r in common.ixi_rows(common.data_folder(args.data))}
    tr_t1, tr_lab, tr_a = cached_subjects(model, args.cache, rows, [s for s in split["train"] if s in rows])
    va_t1, va_lab, va_a = cached_subjects(model, args.cache, rows, [s for s in split["validation"] if s in rows][:12])
    t0 = time.time()
    print(f"in-loop validation Dice before: {np.nanmean(validate(model, va_t1, va_lab, va_a)):.4f}", flush=True)
    model.eval()
    carried, anchors = carry_labels(model, tr_t1, tr_lab, tr_a)
    print(f"carried {len(carried)} subjects in {time.time() - t0:.0f} s", flush=True)
    for p in model.reg_net.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.template_net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    hist: list[dict] = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(carried), (args.batch,), generator=gen)
        loss, terms = label_refit_loss(model, tr_a[idx], carried[idx], anchors[idx], args.w_t1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append({k: float(v.detach()) for k, v in terms.items()})
        if step % 25 == 0:
            print(step, f"{time.time() - t0:.0f} s", {k: round(float(np.mean([h[k] for h in hist[-25:]])), 6)
                                                    for k in hist[-1]}, flush=True)
        if step % 200 == 0 or step == args.steps:
            print(f"step {step}: in-loop validation Dice {np.nanmean(validate(model, va_t1, va_lab, va_a)):.4f}", flush=True)
            save_model(model, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
