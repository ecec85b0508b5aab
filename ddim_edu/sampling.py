"""The generalised generative process of DDIM (Section 4.1, Eq 9, 10, 12) on a sub-sequence τ.

``timesteps`` is increasing, τ_1 < … < τ_S, in the index convention of
:mod:`ddim_edu.schedules`; sampling starts at τ_S from x_T and goes τ_S → τ_{S-1} → … → τ_1 → x_0,
the last step landing on ᾱ = 1 (the paper's α_0), where Eq 12 returns the x_0 prediction f_θ.
A model follows the contract of :mod:`ddim_edu.model`: ``model(x, t) -> ε`` with t a float tensor
[B] of timestep indices.

Each sampler is written once, as a *request generator*: it yields ``(x, t)`` when it needs
ε_θ(x, t), receives ε back, and returns x_0. :func:`ddim_steps` and :func:`sigma_hat_steps` drive
one with the model and yield the states; a diffusers-style scheduler
(:class:`ddim_edu.interop.DiffusersScheduler`) drives the same generator with the outputs a
pipeline hands it.
"""
from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .forward import bcast, check_eta, direction_coefficient, q_sigma_reverse_mean, sigma_eta, sigma_hat
from .model import Model, call_model, time_inputs
from .schedules import Schedule

__all__ = [
    "Requests",
    "check_x",
    "ddim_requests",
    "ddim_step_coefficients",
    "ddim_steps",
    "drive",
    "noise_like",
    "predict_x0",
    "run_steps",
    "sigma_hat_requests",
    "sigma_hat_steps",
]

Requests = Generator[tuple[Tensor, float], Tensor, Tensor]  # yields (x, t), receives ε_θ(x, t), returns x_0


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


def check_x(x_T, name: str = "x_T") -> None:
    """Refuse anything but a floating-point batch [B, ...]."""
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 2:
        raise ValueError(f"{name} must be a floating-point tensor of shape [B, ...], got {getattr(x_T, 'shape', type(x_T))}")


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (reproducible)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def run_steps(x_T: Tensor, steps: Iterator[Tensor], return_trajectory: bool = False) -> Tensor:
    """Run a step generator to the end: x_0, or with ``return_trajectory`` the stack [S+1, B, …] from x_T to x_0."""
    if return_trajectory:
        return torch.stack([x_T, *steps])
    x = x_T
    for x in steps:  # noqa: B007 (only the last state is kept)
        pass
    return x


def drive(model: Model, requests: Requests, times: Sequence[float], *, check_finite: bool = True,
          progress: tqdm | None = None) -> Iterator[Tensor]:
    """Answer a request generator's requests with ``model``; yield the state after each step, x_0 last.

    ``times`` are the timesteps the generator will ask for (their time inputs are made at once);
    ``check_finite`` checks every ε (one host synchronisation each) and names the timestep of a NaN.
    """
    inputs: dict[float, Tensor] | None = None
    try:
        x, t = next(requests)
        inputs = time_inputs(times, x)
        while True:
            eps = call_model(model, x, inputs[t], t, check_finite=check_finite)
            x, t = requests.send(eps)
            if progress is not None:
                progress.update()
            yield x
    except StopIteration as done:
        if progress is not None:
            progress.update()
            progress.close()
        yield done.value


def ddim_requests(x_T: Tensor, schedule: Schedule, timesteps, eta: float = 0.0, *,
                  generator: torch.Generator | None = None, clip_x0: float | None = None) -> Requests:
    """Eq 12 with σ = σ(η) of Eq 16 as a request generator (see the module docstring).

    Coefficients are computed once in float64; a step is then two fused tensor ops on the model's
    ε. ``clip_x0=c`` clamps the x_0 prediction to [-c, c] before Eq 12 (off by default, as in the
    paper's Eq 12).
    """
    check_x(x_T)
    check_eta(eta)
    tau = schedule.check_timesteps(timesteps)
    alpha, alpha_prev = schedule.step_alphas(tau)
    sigma = sigma_eta(alpha, alpha_prev, eta)
    a, b = ddim_step_coefficients(alpha, alpha_prev, sigma)
    # Python floats (float64) per step: the loop then launches no schedule arithmetic at all.
    a, b, sigma_f = a.tolist(), b.tolist(), sigma.tolist()
    sqrt_alpha_prev, dir_coef = alpha_prev.sqrt().tolist(), direction_coefficient(alpha_prev, sigma).tolist()
    tau_f = tau.tolist()
    x = x_T
    for i in range(len(tau_f) - 1, -1, -1):  # sampling runs from τ_S down
        eps = yield x, tau_f[i]
        if clip_x0 is None:
            x = torch.mul(x, a[i]).add_(eps, alpha=b[i])  # Eq 12 (Eq 9 substituted): a new tensor, then in place
        else:
            # Eq 12 proper, with the clipped prediction: sqrt(α_prev) f_θ + sqrt(1-α_prev-σ²) ε_θ.
            x0 = predict_x0(x, eps, alpha[i]).clamp(-clip_x0, clip_x0)
            x = torch.add(x0 * sqrt_alpha_prev[i], eps, alpha=dir_coef[i])
        if sigma_f[i] > 0:
            x = x.add_(noise_like(x, generator), alpha=sigma_f[i])  # + σ_t z
    return x


def sigma_hat_requests(x_T: Tensor, schedule: Schedule, timesteps, *, generator: torch.Generator | None = None,
                       clip_x0: float | None = 1.0) -> Requests:
    """The σ̂ row of Table 1 as the paper's reference code realises it, as a request generator.

    Eq 12 with σ̂ can need the square root of a negative number, so the reference code takes
    DDPM's ancestral step on τ instead: the posterior mean of q(x_{τ_{i-1}}|x_{τ_i}, x_0) (Eq 7 with
    σ(η=1)) at the x_0 prediction clipped to [-1, 1], plus noise of std σ̂ = sqrt(1-α_{τ_i}/α_{τ_{i-1}}),
    and no noise on the last step.
    """
    check_x(x_T)
    tau = schedule.check_timesteps(timesteps)
    alpha, alpha_prev = schedule.step_alphas(tau)
    sigma_mean = sigma_eta(alpha, alpha_prev, 1.0)
    noise_std = sigma_hat(alpha, alpha_prev).tolist()
    x = x_T
    for i in range(len(tau) - 1, -1, -1):
        eps = yield x, tau[i].item()
        x0 = predict_x0(x, eps, alpha[i])
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = q_sigma_reverse_mean(x, x0, alpha[i], alpha_prev[i], sigma_mean[i])
        if i > 0:
            x = x.add_(noise_like(x, generator), alpha=noise_std[i])
    return x


def _bar(S: int, progress: bool, desc: str) -> tqdm | None:
    return tqdm(total=S, desc=desc, leave=False) if progress else None


@torch.no_grad()
def ddim_steps(model: Model, x_T: Tensor, schedule: Schedule, timesteps, eta: float = 0.0, *,
               generator: torch.Generator | None = None, clip_x0: float | None = None, progress: bool = False,
               check_finite: bool = True) -> Iterator[Tensor]:
    """Eq 12 with σ = σ(η) of Eq 16 (:func:`ddim_requests`); yields x_{τ_{i-1}} after each step, x_0 last.

    η = 0 is DDIM, η = 1 is DDPM's ancestral sampler on τ. ``check_finite`` checks ε after every
    model call and names the timestep of a NaN (:func:`ddim_edu.solvers.sample` runs without it and
    checks its result instead).
    """
    tau = schedule.check_timesteps(timesteps)
    requests = ddim_requests(x_T, schedule, tau, eta, generator=generator, clip_x0=clip_x0)
    yield from drive(model, requests, tau.flip(0).tolist(), check_finite=check_finite, progress=_bar(len(tau), progress, "DDIM"))


@torch.no_grad()
def sigma_hat_steps(model: Model, x_T: Tensor, schedule: Schedule, timesteps, *, generator: torch.Generator | None = None,
                    clip_x0: float | None = 1.0, progress: bool = False, check_finite: bool = True) -> Iterator[Tensor]:
    """The σ̂ sampler (:func:`sigma_hat_requests`); yields like :func:`ddim_steps`."""
    tau = schedule.check_timesteps(timesteps)
    requests = sigma_hat_requests(x_T, schedule, tau, generator=generator, clip_x0=clip_x0)
    yield from drive(model, requests, tau.flip(0).tolist(), check_finite=check_finite,
                     progress=_bar(len(tau), progress, "DDPM σ̂"))
