"""The forward processes: DDPM's marginal q(x_t|x_0) and DDIM's non-Markovian q_σ (Section 3.1).

All functions take ᾱ values (the paper's α, see :mod:`ddim_edu.schedules`) rather than a
schedule, so they read as the equations. ``alpha`` is ᾱ at the current timestep τ_i and
``alpha_prev`` is ᾱ at the previous one τ_{i-1} (1 for the step into x_0). ``sigma`` is the
noise std σ_t of Eq 7 — not the ODE variable of Eq 14. ᾱ arguments are floats or tensors of
shape [] or [B]; a [B] tensor is broadcast over the trailing dimensions of ``x``.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = [
    "check_eta",
    "direction_coefficient",
    "q_sample",
    "q_sigma_forward_step",
    "q_sigma_marginal_moments",
    "q_sigma_reverse_mean",
    "sample_q_sigma_joint",
    "sigma_eta",
    "sigma_hat",
]


def bcast(a, x: Tensor) -> Tensor:
    """Put a scalar or [B] coefficient into x's dtype and device, shaped [B, 1, …] to broadcast."""
    a = torch.as_tensor(a, dtype=torch.float64)
    if a.ndim == 1:
        a = a.reshape(-1, *([1] * (x.ndim - 1)))
    return a.to(device=x.device, dtype=x.dtype)


def q_sample(x0: Tensor, alpha, noise: Tensor) -> Tensor:
    """Eq 4: ``x_t = sqrt(α_t) x_0 + sqrt(1-α_t) ε``, a draw from q(x_t|x_0) = N(sqrt(α_t) x_0, (1-α_t) I)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    return bcast(alpha.sqrt(), x0) * x0 + bcast((1 - alpha).sqrt(), x0) * noise


def check_eta(eta) -> float:
    """η of Eq 16 as a float, or ValueError: a finite real number >= 0 (0 is DDIM, 1 is DDPM)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (0 is DDIM, 1 is DDPM), got {eta!r}")
    return float(eta)


def sigma_eta(alpha, alpha_prev, eta: float) -> Tensor:
    """Eq 16: ``σ_{τ_i}(η) = η sqrt((1-α_{τ_{i-1}})/(1-α_{τ_i})) sqrt(1-α_{τ_i}/α_{τ_{i-1}})``.

    η = 1 gives DDPM's posterior std (the Markovian forward process), η = 0 gives DDIM.
    """
    eta = check_eta(eta)
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    return eta * torch.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))


def sigma_hat(alpha, alpha_prev) -> Tensor:
    """The paper's σ̂ (Table 1, last row): ``σ̂_{τ_i} = sqrt(1 - α_{τ_i}/α_{τ_{i-1}})``, DDPM's sqrt(β) on τ."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    return torch.sqrt(1 - alpha / alpha_prev)


def direction_coefficient(alpha_prev, sigma) -> Tensor:
    """``sqrt(1 - α_{t-1} - σ_t²)``, the weight of the "direction pointing to x_t" in Eq 7/12.

    Raises when σ_t² > 1 - α_{t-1}, where Eq 7 has no real solution (e.g. σ̂ at small t).
    """
    alpha_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    rest = 1 - alpha_prev - sigma**2
    if bool((rest < -1e-12).any()):
        raise ValueError(
            "sigma is too large: Eq 7 needs sigma_t^2 <= 1 - alpha_{t-1}; "
            "use sigma_eta with 0 <= eta <= 1, or the σ̂ sampler for larger noise"
        )
    return torch.sqrt(rest.clamp(min=0))


def q_sigma_reverse_mean(x_t: Tensor, x0: Tensor, alpha, alpha_prev, sigma) -> Tensor:
    """Mean of Eq 7, ``q_σ(x_{t-1}|x_t, x_0)``: ``sqrt(α_{t-1}) x_0 + sqrt(1-α_{t-1}-σ_t²)(x_t - sqrt(α_t) x_0)/sqrt(1-α_t)``.

    Its covariance is ``σ_t² I``.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    eps_implied = (x_t - bcast(alpha.sqrt(), x_t) * x0) / bcast((1 - alpha).sqrt(), x_t)
    return bcast(alpha_prev.sqrt(), x_t) * x0 + bcast(direction_coefficient(alpha_prev, sigma), x_t) * eps_implied


def q_sigma_forward_step(x_prev: Tensor, x0: Tensor, alpha, alpha_prev, sigma) -> tuple[Tensor, Tensor]:
    """Bayes' rule on Eq 6/7: mean and variance of ``q_σ(x_t | x_{t-1}, x_0)``.

    ``q_σ(x_t|x_{t-1},x_0) = q_σ(x_{t-1}|x_t,x_0) q_σ(x_t|x_0) / q_σ(x_{t-1}|x_0)``. Given x_0 the pair
    (x_t, x_{t-1}) is jointly Gaussian with Cov = k (1-α_t), k = sqrt(1-α_{t-1}-σ_t²)/sqrt(1-α_t), so
    the mean is ``sqrt(α_t) x_0 + k(1-α_t)/(1-α_{t-1}) (x_{t-1} - sqrt(α_{t-1}) x_0)`` and the variance
    ``(1-α_t)(1 - k²(1-α_t)/(1-α_{t-1}))``. The mean depends on x_0 (unless σ_t is DDPM's, η = 1):
    that is what makes the process non-Markovian. Returns (mean, variance).
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    k = direction_coefficient(alpha_prev, sigma) / (1 - alpha).sqrt()
    gain = k * (1 - alpha) / (1 - alpha_prev)
    mean = bcast(alpha.sqrt(), x0) * x0 + bcast(gain, x0) * (x_prev - bcast(alpha_prev.sqrt(), x0) * x0)
    variance = (1 - alpha) * (1 - k * gain)
    return mean, variance


def sample_q_sigma_joint(
    x0: Tensor, schedule: Schedule, timesteps, eta: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Ancestral sampling of Eq 6 on a sub-sequence τ: ``x_{τ_S} ~ q(x_{τ_S}|x_0)``, then Eq 7 downwards.

    Returns a tensor [S, B, …] with entry i-1 the sample at τ_i (increasing τ, like ``timesteps``).
    Each ``x_{τ_i}`` is marginally N(sqrt(α_{τ_i}) x_0, (1-α_{τ_i}) I) for every η (Lemma 1).
    """
    tau = schedule.check_timesteps(timesteps)
    alpha = schedule.alpha_bar(tau)
    sigmas = sigma_eta(alpha[1:], alpha[:-1], eta)

    def noise():
        return torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)

    xs = [q_sample(x0, alpha[-1], noise())]
    for i in range(len(tau) - 1, 0, -1):
        mean = q_sigma_reverse_mean(xs[-1], x0, alpha[i], alpha[i - 1], sigmas[i - 1])
        xs.append(mean + float(sigmas[i - 1]) * noise())
    return torch.stack(xs[::-1])


def q_sigma_marginal_moments(schedule: Schedule, timesteps, eta: float) -> tuple[Tensor, Tensor]:
    """Exact moments of x_{τ_i} | x_0 under the joint of Eq 6, by propagating Eq 7 from τ_S down.

    Given x_0, x_{τ_i} = m_i x_0 + noise with variance v_i; Eq 7 maps
    ``m ← sqrt(α_prev) + k (m - sqrt(α))``, ``v ← k² v + σ²`` with k = sqrt(1-α_prev-σ²)/sqrt(1-α).
    Returns (m, v), float64 [S], ordered like ``timesteps``. Lemma 1 says m = sqrt(α), v = 1-α.
    """
    tau = schedule.check_timesteps(timesteps)
    alpha = schedule.alpha_bar(tau)
    sigmas = sigma_eta(alpha[1:], alpha[:-1], eta)
    m = [alpha[-1].sqrt()]
    v = [1 - alpha[-1]]
    for i in range(len(tau) - 1, 0, -1):
        k = direction_coefficient(alpha[i - 1], sigmas[i - 1]) / (1 - alpha[i]).sqrt()
        m.append(alpha[i - 1].sqrt() + k * (m[-1] - alpha[i].sqrt()))
        v.append(k**2 * v[-1] + sigmas[i - 1] ** 2)
    return torch.stack(m[::-1]), torch.stack(v[::-1])
