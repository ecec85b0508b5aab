"""Interpolation between latents x_T (the paper's Section 5.3 and Appendix D.5)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["slerp"]


def slerp(x0: Tensor, x1: Tensor, weight) -> Tensor:
    """Spherical linear interpolation, ``sin((1-w)θ)/sin θ · x0 + sin(wθ)/sin θ · x1`` per sample.

    θ is the angle between the flattened x0[b] and x1[b]; ``weight`` w ∈ [0, 1] is a float or a
    tensor [K], which gives a result [K, B, …]. High-dimensional Gaussian latents are nearly
    orthogonal with norm ≈ sqrt(d), and slerp keeps the norm there, where linear interpolation
    would shrink it by up to 1/sqrt(2).
    """
    for name, x in (("x0", x0), ("x1", x1)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
            raise ValueError(f"{name} must be a floating-point batch of latents [B, ...], got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    w = torch.as_tensor(weight, dtype=torch.float64)
    if bool(((w < 0) | (w > 1) | torch.isnan(w)).any()):
        raise ValueError(f"weight must lie in [0, 1], got {w.tolist()}")
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError("x0 and x1 must be nonzero in every sample: slerp's angle is undefined for a zero latent")
    theta = torch.arccos(((a * b).sum(1) / norms).clamp(-1, 1))  # [B]
    if bool((theta > math.pi - 1e-6).any()):
        raise ValueError("x0 and x1 point in opposite directions in some sample: no unique great circle joins "
                         "them; interpolate via a third latent")
    shape = (-1, *([1] * x0.ndim)) if w.ndim == 1 else (1,) * x0.ndim
    wt = w.reshape(shape) if w.ndim == 1 else w
    th = theta.reshape(x0.shape[0], *([1] * (x0.ndim - 1)))
    sin = torch.sin(th)
    parallel = sin < 1e-6  # the limit θ → 0 of slerp is linear interpolation
    sin = torch.where(parallel, torch.ones_like(sin), sin)
    c0 = torch.where(parallel, 1 - wt, torch.sin((1 - wt) * th) / sin)
    c1 = torch.where(parallel, wt, torch.sin(wt * th) / sin)
    return (c0 * x0.double() + c1 * x1.double()).to(x0.dtype)
