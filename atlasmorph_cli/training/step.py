"""One training step: the loss terms (TrainingStep), the deformable template's closed-form refit, validation.

The loss assembly weights each term (`LossWeights`) and takes the image similarity from the registry
(`losses.get_image_loss`); validation scores the warped template labels against held-out subjects.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..labels import N_CLASSES
from ..model import losses
from ..model.layers import warp
from ..model.model_file import AtlasMorph
from .metrics import dice_per_structure
from .volume_prior import reference_attributes


def label_frequencies(labels: torch.Tensor, n: int = N_CLASSES) -> torch.Tensor:
    """Voxel-wise label frequencies (n, X, Y, Z) over subjects, one subject at a time to bound memory."""
    if labels.shape[0] == 0:
        return torch.full((n, *labels.shape[1:]), 1.0 / n)
    counts = torch.zeros(n, *labels.shape[1:])
    for lab in labels:
        counts += F.one_hot(lab.long(), n).permute(3, 0, 1, 2)
    return counts / labels.shape[0]


def one_hot(labels: torch.Tensor, n: int = N_CLASSES) -> torch.Tensor:
    """(B, X, Y, Z) integer labels -> (B, n, X, Y, Z) float one-hot."""
    return F.one_hot(labels.long(), n).permute(0, 4, 1, 2, 3).float()


def quarter_velocity(vel_half: torch.Tensor) -> torch.Tensor:
    """A half-resolution velocity (half-grid voxels) averaged to quarter resolution, in quarter-grid voxels."""
    return F.avg_pool3d(vel_half, 2) / 2.0


def shape_target(model: AtlasMorph, attrs: torch.Tensor, reg_vel: torch.Tensor) -> torch.Tensor:
    """A subject's deformation target w(a) + v (quarter resolution, detached): its template's velocity plus
    the registration network's velocity from that template to the subject (its shape relative to the base)."""
    return (model.template_net.velocity_quarter(attrs) + quarter_velocity(reg_vel)).detach()


@torch.no_grad()
def fill_shape_memory(model: AtlasMorph, t1: torch.Tensor, attrs: torch.Tensor, memory: dict, idx: torch.Tensor,
                      batch: int = 4) -> None:
    """Template-velocity targets w(a) + v of subjects idx from the current networks (before the first step),
    so the deformable template's regression starts from every subject instead of filling up over an epoch."""
    was = model.training
    model.eval()
    dev = memory["shape"].device
    for k in range(0, len(idx), batch):
        sel = idx[k : k + batch]
        a = attrs[sel].to(dev)
        tmpl = model.template_net.forward_train(a)
        reg = model.predict_warps(t1[sel, None].to(dev), tmpl["t1"])
        memory["shape"][sel.to(dev)] = shape_target(model, a, reg["vel"])
        memory["shape_filled"][sel.to(dev)] = True
    model.train(was)


@torch.no_grad()
def refit_template_shape(model: AtlasMorph, memory: dict) -> None:
    """Set the deformable template's coefficients to the regression of the stored targets w(a_i) + v_i on the
    attributes (summed over ranks under DDP, so every rank gets the same template): each template moves to
    the centre of the subjects with its attributes, as a classical template build averages the warps."""
    keep = memory["shape_filled"]
    gram, cross = model.template_net.shape_normal_equations(memory["attrs"][keep], memory["shape"][keep])
    if dist.is_initialized():
        dist.all_reduce(gram)
        dist.all_reduce(cross)
    if float(gram[0, 0]) > 0:  # at least one subject stored
        model.template_net.fit_shape(gram, cross)


class TrainingStep(torch.nn.Module):
    """The differentiable part of a step (wrapped by DDP when distributed): returns the loss terms."""

    def __init__(self, model: AtlasMorph, settings, volume_trend: torch.Tensor | None = None,
                 numeric: torch.Tensor | None = None):
        """volume_trend: each training subject's expected log-volume change from its reference attributes, and
        numeric (A,) bool, the encoded columns set to the mean there (training.volume_prior); for --w-volume."""
        super().__init__()
        self.model = model
        self.volume_trend, self.numeric = volume_trend, numeric
        self.w = settings.weights
        self.image_loss = losses.get_image_loss(settings.image_loss)
        self.bandwidth = settings.bandwidth
        self.template_only = settings.stage == "template"
        self.trains_template = settings.stage != "registration"

    def forward(self, x, x_seen, labels, has_labels, attrs, idx, mem_fields, mem_attrs, mem_filled):
        """x: the clean subjects every loss scores; x_seen: what RegNet is given (x itself, or augmented).
        Also returns, with a deformable template, each subject's deformation target w(a) + v (detached)."""
        if self.template_only:
            return self.template_terms(x, x_seen, labels, has_labels, attrs, idx)
        with torch.set_grad_enabled(self.trains_template and torch.is_grad_enabled()):
            tmpl = self.model.template_net.forward_train(attrs)
        t1_t, logits_half, tvel = tmpl["t1"], tmpl["logits"], tmpl["vel"]
        reg = self.model.predict_warps(x_seen, t1_t.detach())  # the template learns from the losses, not via RegNet's input
        terms = {"image": self.image_loss(warp(t1_t, reg["fwd"]), x)}
        target = None
        if tvel is not None and self.trains_template:  # subject ~ base o exp(w + v): w is refitted toward w + v
            target = shape_target(self.model, attrs, reg["vel"])
            terms["off_centre"] = (quarter_velocity(reg["vel"].detach()) ** 2).sum(1).mean()  # what the next refit moves
        if self.w.image_inverse:
            terms["image_inv"] = self.image_loss(warp(x, reg["inv"]), t1_t)
        if has_labels.any():
            sel = has_labels.nonzero().flatten()
            probs = warp(torch.softmax(logits_half[sel], dim=1), reg["fwd_half"][sel])
            terms["seg"] = losses.soft_dice(probs, F.avg_pool3d(one_hot(labels[sel]), 2))
        if self.scores_volume:
            terms["volume"] = self.volume_term(
                logits_half, lambda a: self.model.template_net.forward_train(a)["logits"], attrs, idx)
        terms["smooth"] = losses.gradient_l2(reg["fwd_half"])
        terms["magnitude"] = losses.magnitude_l2(reg["fwd_half"])
        low = F.avg_pool3d(reg["fwd_half"], 2)
        terms["centrality"] = losses.centrality_loss(
            low, attrs, mem_fields, mem_attrs, mem_filled, idx, self.bandwidth
        )
        weights = {"image": self.w.image, "image_inv": self.w.image_inverse, "seg": self.w.seg,
                   "smooth": self.w.smooth, "magnitude": self.w.magnitude, "centrality": self.w.centrality,
                   "volume": self.w.volume}
        total = sum(weights[k] * v for k, v in terms.items() if k in weights)
        return total, terms, low.detach(), target

    def template_terms(self, x, x_seen, labels, has_labels, attrs, idx):
        """`--stage template`: the registration network is frozen and only the template learns, so every term
        is scored at full resolution (joint training scores labels at half resolution to afford RegNet's
        backward pass): image similarity, soft Dice and the volume trend. Returns no centrality field and no
        deformation target: the registration does not change, neither does the template's deformation."""
        t1_t, logits = self.model.template(attrs)
        with torch.no_grad():
            fwd = self.model.predict_warps(x_seen, t1_t)["fwd"]
        terms = {"image": self.image_loss(warp(t1_t, fwd), x)}
        if has_labels.any():
            sel = has_labels.nonzero().flatten()
            terms["seg"] = losses.soft_dice(warp(torch.softmax(logits[sel], 1), fwd[sel]), one_hot(labels[sel]))
        if self.scores_volume:
            terms["volume"] = self.volume_term(logits, lambda a: self.model.template(a)[1], attrs, idx)
        weights = {"image": self.w.image, "seg": self.w.seg, "volume": self.w.volume}
        return sum(weights[k] * v for k, v in terms.items()), terms, None, None

    @property
    def scores_volume(self) -> bool:
        """--w-volume with numeric attributes (without them the reference is the template itself: no term), while
        the template learns (the registration stage freezes it)."""
        return bool(self.w.volume) and bool(self.numeric.any()) and self.trains_template

    def volume_term(self, logits, label_logits, attrs, idx):
        """The template's log-volume change from its reference template (numeric attributes at their mean)
        against the cohort's trend. Both carry gradients, so what moves them equally (the base) cancels and the
        attributes' part learns. `label_logits(attrs)`: the label logits at the resolution of `logits`."""
        ref_logits = label_logits(reference_attributes(attrs, self.numeric))
        trend = self.volume_trend[idx.to(self.volume_trend.device)]
        return losses.volume_trend_loss(losses.log_volumes(torch.softmax(logits, 1)),
                                        losses.log_volumes(torch.softmax(ref_logits, 1)), trend)


@torch.no_grad()
def validate(model: AtlasMorph, t1: torch.Tensor, labels: torch.Tensor, attrs: torch.Tensor) -> np.ndarray:
    """Per-structure Dice (subjects x 34) of the warped template label map against subjects' labels."""
    model.eval()
    rows = []
    for i in range(t1.shape[0]):
        x = t1[i : i + 1, None]
        t1_t, logits = model.template(attrs[i : i + 1])
        reg = model.predict_warps(x, t1_t)
        seg = warp(torch.softmax(logits, 1), reg["fwd"]).argmax(1)[0]
        rows.append(dice_per_structure(seg.cpu().numpy(), labels[i].cpu().numpy()))
    model.train()
    return np.array(rows)
