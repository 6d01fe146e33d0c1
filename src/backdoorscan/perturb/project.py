"""Norms and projections onto the L2 / L-inf ball, one radius per perturbation in the batch."""

from __future__ import annotations

import torch

from ..core.choices import Norm, check_choice


def norm_of(v: torch.Tensor, p: Norm) -> torch.Tensor:
    """Per-item norm of a (B, ...) batch."""
    flat = v.flatten(1)
    return flat.norm(dim=1) if p == "l2" else flat.abs().amax(dim=1)


def project(v: torch.Tensor, radius: float, p: Norm) -> torch.Tensor:
    """Nearest point of each item's ball ||v||_p <= radius (a rescale for L2, a clamp for L-inf)."""
    if p == "l2":
        scale = (radius / norm_of(v, "l2").clamp_min(1e-12)).clamp(max=1.0)
        return v * scale.view(-1, *([1] * (v.ndim - 1)))
    check_choice("norm", p, Norm)
    return v.clamp(-radius, radius)
