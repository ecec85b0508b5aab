"""The generalised generative process of DDIM (Section 4.1, Eq 9, 10, 12) on a sub-sequence τ.

``timesteps`` is increasing, τ_1 < … < τ_S, in the index convention of
:mod:`ddim_edu.schedules`; sampling starts at τ_S from x_T and goes τ_S → τ_{S-1} → … → τ_1 → x_0,
the last step landing on ᾱ = 1 (the paper's α_0), where Eq 12 returns the x_0 prediction f_θ.
A model is any callable ``model(x, t) -> eps`` with t a float tensor [B] of timestep indices.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .forward import bcast, direction_coefficient, q_sigma_reverse_mean, sigma_eta, sigma_hat
from .schedules import Schedule

Model = Callable[[Tensor, Tensor], Tensor]


def predict_x0(x_t: Tensor, eps: Tensor, alpha) -> Tensor:
    """Eq 9: the denoised observation ``f_θ(x_t) = (x_t - sqrt(1-α_t) ε_θ(x_t)) / sqrt(α_t)``."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    return (x_t - bcast((1 - alpha).sqrt(), x_t) * eps) / bcast(alpha.sqrt(), x_t)


def ddim_step_coefficients(alpha, alpha_prev, sigma) -> tuple[Tensor, Tensor]:
    """Eq 12 written as ``x_{t-1} = a x_t + b ε_θ(x_t) + σ_t z``, in float64.

    Substituting Eq 9 into Eq 12: ``a = sqrt(α_{t-1}/α_t)`` and
    ``b = sqrt(1-α_{t-1}-σ_t²) - sqrt(α_{t-1}(1-α_t)/α_t)``.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    a = torch.sqrt(alpha_prev / alpha)
    b = direction_coefficient(alpha_prev, sigma) - torch.sqrt(alpha_prev * (1 - alpha) / alpha)
    return a, b


def call_model(model: Model, x: Tensor, t: Tensor, timestep: float, *, check_finite: bool = True) -> Tensor:
    """Evaluate ``model(x, t)`` and check that it returned ε of x's shape and dtype, and finite values."""
    eps = model(x, t)
    if not isinstance(eps, Tensor) or eps.shape != x.shape:
        shape = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"model must return ε with the shape of x {tuple(x.shape)}, got {shape} (at timestep {timestep:g})")
    if eps.dtype != x.dtype:
        raise ValueError(f"model must return ε in x's dtype {x.dtype}, got {eps.dtype} (at timestep {timestep:g}); cast the model or x")
    if check_finite and not is_finite(eps):
        raise FloatingPointError(
            f"model returned NaN or inf (at timestep {timestep:g}); check its weights and inputs, or sample in float32/float64"
        )
    return eps


def is_finite(x: Tensor) -> bool:
    """Whether every entry is finite, through their sum: far cheaper than ``isfinite().all()`` (short of overflow)."""
    return math.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).item())


def time_input(t: float, x: Tensor) -> Tensor:
    """The model's time argument: a float tensor [B] filled with timestep t (float64 for float64 x)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)


def check_x(x_T) -> None:
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 2:
        raise ValueError(f"x_T must be a floating-point tensor of shape [B, ...], got {getattr(x_T, 'shape', type(x_T))}")


def run_steps(x_T: Tensor, steps: Iterator[Tensor], return_trajectory: bool = False) -> Tensor:
    """Run a step generator to the end: x_0, or with ``return_trajectory`` the stack [S+1, B, …] from x_T to x_0."""
    if return_trajectory:
        return torch.stack([x_T, *steps])
    x = x_T
    for x in steps:  # noqa: B007 (only the last state is kept)
        pass
    return x


def _step_range(S: int, progress: bool, desc: str):
    """Step indices S-1, …, 0 (sampling runs from τ_S down), with a tqdm bar when asked."""
    steps = range(S - 1, -1, -1)
    return tqdm(steps, desc=desc, leave=False) if progress else steps


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (reproducible)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def ddim_steps(
    model: Model,
    x_T: Tensor,
    schedule: Schedule,
    timesteps,
    eta: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    check_finite: bool = True,
) -> Iterator[Tensor]:
    """Eq 12 with σ = σ(η) of Eq 16; yields x_{τ_{i-1}} after each step, x_0 last.

    η = 0 is DDIM, η = 1 is DDPM's ancestral sampler on τ. Coefficients are computed once in
    float64; a step is then the model call and two fused tensor ops. ``clip_x0=c`` clamps the
    x_0 prediction to [-c, c] before Eq 12 (off by default, as in the paper's Eq 12).
    ``check_finite`` checks ε after every model call, naming the timestep of a NaN; with False
    only x_0 is checked, which saves a reduction per step (see benchmarks/).
    """
    check_x(x_T)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0 is DDIM, 1 is DDPM), got {eta!r}")
    tau = schedule.check_timesteps(timesteps)
    alpha, alpha_prev = schedule.step_alphas(tau)
    sigma = sigma_eta(alpha, alpha_prev, eta)
    a, b = ddim_step_coefficients(alpha, alpha_prev, sigma)
    # Python floats (float64) per step: the loop then launches no schedule arithmetic at all.
    a, b, sigma_f = a.tolist(), b.tolist(), sigma.tolist()
    sqrt_alpha_prev, dir_coef = alpha_prev.sqrt().tolist(), direction_coefficient(alpha_prev, sigma).tolist()
    tau_f = tau.tolist()
    t_in = [time_input(t, x_T) for t in tau_f]
    x = x_T
    for i in _step_range(len(tau), progress, "DDIM"):
        eps = call_model(model, x, t_in[i], tau_f[i], check_finite=check_finite)
        if clip_x0 is None:
            x = torch.mul(x, a[i]).add_(eps, alpha=b[i])  # a new tensor, then in place: x_T is never written
        else:
            # Eq 12 proper, with the clipped prediction: sqrt(α_prev) f + sqrt(1-α_prev-σ²) ε.
            x0 = predict_x0(x, eps, alpha[i]).clamp(-clip_x0, clip_x0)
            x = torch.add(x0 * sqrt_alpha_prev[i], eps, alpha=dir_coef[i])
        if sigma_f[i] > 0:
            x = x.add_(noise_like(x, generator), alpha=sigma_f[i])
        if i == 0 and not check_finite and not is_finite(x):
            raise FloatingPointError("the sampled x_0 has NaN or inf; rerun with check_finite=True to find the timestep")
        yield x


@torch.no_grad()
def sigma_hat_steps(
    model: Model,
    x_T: Tensor,
    schedule: Schedule,
    timesteps,
    *,
    generator: torch.Generator | None = None,
    clip_x0: float | None = 1.0,
    progress: bool = False,
) -> Iterator[Tensor]:
    """The σ̂ row of Table 1 as the paper's reference code realises it; yields like :func:`ddim_steps`.

    Eq 12 with σ̂ can need the square root of a negative number, so the reference code takes
    DDPM's ancestral step on τ instead: the posterior mean of q(x_{τ_{i-1}}|x_{τ_i}, x_0) (Eq 7 with
    σ(η=1)) at the x_0 prediction clipped to [-1, 1], plus noise of std σ̂ = sqrt(1-α_{τ_i}/α_{τ_{i-1}}),
    and no noise on the last step.
    """
    check_x(x_T)
    tau = schedule.check_timesteps(timesteps)
    alpha, alpha_prev = schedule.step_alphas(tau)
    sigma_mean = sigma_eta(alpha, alpha_prev, 1.0)
    noise_std = sigma_hat(alpha, alpha_prev)
    x = x_T
    for i in _step_range(len(tau), progress, "DDPM σ̂"):
        eps = call_model(model, x, time_input(tau[i], x), tau[i].item())
        x0 = predict_x0(x, eps, alpha[i])
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = q_sigma_reverse_mean(x, x0, alpha[i], alpha_prev[i], sigma_mean[i])
        if i > 0:
            x = x.add_(noise_like(x, generator), alpha=noise_std[i].item())
        yield x
