"""Small ε-networks for low-dimensional data, following the model contract ``model(x, t) -> ε``.

``x`` is [B, d] and ``t`` a float tensor [B] of timestep indices in [0, T-1] (see
:mod:`ddim_edu.schedules`); the output has x's shape. References: the time embedding is the
sinusoidal position encoding of Vaswani et al. (2017) as used by DDPM (Ho et al. 2020).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..model import batch_times

__all__ = ["MLPEps", "sinusoidal_embedding"]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style embedding of float timesteps: ``[cos(t ω_k), sin(t ω_k)]``, ``ω_k = max_period^(-k/half)``.

    ``k = 0..half-1`` with ``half = dim // 2``, so the frequencies run geometrically from 1 down to
    about ``1/max_period``; an odd ``dim`` gets a trailing zero column. ``t`` is [B] (or a scalar,
    treated as [1]); the angles are computed in float64 and the result is [B, dim] in t's dtype
    when t is floating, else float32.
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2:
        raise ValueError(f"dim (embedding width) must be an int >= 2, got {dim!r}")
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of timesteps [B], got shape {tuple(t.shape)}")
    out_dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * omega[None, :]  # [B, half]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(out_dtype)


class MLPEps(nn.Module):
    """An MLP ε-network for points in R^d: ``ε_θ(x, t)``.

    The input layer maps x to ``hidden`` features; each of ``n_blocks`` residual blocks adds a
    projection of the time embedding and applies ``h ← h + W₂ SiLU(W₁ SiLU(h + P e(t)))``; a last
    linear layer maps back to d. The output layer starts at zero, so the untrained network predicts
    ε = 0 (loss E‖ε‖² = d). The forward pass runs in the dtype of the parameters (call ``.double()``
    for float64); x is cast to it and the output back to x's dtype.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, n_blocks: int = 3, emb_dim: int = 64):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("hidden", hidden, 1), ("n_blocks", n_blocks, 0), ("emb_dim", emb_dim, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.dim = dim
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_blocks))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(n_blocks)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε_θ(x, t) for x [B, d] and timesteps t [B] (a scalar t is used for the whole batch)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        dtype = self.inp.weight.dtype
        t = batch_times(t, x)
        temb = self.time_mlp(sinusoidal_embedding(t.to(torch.float64), self.emb_dim).to(dtype))
        h = self.inp(x.to(dtype))
        for proj, block in zip(self.time_proj, self.blocks):
            h = h + block(h + proj(temb))
        return self.out(h).to(x.dtype)
