"""The conditional template network and the registration U-Net (lean, for CPU training)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import integrate_velocity, resize_field, warp


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution + LeakyReLU(0.2), the unit of both networks."""
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


def quadratic_basis(attrs: torch.Tensor) -> torch.Tensor:
    """(B, 1 + 2A) regression basis [1, a, a^2] of encoded attributes (B, A): the template's shape and the
    volume prior are both regressions on it."""
    return torch.cat([attrs.new_ones(attrs.shape[0], 1), attrs, attrs * attrs], dim=1)


def ridge_coefficients(gram: torch.Tensor, cross: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Solve (G + lam I) C = X for the regression coefficients C, lam = ridge x the mean diagonal of G (it
    also settles the collinear columns of one-hot attributes)."""
    lam = ridge * float(torch.diagonal(gram).mean())
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), cross)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Trilinearly upsample a volume x2 per axis (voxel-extent convention, as resize_field)."""
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class TemplateNet(nn.Module):
    """Conditional template: a learned base (population average), optionally deformed, plus a residual.

    Output channel 0 is T1 intensity (0..1 scale), channels 1.. are label logits. The residual branch
    maps attributes -> MLP -> a (X/16, Y/16, Z/16) feature volume -> 3 x (upsample, 3x3x3 conv) to half
    resolution -> a zero-initialised 1x1x1 conv -> trilinear upsample to full resolution, so training
    starts from the base template exactly.

    With `deform=True` the template is also a *deformation* of the base: template = base o exp(w(a)) +
    residual, with a stationary velocity w(a) = sum_k b_k(a) C_k at quarter resolution, a regression on the
    basis b(a) = [1, a, a^2] of the encoded attributes (clamped to their training range). The coefficient
    fields C are not learned by gradient: training sets them, in closed form, to the regression of the
    subjects' deformations on their attributes (`fit_shape`), so each template sits at the centre of the
    subjects that share its attributes, as a classical template build averages the warps. Age acts on
    anatomy mostly as shape (ventricles expand, cortex thins), which this expresses directly. Without
    attributes b(a) = [1]: one centring deformation.
    """

    def __init__(self, n_attrs: int, shape: Sequence[int], n_classes: int = 35, width: int = 32,
                 deform: bool = False, int_steps: int = 7):
        super().__init__()
        self.n_attrs, self.n_classes, self.shape = int(n_attrs), int(n_classes), tuple(int(s) for s in shape)
        if any(s % 16 for s in self.shape):
            raise ValueError(f"template shape {self.shape} must be divisible by 16")
        self.deform, self.int_steps = bool(deform), int(int_steps)
        self.base = nn.Parameter(torch.zeros(1, 1 + self.n_classes, *self.shape))
        if self.n_attrs > 0:
            self.low = tuple(s // 16 for s in self.shape)
            self.width = int(width)
            n_low = self.width * self.low[0] * self.low[1] * self.low[2]
            self.mlp = nn.Sequential(nn.Linear(self.n_attrs, 64), nn.ELU(), nn.Linear(64, n_low), nn.ELU())
            chans = (self.width, self.width, self.width, self.width // 2)
            self.decoder = nn.ModuleList(conv_block(chans[i], chans[i + 1]) for i in range(3))
            self.head = nn.Conv3d(chans[-1], 1 + self.n_classes, 1)  # 1x1x1: a cheap per-voxel read-out
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if self.deform:
            self.register_buffer("shape_coef", torch.zeros(1 + 2 * self.n_attrs, 3, *(s // 4 for s in self.shape)))
            self.register_buffer("attr_lo", torch.full((self.n_attrs,), -float("inf")))
            self.register_buffer("attr_hi", torch.full((self.n_attrs,), float("inf")))

    @torch.no_grad()
    def init_base(self, mean_t1: torch.Tensor, mean_onehot: torch.Tensor) -> None:
        """Start from the cohort average: intensity = mean_t1 (X,Y,Z), logits = log of renormalised clamp(p, 1e-3)."""
        p = mean_onehot.to(self.base).clamp_min(1e-3)
        p = p / p.sum(0, keepdim=True)
        self.base[0, 0] = mean_t1.to(self.base)
        self.base[0, 1:] = torch.log(p)

    def branches(self, attrs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Attribute-dependent residual at half resolution (B, 1 + n_classes, X/2, Y/2, Z/2) and template
        velocity at half resolution (B, 3, X/2, Y/2, Z/2); None for what the network does not have."""
        vel = resize_field(self.velocity_quarter(attrs), 2.0) if self.deform else None
        if self.n_attrs == 0:
            return None, vel
        x = self.mlp(attrs.to(self.base.dtype)).view(attrs.shape[0], self.width, *self.low)
        for block in self.decoder:
            x = block(upsample2(x))
        return self.head(x), vel

    def shape_basis(self, attrs: torch.Tensor) -> torch.Tensor:
        """(B, 1 + 2A) regression basis [1, a, a^2] of encoded attributes clamped to the training range."""
        return quadratic_basis(torch.minimum(torch.maximum(attrs.to(self.shape_coef.dtype), self.attr_lo), self.attr_hi))

    def velocity_quarter(self, attrs: torch.Tensor) -> torch.Tensor:
        """The template velocity at quarter resolution (B, 3, X/4, Y/4, Z/4; quarter-grid voxels)."""
        return torch.einsum("bk,kcxyz->bcxyz", self.shape_basis(attrs), self.shape_coef)

    @torch.no_grad()
    def set_attribute_range(self, attrs: torch.Tensor) -> None:
        """Clamp the shape basis to the range of these (training) attributes: no extrapolated anatomy."""
        self.attr_lo.copy_(attrs.min(0).values)
        self.attr_hi.copy_(attrs.max(0).values)

    def shape_normal_equations(self, attrs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B^T B, B^T T) of the basis of attrs (N, A) and velocity targets (N, 3, ...): sums, so ranks add them."""
        basis = self.shape_basis(attrs).double()
        return basis.T @ basis, basis.T @ targets.reshape(len(targets), -1).double()

    @torch.no_grad()
    def fit_shape(self, gram: torch.Tensor, cross: torch.Tensor, ridge: float = 1e-3) -> None:
        """Coefficients of the ridge regression of the targets on the basis (`ridge_coefficients`)."""
        coef = ridge_coefficients(gram, cross, ridge)
        self.shape_coef.copy_(coef.view_as(self.shape_coef).to(self.shape_coef.dtype))

    def forward_train(self, attrs: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Training outputs: `t1` full-resolution T1 (B,1,X,Y,Z), `logits` HALF-resolution label logits
        (B,C,X/2,Y/2,Z/2) and `vel`, the template velocity (B,3,X/2,Y/2,Z/2), None without `deform`.

        The label terms are scored at half resolution (the base averaged 2x2x2, deformed, plus the
        half-resolution residual), which keeps a CPU training step affordable; `forward` gives the
        full-resolution map.
        """
        b = attrs.shape[0]
        t1, logits = self.base[:, :1], F.avg_pool3d(self.base[:, 1:], 2)
        r, vel = self.branches(attrs)
        if vel is not None:
            disp_half = integrate_velocity(vel, self.int_steps)
            t1 = warp(t1.expand(b, *t1.shape[1:]), resize_field(disp_half, 2.0))
            logits = warp(logits.expand(b, *logits.shape[1:]), disp_half)
        if r is None:
            return {"t1": t1.expand(b, *t1.shape[1:]), "logits": logits.expand(b, *logits.shape[1:]), "vel": vel}
        return {"t1": t1 + upsample2(r[:, :1]), "logits": logits + r[:, 1:], "vel": vel}

    def forward(self, attrs: torch.Tensor) -> torch.Tensor:
        """Template(s) for attributes (B, n_attrs) -> raw output (B, 1 + n_classes, X, Y, Z)."""
        b = attrs.shape[0]
        r, vel = self.branches(attrs)
        out = self.base.expand(b, *self.base.shape[1:])
        if vel is not None:
            out = warp(out, resize_field(integrate_velocity(vel, self.int_steps), 2.0))
        return out if r is None else out + upsample2(r)

    @staticmethod
    def split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output -> (t1 (B, 1, ...), label logits (B, n_classes, ...)); one split, so one cheap backward."""
        t1, logits = out.split([1, out.shape[1] - 1], dim=1)
        return t1, logits


def velocity_to_displacements(
    vel_half: torch.Tensor, steps: int = 7, *, inverse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The one velocity -> displacement path: integrate +vel (and -vel) at half resolution; returns
    (fwd_full, inv_full, fwd_half), inv_full None with `inverse=False` (refinement needs no inverse).

    fwd warps the TEMPLATE into the subject's frame (warp(template, fwd_full)); inv warps the subject
    into the template's frame. Full-resolution fields are resized x2 with vectors doubled.
    """
    fwd_half = integrate_velocity(vel_half, steps)
    inv_full = resize_field(integrate_velocity(-vel_half, steps), 2.0) if inverse else None
    return resize_field(fwd_half, 2.0), inv_full, fwd_half


class RegNet(nn.Module):
    """Lean U-Net: (subject, template T1) -> stationary velocity field at half resolution (voxels of that grid).

    Encoder: a full-resolution conv enc[0] (enc[0] = 0 leaves it out: the stride-2 conv then reads the
    input directly), then stride-2 convs to 1/2 (enc[1]), 1/4 (enc[2]) and 1/8 (enc[3]).
    Decoder: conv dec[0] at 1/8, then (upsample, concat skip, conv) to 1/4 (dec[1]) and 1/2 (dec[2]),
    and a near-zero-initialised 3-channel velocity conv. The defaults are the CPU-lean choice: a
    full-resolution conv (enc[0] = 16) costs about as much as the rest of the network on 2 cores.
    """

    def __init__(
        self,
        in_channels: int = 2,
        enc: Sequence[int] = (0, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 16),
    ):
        super().__init__()
        if len(enc) != 4 or len(dec) != 3:
            raise ValueError("RegNet needs 4 encoder and 3 decoder widths")
        self.enc0 = conv_block(in_channels, enc[0]) if enc[0] > 0 else nn.Identity()
        widths = (enc[0] if enc[0] > 0 else in_channels, *enc[1:])
        self.down = nn.ModuleList(conv_block(widths[i], widths[i + 1], stride=2) for i in range(3))
        self.dec = nn.ModuleList(
            [conv_block(enc[3], dec[0]), conv_block(dec[0] + enc[2], dec[1]), conv_block(dec[1] + enc[1], dec[2])]
        )
        self.flow = nn.Conv3d(dec[2], 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, subject: torch.Tensor, template_t1: torch.Tensor) -> torch.Tensor:
        """(B,1,X,Y,Z) subject and template T1 -> velocity (B, 3, X/2, Y/2, Z/2)."""
        if template_t1.shape[0] != subject.shape[0]:
            template_t1 = template_t1.expand(subject.shape[0], *template_t1.shape[1:])
        e1 = self.down[0](self.enc0(torch.cat([subject, template_t1], dim=1)))
        e2 = self.down[1](e1)
        x = self.dec[0](self.down[2](e2))
        for block, skip in ((self.dec[1], e2), (self.dec[2], e1)):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.flow(x)


def n_params(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
