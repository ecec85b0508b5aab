"""Sampling entry point: ``sample(model, x_T, schedule, timesteps, method=...)``.

Every method integrates from the largest timestep τ_S (where ``x_T`` is fed in) down to ᾱ = 1
and returns x_0. ``METHODS`` maps each name to its step generator, which yields the state
after every step (x_0 last), so notebooks can also watch a trajectory.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampling import Model, ddim_steps, sigma_hat_steps
from .schedules import Schedule

METHODS = {
    "ddim": ddim_steps,  # Eq 12 with σ(η) of Eq 16: η = 0 DDIM, η = 1 DDPM
    "sigma_hat": sigma_hat_steps,  # Table 1's σ̂ row, as the reference code realises it
}


def sample(
    model: Model,
    x_T: Tensor,
    schedule: Schedule,
    timesteps,
    method: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    return_trajectory: bool = False,
    **options,
) -> Tensor:
    """Sample x_0 from ``x_T`` along the increasing timesteps τ_1 < … < τ_S with ``method``.

    ``eta`` is DDIM's η (Eq 16; only for ``"ddim"``). ``options`` go to the method's step
    generator (e.g. ``clip_x0``, ``progress``). With ``return_trajectory=True`` the result is the
    stack [S+1, B, …] of x_{τ_S} = x_T, x_{τ_{S-1}}, …, x_0 instead of x_0 alone.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if method == "ddim":
        steps = METHODS[method](model, x_T, schedule, timesteps, eta, generator=generator, **options)
    else:
        if eta != 0.0:
            raise ValueError(f"eta applies to method 'ddim' only; method {method!r} got eta={eta!r}")
        steps = METHODS[method](model, x_T, schedule, timesteps, generator=generator, **options)
    if return_trajectory:
        return torch.stack([x_T, *steps])
    x = x_T
    for x in steps:
        pass
    return x
