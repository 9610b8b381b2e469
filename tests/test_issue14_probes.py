"""The issue-14 probe in benchmarks/: the label refit (carried labels, a loss whose minimiser is their mean)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from atlasmorph_cli.model.model_file import AtlasMorph, ModelConfig
from label_refit_probe import QUANT, carry_labels, label_refit_loss  # benchmarks/, on pytest's pythonpath
from synthetic import SMALL_GRID


class _FixedTemplate(torch.nn.Module):
    """Stands in for AtlasMorph.template: T1 and label logits as free parameters (one template)."""

    def __init__(self, t1: torch.Tensor, logits: torch.Tensor):
        super().__init__()
        self.t1, self.logits = torch.nn.Parameter(t1), torch.nn.Parameter(logits)

    def template(self, attrs: torch.Tensor):
        b = attrs.shape[0]
        return self.t1.expand(b, *self.t1.shape[1:]), self.logits.expand(b, *self.logits.shape[1:])


def test_the_loss_is_stationary_at_the_mean_of_the_carried_labels():
    """Two subjects with the same attributes: the label term's gradient vanishes where the template's
    probabilities are the mean of their carried maps, and not elsewhere; the T1 anchor pulls toward it."""
    gen = torch.Generator().manual_seed(0)
    carried = torch.randint(0, 256, (2, 4, 5, 5, 5), generator=gen).float()
    carried = (carried / carried.sum(1, keepdim=True) * QUANT).round()
    mean = (carried / QUANT).mean(0, keepdim=True)
    mean = mean / mean.sum(1, keepdim=True)
    anchor = torch.rand(2, 1, 5, 5, 5, generator=gen)
    attrs = torch.zeros(2, 1)
    at_mean = _FixedTemplate(anchor[:1].clone(), torch.log(mean))
    loss, terms = label_refit_loss(at_mean, attrs, carried.to(torch.uint8), anchor, w_t1=10.0)
    loss.backward()
    target = carried / QUANT
    exact = (target / target.sum(1, keepdim=True)).mean(0, keepdim=True)  # rounding leaves sums off 1 by < 1e-2
    assert float((mean - exact).abs().max()) < 2e-2
    assert float(at_mean.logits.grad.abs().max()) < 1e-4
    elsewhere = _FixedTemplate(anchor[:1].clone(), torch.zeros_like(mean))
    label_refit_loss(elsewhere, attrs, carried.to(torch.uint8), anchor, w_t1=10.0)[0].backward()
    assert float(elsewhere.logits.grad.abs().max()) > 1e-3
    assert float(terms["t1_anchor"].detach()) > 0 and float(at_mean.t1.grad.abs().sum()) > 0  # the anchors differ


def test_an_untrained_registration_carries_the_labels_unchanged():
    """A fresh model's registration field is ~0: the carried labels are the subjects' own one-hot maps and
    the anchors its template T1."""
    torch.manual_seed(0)
    model = AtlasMorph(ModelConfig(name="t", grid=SMALL_GRID.to_dict(), attributes=[], template_width=8))
    labels = torch.randint(0, 35, (2, *SMALL_GRID.shape), dtype=torch.uint8)
    t1 = torch.rand(2, *SMALL_GRID.shape)
    carried, anchors = carry_labels(model, t1, labels, torch.zeros(2, 0))
    assert carried.dtype == torch.uint8 and carried.shape == (2, 35, *SMALL_GRID.shape)
    onehot = F.one_hot(labels.long(), 35).permute(0, 4, 1, 2, 3)
    assert bool((carried.argmax(1) == labels.long()).all())
    assert float((carried.float() / QUANT - onehot).abs().max()) < 0.01
    t1_t, _ = model.template(torch.zeros(1, 0))
    assert torch.allclose(anchors.float(), t1_t.expand(2, -1, -1, -1, -1).half().float())
