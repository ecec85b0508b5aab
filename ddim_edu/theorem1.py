"""Theorem 1: for every σ > 0, J_σ = L_γ + C, so one ε-model trained with L_1 serves every σ.

Full sequence, paper time t = 1..T, stored at index i = t-1 (``alphas_cumprod[i] = α_t``, α_0 = 1).

- J_σ (Eq 11) = E[KL(q(x_T|x_0) ‖ N(0, I))] + Σ_{t≥2} E[KL(q_σ(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t))]
  + E[-log p_θ^{(1)}(x_0|x_1)], estimated here on trajectories sampled from the joint q_σ (Eq 6).
- L_γ (Eq 5) = Σ_t γ_t E‖ε_θ(sqrt(α_t) x_0 + sqrt(1-α_t) ε, t) - ε‖², estimated on fresh draws.
- Both KLs share the variance σ_t², so KL = c_t² ‖x_0 - f_θ‖² / (2σ_t²) with
  c_t = sqrt(α_{t-1}) - sqrt(1-α_{t-1}-σ_t²) sqrt(α_t/(1-α_t)), and ‖x_0 - f_θ‖² = (1-α_t)/α_t ‖ε - ε_θ‖²:
  the exact weights are γ_t = c_t²(1-α_t)/(2σ_t² α_t) (t ≥ 2) and γ_1 = (1-α_1)/(2σ_1² α_1). The
  paper's appendix prints γ_t = 1/(2dσ_t² α_t), which is not these weights (see :func:`gamma_printed`).
- C = E[KL(q(x_T|x_0) ‖ N(0, I))] + (d/2) log(2π σ_1²) does not depend on ε_θ.

The η-family of Eq 16 has σ_1 = 0 (because α_0 = 1), where -log p^{(1)} is degenerate and the
theorem does not apply; here σ_1 > 0 is therefore given explicitly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .forward import check_eta, q_sample, q_sigma_reverse_mean, sample_q_sigma_joint, sigma_eta
from .model import Model
from .sampling import predict_x0
from .schedules import Schedule

__all__ = [
    "constant_C",
    "gamma_exact",
    "gamma_printed",
    "gaussian_expectation",
    "isotropic_gaussian_kl",
    "j_sigma_gaussian",
    "j_sigma_samples",
    "l_gamma_gaussian",
    "l_gamma_samples",
    "sigmas_for_eta",
]


def sigmas_for_eta(schedule: Schedule, eta: float, sigma_1: float) -> Tensor:
    """σ_t for t = 1..T (float64 [T]): Eq 16 with parameter η for t ≥ 2, and the given σ_1 > 0."""
    if check_eta(eta) == 0:
        raise ValueError(f"eta must be > 0 for Theorem 1 (it needs σ_t > 0 for every t), got {eta!r}")
    if not sigma_1 > 0:
        raise ValueError(
            f"sigma_1 must be > 0, got {sigma_1!r}: Eq 16 gives σ_1 = 0 (α_0 = 1), where -log p_θ^(1) is "
            "degenerate and Theorem 1 does not hold; pick e.g. sigma_1 = sqrt(β_1)"
        )
    alpha, alpha_prev = schedule.step_alphas(torch.arange(schedule.T))
    sigmas = sigma_eta(alpha, alpha_prev, eta)
    sigmas[0] = sigma_1
    # Eq 7 needs σ_t² <= 1 - α_{t-1} for t >= 2; σ_t(η) = η σ_t(1), so η is bounded by the tightest t.
    eta_max = torch.sqrt((1 - alpha_prev[1:]) / sigma_eta(alpha[1:], alpha_prev[1:], 1.0) ** 2).min().item()
    if eta > eta_max:
        raise ValueError(f"eta={eta!r} makes σ_t² > 1 - α_(t-1) for some t >= 2, where Eq 7 has no real solution; "
                         f"the largest η for this schedule is {eta_max:.6g}")
    return sigmas


def gamma_exact(schedule: Schedule, sigmas: Tensor) -> Tensor:
    """The exact weights γ_t (t = 1..T, float64 [T]) with J_σ = L_γ + C."""
    sigmas = _check_sigmas(schedule, sigmas)
    alpha, alpha_prev = schedule.step_alphas(torch.arange(schedule.T))
    c = alpha_prev.sqrt() - torch.sqrt(1 - alpha_prev - sigmas**2) * torch.sqrt(alpha / (1 - alpha))  # t >= 2 (checked)
    gamma = c**2 * (1 - alpha) / (2 * sigmas**2 * alpha)
    gamma[0] = (1 - alpha[0]) / (2 * sigmas[0] ** 2 * alpha[0])
    return gamma


def gamma_printed(schedule: Schedule, sigmas: Tensor, d: int) -> Tensor:
    """The weights as printed in the paper's appendix (and the review): γ_t = 1/(2 d σ_t² α_t)."""
    sigmas = _check_sigmas(schedule, sigmas)
    return 1.0 / (2 * d * sigmas**2 * schedule.alphas_cumprod)


def constant_C(schedule: Schedule, sigmas: Tensor, d: int, second_moment) -> Tensor:
    """C = E[KL(N(sqrt(α_T) x_0, (1-α_T) I) ‖ N(0, I))] + (d/2) log(2π σ_1²), with E‖x_0‖² = second_moment."""
    sigmas = _check_sigmas(schedule, sigmas)
    a_T = schedule.alphas_cumprod[-1]
    kl_T = 0.5 * (d * (1 - a_T) + a_T * second_moment - d - d * torch.log(1 - a_T))
    return kl_T + 0.5 * d * torch.log(2 * math.pi * sigmas[0] ** 2)


def isotropic_gaussian_kl(mean_q: Tensor, var_q, mean_p: Tensor, var_p) -> Tensor:
    """KL(N(mean_q, var_q I) ‖ N(mean_p, var_p I)) per row of [B, d] means, float64."""
    d = mean_q.shape[-1]
    var_q = torch.as_tensor(var_q, dtype=torch.float64)
    var_p = torch.as_tensor(var_p, dtype=torch.float64)
    sq = ((mean_q - mean_p) ** 2).sum(-1)
    return 0.5 * (d * var_q / var_p + sq / var_p - d + d * torch.log(var_p / var_q))


@torch.no_grad()
def j_sigma_samples(
    model: Model, x0: Tensor, schedule: Schedule, eta: float, sigma_1: float, *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-x_0 Monte-Carlo samples of J_σ (Eq 11) [n], on trajectories drawn from q_σ (Eq 6).

    Each sample is KL_T + Σ_{t≥2} KL_t + (-log p_θ^{(1)}(x_0|x_1)) along one trajectory, with every
    KL computed in closed form given (x_t, x_0). ``x0`` is [n, d] float64.
    """
    _check_x0(x0)
    sigmas = sigmas_for_eta(schedule, eta, sigma_1)
    traj = sample_q_sigma_joint(x0, schedule, torch.arange(schedule.T), eta, generator=generator)  # x_t at t-1
    total = _prior_kl(schedule, x0)
    for t_idx, x_t in _chunks(traj):
        total += _j_step_terms(model, schedule, sigmas, x0.repeat(len(x_t) // len(x0), 1), x_t, t_idx).reshape(-1, len(x0)).sum(0)
    return total


@torch.no_grad()
def l_gamma_samples(
    model: Model, x0: Tensor, schedule: Schedule, gamma: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    """Per-x_0 Monte-Carlo samples of L_γ (Eq 5) [n]: Σ_t γ_t ‖ε_θ(x_t, t) - ε_t‖², a fresh ε_t for every t."""
    _check_x0(x0)
    gamma = _check_gamma(schedule, gamma)
    noise = torch.randn((schedule.T, *x0.shape), generator=generator, dtype=x0.dtype)
    total = torch.zeros(len(x0), dtype=torch.float64)
    for t_idx, eps in _chunks(noise):
        total += _l_terms(model, schedule, gamma, x0.repeat(len(eps) // len(x0), 1), eps, t_idx).reshape(-1, len(x0)).sum(0)
    return total


@torch.no_grad()
def j_sigma_gaussian(model: Model, mean: Tensor, std: float, schedule: Schedule, eta: float, sigma_1: float) -> Tensor:
    """J_σ in closed form for data N(mean, std² I) and an ε-model affine in x (e.g. this data's exact ε).

    Every term is then a quadratic function of standard normals w = (z, ε), x_0 = mean + std·z,
    x_t = sqrt(α_t) x_0 + sqrt(1-α_t) ε (Lemma 1 gives the pair (x_0, x_t) this law under q_σ), and
    the expectation of a quadratic is exact from 4d+1 evaluations (:func:`gaussian_expectation`).
    """
    sigmas = sigmas_for_eta(schedule, eta, sigma_1)

    def terms(w: Tensor) -> Tensor:
        x0, x_t, t_idx = _gaussian_pairs(schedule, mean, std, w)
        per_t = _j_step_terms(model, schedule, sigmas, x0, x_t, t_idx).reshape(schedule.T, len(w)).sum(0)
        return per_t + _prior_kl(schedule, x0[: len(w)])

    return gaussian_expectation(terms, 2 * len(mean))


@torch.no_grad()
def l_gamma_gaussian(model: Model, mean: Tensor, std: float, schedule: Schedule, gamma: Tensor) -> Tensor:
    """L_γ in closed form for data N(mean, std² I) and an ε-model affine in x (see :func:`j_sigma_gaussian`)."""
    gamma = _check_gamma(schedule, gamma)
    d = len(mean)

    def terms(w: Tensor) -> Tensor:
        x0, _, t_idx = _gaussian_pairs(schedule, mean, std, w)
        eps = w[:, d:].repeat(schedule.T, 1)
        return _l_terms(model, schedule, gamma, x0, eps, t_idx).reshape(schedule.T, len(w)).sum(0)

    return gaussian_expectation(terms, 2 * d)


def gaussian_expectation(quadratic, m: int) -> Tensor:
    """E[q(w)] for w ~ N(0, I_m) and q quadratic, exactly: q(0) + ½ Σ_j (q(e_j) + q(-e_j) - 2q(0)).

    ``quadratic`` maps probe points [P, m] to values [P]. (For q(w) = wᵀAw + bᵀw + c, E q = tr A + c,
    and the central second difference along e_j is exactly 2A_jj.)
    """
    eye = torch.eye(m, dtype=torch.float64)
    values = quadratic(torch.cat([torch.zeros(1, m, dtype=torch.float64), eye, -eye]))
    q0, plus, minus = values[0], values[1 : m + 1], values[m + 1 :]
    return q0 + 0.5 * (plus + minus - 2 * q0).sum()


def _gaussian_pairs(schedule: Schedule, mean: Tensor, std: float, w: Tensor):
    """Probe points w = (z, ε) [P, 2d] → x_0, x_t for every t (rows t-major: [T·P, d]) and t indices."""
    d, P, T = len(mean), len(w), schedule.T
    x0 = (mean + std * w[:, :d]).repeat(T, 1)
    t_idx = torch.arange(T).repeat_interleave(P)
    x_t = q_sample(x0, schedule.alphas_cumprod[t_idx], w[:, d:].repeat(T, 1))
    return x0, x_t, t_idx


def _prior_kl(schedule: Schedule, x0: Tensor) -> Tensor:
    """KL(q(x_T|x_0) ‖ N(0, I)) per row: the part of J_σ that no model can change."""
    a_T = schedule.alphas_cumprod[-1]
    return isotropic_gaussian_kl(a_T.sqrt() * x0, 1 - a_T, torch.zeros_like(x0), 1.0)


def _j_step_terms(model: Model, schedule: Schedule, sigmas: Tensor, x0: Tensor, x_t: Tensor, t_idx: Tensor) -> Tensor:
    """Per row: KL(q_σ(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for t ≥ 2, and -log N(x_0; f_θ(x_1), σ_1² I) for t = 1."""
    alpha, alpha_prev = schedule.step_alphas(torch.arange(schedule.T))
    f = predict_x0(x_t, _eps(model, x_t, t_idx), alpha[t_idx])
    out = torch.empty(len(x_t), dtype=torch.float64)
    first = t_idx == 0
    if first.any():  # decoder term, Eq 10 at t = 1
        var = sigmas[0] ** 2
        out[first] = 0.5 * (((x0[first] - f[first]) ** 2).sum(-1) / var + x0.shape[1] * torch.log(2 * math.pi * var))
    rest = ~first
    if rest.any():
        i = t_idx[rest]
        args = (alpha[i], alpha_prev[i], sigmas[i])
        var = sigmas[i] ** 2
        mean_q = q_sigma_reverse_mean(x_t[rest], x0[rest], *args)
        mean_p = q_sigma_reverse_mean(x_t[rest], f[rest], *args)
        out[rest] = isotropic_gaussian_kl(mean_q, var, mean_p, var)
    return out


def _l_terms(model: Model, schedule: Schedule, gamma: Tensor, x0: Tensor, eps: Tensor, t_idx: Tensor) -> Tensor:
    """Per row: γ_t ‖ε_θ(sqrt(α_t) x_0 + sqrt(1-α_t) ε, t) - ε‖²."""
    x_t = q_sample(x0, schedule.alphas_cumprod[t_idx], eps)
    return gamma[t_idx] * ((_eps(model, x_t, t_idx) - eps) ** 2).sum(-1)


def _eps(model: Model, x: Tensor, t_idx: Tensor) -> Tensor:
    return model(x, t_idx.to(torch.float64)).to(torch.float64)


def _chunks(xs: Tensor, chunk: int = 100):
    """Split [T, n, d] into blocks of timesteps, flattened to ([k·n] t indices, [k·n, d] rows)."""
    T, n, d = xs.shape
    for start in range(0, T, chunk):
        block = xs[start : start + chunk]
        yield torch.arange(start, start + len(block)).repeat_interleave(n), block.reshape(-1, d)


def _check_gamma(schedule: Schedule, gamma) -> Tensor:
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    if gamma.shape != (schedule.T,):
        raise ValueError(f"gamma must have shape [T] = [{schedule.T}], got {tuple(gamma.shape)}")
    return gamma


def _check_x0(x0) -> None:
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim != 2 or len(x0) == 0:
        raise ValueError(f"x0 must be a floating-point tensor of data points [n, d] with n >= 1 (float64 for the "
                         f"closed forms), got {getattr(x0, 'dtype', type(x0).__name__)} {tuple(getattr(x0, 'shape', ()))}")


def _check_sigmas(schedule: Schedule, sigmas: Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.shape != (schedule.T,):
        raise ValueError(f"sigmas must have shape [T] = [{schedule.T}], got {tuple(sigmas.shape)}")
    bad = torch.nonzero(sigmas <= 0).flatten()
    if len(bad):
        raise ValueError(
            f"Theorem 1 needs σ_t > 0 for every t; sigmas is <= 0 at t = {(bad + 1).tolist()[:5]} "
            "(paper time; the η-family has σ_1 = 0 since α_0 = 1: use sigmas_for_eta with sigma_1 > 0)"
        )
    _, alpha_prev = schedule.step_alphas(torch.arange(schedule.T))
    over = torch.nonzero(sigmas[1:] ** 2 > (1 - alpha_prev[1:]) * (1 + 1e-12)).flatten()
    if len(over):  # Eq 7 (t >= 2; p_θ^(1) is a Gaussian of its own) needs σ_t² <= 1 - α_(t-1)
        raise ValueError(f"sigmas too large: Eq 7 needs σ_t² <= 1 - α_(t-1), violated at t = {(over + 2).tolist()[:5]} "
                         "(paper time); for the η-family use sigmas_for_eta, which says the largest η")
    return sigmas
