"""Instance optimisation: a few gradient steps on one subject's velocity field, started from the RegNet's.

The network predicts a velocity in one pass; refining that velocity for the subject at hand against an
image term (local NCC by default, or the one the network was trained with) and the trained smoothness term
sharpens the alignment the network left coarse, at the cost of about a second (no labels are needed at test
time).
"""
from __future__ import annotations

import torch

from ..model.layers import warp
from ..model.losses import get_image_loss, gradient_l2
from ..model.networks import velocity_to_displacements
from .acquisition import acquisition_blur
from .refine_defaults import REFINE_LR


def refine_velocity(
    vel_half: torch.Tensor,
    subject: torch.Tensor,
    template_t1: torch.Tensor,
    steps: int,
    *,
    lr: float = REFINE_LR,
    w_image: float = 100.0,
    w_smooth: float = 1.0,
    image_loss: str = "mse",
    int_steps: int = 7,
    blur: tuple[int, int, int] = (1, 1, 1),
) -> torch.Tensor:
    """Velocity (B,3,X/2,Y/2,Z/2) after `steps` Adam steps on w_image * image(subject, warped template)
    + w_smooth * gradient L2 of the half-resolution displacement (the training objective without labels).

    subject and template_t1 are (B,1,X,Y,Z) on the model grid; the input velocity is left untouched. `blur`:
    the subject's acquisition blur per model axis (inference.acquisition), applied to the warped template.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    vel = vel_half.detach().clone().requires_grad_(True)
    if steps == 0:
        return vel.detach()
    image = get_image_loss(image_loss)
    subject, template_t1 = subject.detach(), template_t1.detach()
    m1, m2 = torch.zeros_like(vel), torch.zeros_like(vel)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            vel.grad = None
            full, _, half = velocity_to_displacements(vel, int_steps, inverse=False)
            moved = acquisition_blur(warp(template_t1, full), blur)
            loss = w_image * image(subject, moved) + w_smooth * gradient_l2(half)
            loss.backward()
            with torch.no_grad():
                adam_step(vel, vel.grad, m1, m2, step, lr)
    return vel.detach()


def adam_step(param: torch.Tensor, grad: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, step: int, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam update of `param` in place (moments m1, m2 updated too; `step` counts from 1).

    The operations of torch.optim.Adam's single-tensor path (its default on CPU) in its order, so the numbers
    are the same; written out because constructing torch.optim.Adam imports torch._dynamo, about 1.2 s of
    every new process.
    """
    beta1, beta2 = betas
    m1.lerp_(grad, 1 - beta1)
    m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (m2.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(m1, denom, value=-(lr / (1 - beta1**step)))
