"""Graders for the notebooks' exercises: a student writes the key step, the library says whether it is right.

Each ``check_*`` takes the student's function, runs it on seeded float64 inputs beside the
library's own implementation of the same equation, and returns a :class:`Verdict`: right or not
yet, the largest difference measured, and a hint aimed at the usual mistake. A Verdict prints as
one line in a notebook and is truthy when the answer is right, so a solution can
``assert check_...(answer)``.

Symbols as in the paper and :mod:`ddim_edu.forward`: ``alpha`` is α_t (the cumulative product,
DDPM's ᾱ_t), ``alpha_prev`` is α_{t-1}, ``sigma`` the noise std σ_t of Eq 7; for Eq 14 ``s`` is the
ODE variable σ = sqrt((1-α)/α) and ``x_bar`` = x/sqrt(α).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .forward import q_sample, q_sigma_reverse_mean, sigma_eta
from .mixture import GaussianMixture
from .sampling import ddim_step_coefficients, predict_x0
from .schedules import linear_schedule
from .solvers import integrate, sample
from .theorem1 import gamma_exact, sigmas_for_eta

__all__ = [
    "Verdict",
    "check_c_t",
    "check_ddpm_weight",
    "check_eq12_step",
    "check_heun_sigma",
    "check_q_sample",
    "check_reverse_mean",
    "check_sigma_eta",
    "check_single_point_eps",
]

TOLERANCE = 1e-10  # relative, in float64: a right answer differs from the library's by rounding only


@dataclass(frozen=True)
class Verdict:
    """The outcome of one exercise: whether it is right, what was measured, and a hint when it is not."""

    exercise: str
    right: bool
    measured: str
    hint: str = ""

    def __bool__(self) -> bool:
        return self.right

    def __str__(self) -> str:
        if self.right:
            return f"✔ {self.exercise}: right ({self.measured})."
        return f"✘ {self.exercise}: not yet ({self.measured}). Hint: {self.hint}"

    __repr__ = __str__


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _alphas(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n pairs (α_t, α_{t-1}) of DDPM's linear schedule at random t in 2..T (float64 [n] each)."""
    schedule = linear_schedule()
    t = torch.randint(1, schedule.T, (n,), generator=_generator(seed))
    return schedule.alphas_cumprod[t], schedule.alphas_cumprod[t - 1]


def _ring_field(ring: GaussianMixture) -> Callable:
    """Eq 14's exact field of a mixture as ``eps(x_bar, s)`` (:meth:`GaussianMixture.probability_flow`, whose
    arguments come the other way round, as torchdiffeq's)."""
    flow = ring.probability_flow()
    return lambda x_bar, s: flow(torch.as_tensor(s, dtype=torch.float64), x_bar)


def _compare(exercise: str, answer_of: Callable[[], object], expected: Tensor, hint: str,
             mistakes: dict[str, Tensor] | None = None) -> Verdict:
    """Run the student's function and compare its result with ``expected`` (relative max difference)."""
    try:
        got = answer_of()
    except NotImplementedError:
        return Verdict(exercise, False, "the function still raises NotImplementedError", hint)
    except Exception as err:  # a student's error is reported, not raised: the notebook goes on
        return Verdict(exercise, False, f"it raised {type(err).__name__}: {err}", hint)
    got = torch.as_tensor(got, dtype=torch.float64)
    if got.shape != expected.shape:
        return Verdict(exercise, False, f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}",
                       "return one value per input element, with the inputs' shape (broadcast the coefficients)")
    if not torch.isfinite(got).all():
        return Verdict(exercise, False, "the result holds NaN or inf", hint)
    scale = expected.abs().max().clamp_min(1e-300)
    error = float((got - expected).abs().max() / scale)
    if error <= TOLERANCE:
        return Verdict(exercise, True, f"max relative difference to the library {error:.1e} ≤ {TOLERANCE:.0e}")
    for mistake, wrong in (mistakes or {}).items():
        if float((got - wrong).abs().max() / scale) <= TOLERANCE:
            return Verdict(exercise, False, f"max relative difference {error:.1e}", mistake)
    return Verdict(exercise, False, f"max relative difference to the library {error:.1e} > {TOLERANCE:.0e}", hint)


# --- notebook 01: the forward processes ---------------------------------------------------------


def check_q_sample(fn: Callable) -> Verdict:
    """Eq 4: ``fn(x0, alpha, noise)`` must return x_t = sqrt(α_t) x_0 + sqrt(1-α_t) ε (α_t a [B] tensor)."""
    g = _generator(1)
    x0, noise = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    alpha, _ = _alphas(16, 1)
    a = alpha[:, None]
    return _compare("Eq 4, a draw of q(x_t | x_0)", lambda: fn(x0, alpha, noise), q_sample(x0, alpha, noise),
                    "x_t = sqrt(α_t)·x_0 + sqrt(1 − α_t)·ε; α_t has shape [B]: use alpha[:, None] against [B, d]",
                    {"α_t and 1 − α_t are variances: the coefficients are their square roots": a * x0 + (1 - a) * noise})


def check_reverse_mean(fn: Callable) -> Verdict:
    """Eq 7's mean: ``fn(x_t, x0, alpha, alpha_prev, sigma)`` (floats for the coefficients)."""
    g = _generator(2)
    x_t, x0 = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    alpha, alpha_prev = (float(a[0]) for a in _alphas(1, 2))
    sigma = 0.5 * float(sigma_eta(alpha, alpha_prev, 1.0))
    eps = (x_t - math.sqrt(alpha) * x0) / math.sqrt(1 - alpha)
    return _compare("Eq 7, the mean of q_σ(x_{t−1} | x_t, x_0)", lambda: fn(x_t, x0, alpha, alpha_prev, sigma),
                    q_sigma_reverse_mean(x_t, x0, alpha, alpha_prev, sigma),
                    "sqrt(α_{t−1})·x_0 + sqrt(1 − α_{t−1} − σ_t²)·(x_t − sqrt(α_t)·x_0)/sqrt(1 − α_t)",
                    {"the direction's weight is sqrt(1 − α_{t−1} − σ_t²): σ_t enters squared":
                     math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev - sigma) * eps,
                     "the direction term points from x_0 to x_t: it is (x_t − sqrt(α_t)·x_0)/sqrt(1 − α_t), "
                     "not x_t/sqrt(1 − α_t)": math.sqrt(alpha_prev) * x0
                     + math.sqrt(1 - alpha_prev - sigma**2) * x_t / math.sqrt(1 - alpha)})


def check_sigma_eta(fn: Callable) -> Verdict:
    """Eq 16: ``fn(alpha, alpha_prev, eta)`` must return σ_t(η) for [B] tensors of α_t, α_{t-1}."""
    alpha, alpha_prev = _alphas(32, 3)
    eta = 0.7
    beta = 1 - alpha / alpha_prev
    return _compare("Eq 16, σ_t(η)", lambda: fn(alpha, alpha_prev, eta), sigma_eta(alpha, alpha_prev, eta),
                    "η · sqrt((1 − α_{t−1})/(1 − α_t)) · sqrt(1 − α_t/α_{t−1})",
                    {"the second factor is sqrt(1 − α_t/α_{t−1}), DDPM's sqrt(β_t) on the sub-sequence, "
                     "not sqrt(1 − α_t)": eta * torch.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha)),
                     "η multiplies the standard deviation, not the variance": eta**0.5 * torch.sqrt(
                         (1 - alpha_prev) / (1 - alpha) * beta)})


# --- notebook 02: Theorem 1 ---------------------------------------------------------------------


def check_c_t(fn: Callable) -> Verdict:
    """Theorem 1's c_t: ``fn(alpha, alpha_prev, sigma)`` with μ(x_t, x_0) − μ(x_t, f_θ) = c_t (x_0 − f_θ)."""
    alpha, alpha_prev = _alphas(32, 4)
    sigma = sigma_eta(alpha, alpha_prev, 0.8)
    expected = alpha_prev.sqrt() - torch.sqrt(1 - alpha_prev - sigma**2) * torch.sqrt(alpha / (1 - alpha))
    return _compare("Theorem 1, c_t", lambda: fn(alpha, alpha_prev, sigma), expected,
                    "write Eq 7's mean as a·x_0 + b·x_t and read off the coefficient of x_0: "
                    "sqrt(α_{t−1}) − sqrt(1 − α_{t−1} − σ_t²)·sqrt(α_t)/sqrt(1 − α_t)",
                    {"x_0 appears twice in Eq 7's mean: also inside the direction term, with weight "
                     "−sqrt(1 − α_{t−1} − σ_t²)·sqrt(α_t)/sqrt(1 − α_t)": alpha_prev.sqrt()})


def check_ddpm_weight(fn: Callable) -> Verdict:
    """For η = 1: ``fn(beta, alpha, sigma)`` ([T−1] tensors for t = 2..T) must return Theorem 1's exact γ_t,
    which reduces to DDPM's β_t² / (2 σ_t² (1 − β_t)(1 − α_t))."""
    schedule = linear_schedule()
    sigmas = sigmas_for_eta(schedule, 1.0, sigma_1=float(schedule.betas[0].sqrt()))
    expected = gamma_exact(schedule, sigmas)[1:]
    beta, alpha = schedule.betas[1:].double(), schedule.alphas_cumprod[1:]
    return _compare("Theorem 1 at η = 1, DDPM's weight γ_t", lambda: fn(beta, alpha, sigmas[1:]), expected,
                    "with σ_t² = β_t(1 − α_{t−1})/(1 − α_t), c_t = sqrt(α_{t−1})·β_t/(1 − α_t); put it into "
                    "γ_t = c_t²(1 − α_t)/(2σ_t² α_t) and use α_t = α_{t−1}(1 − β_t)",
                    {"γ_t = 1/(2dσ_t²α_t) is the weight as the appendix prints it, not the exact one":
                     1 / (2 * sigmas[1:] ** 2 * alpha)})


# --- notebook 03: sampling ----------------------------------------------------------------------


def check_eq12_step(fn: Callable) -> Verdict:
    """Eq 12: ``fn(x_t, eps, alpha, alpha_prev, sigma, z)`` must return x_{t−1} (floats for the coefficients)."""
    g = _generator(5)
    x_t, eps, z = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3))
    alpha, alpha_prev = (float(a[0]) for a in _alphas(1, 5))
    sigma = float(sigma_eta(alpha, alpha_prev, 0.6))
    a, b = ddim_step_coefficients(alpha, alpha_prev, sigma)
    x0_hat = predict_x0(x_t, eps, alpha)
    return _compare("Eq 12, one step", lambda: fn(x_t, eps, alpha, alpha_prev, sigma, z), a * x_t + b * eps + sigma * z,
                    "x_{t−1} = sqrt(α_{t−1})·f_θ + sqrt(1 − α_{t−1} − σ_t²)·ε_θ + σ_t·z with "
                    "f_θ = (x_t − sqrt(1 − α_t)·ε_θ)/sqrt(α_t) (Eq 9)",
                    {"the noise term is missing: add σ_t·z": a * x_t + b * eps,
                     "the direction's weight is sqrt(1 − α_{t−1} − σ_t²), not sqrt(1 − α_{t−1})":
                     math.sqrt(alpha_prev) * x0_hat + math.sqrt(1 - alpha_prev) * eps + sigma * z})


def check_single_point_eps(fn: Callable) -> Verdict:
    """``fn(x, alpha, x0)``: the exact ε for data that is the single point x0 [d] (x [B, d], alpha [B]).

    Then q(x_0) is a point mass, ε = (x − sqrt(α) x0)/sqrt(1 − α) exactly, and DDIM (η = 0) keeps every
    sample on the line x_t = sqrt(α_t) x0 + sqrt(1 − α_t) ε_T: the checker runs DDIM with the student's ε
    and reports how far the trajectory leaves that line.
    """
    exercise = "the η = 0 path for one data point"
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    g = _generator(6)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    alpha, _ = _alphas(8, 6)
    expected = (x - alpha.sqrt()[:, None] * x0) / (1 - alpha).sqrt()[:, None]  # x = sqrt(α) x0 + sqrt(1 − α) ε
    verdict = _compare(exercise, lambda: fn(x, alpha, x0), expected,
                       "solve x = sqrt(α)·x0 + sqrt(1 − α)·ε for ε")
    if not verdict:
        return verdict
    schedule = linear_schedule()
    tau = schedule.timesteps(10, "uniform")
    x_T = torch.randn(4, 2, generator=g, dtype=torch.float64)

    def model(x, t):
        return torch.as_tensor(fn(x, schedule.alphas_cumprod[t.long()], x0), dtype=torch.float64)

    trajectory = sample(model, x_T, schedule, tau, method="ddim", eta=0.0, return_trajectory=True)  # [S + 1, B, d]
    alpha_T = schedule.alphas_cumprod[int(tau[-1])]
    eps_T = (x_T - alpha_T.sqrt() * x0) / (1 - alpha_T).sqrt()
    alphas = [schedule.alphas_cumprod[int(t)] for t in reversed(tau.tolist())] + [torch.tensor(1.0, dtype=torch.float64)]
    off = max(float((x_t - (a.sqrt() * x0 + (1 - a).sqrt() * eps_T)).abs().max()) for x_t, a in zip(trajectory, alphas))
    right = off <= 1e-10
    return Verdict(exercise, right, f"{verdict.measured}; DDIM's samples leave the line sqrt(α_t)·x0 + sqrt(1 − α_t)·ε_T "
                   f"by at most {off:.1e} at every step", "" if right else "compare your ε with the closed form")


# --- notebook 04: the ODE -----------------------------------------------------------------------


def check_heun_sigma(fn: Callable) -> Verdict:
    """One step of Heun's method on Eq 14 in σ: ``fn(eps, x_bar, s, s_next)`` with ``eps(x_bar, s)`` the field.

    Compared with the library's ``heun`` (``METHODS["heun"]``) on the exact field of the 8-Gaussian ring,
    from s = 2 to s_next = 1.2 (s_next > 0: the last step into σ = 0 is Euler's in both).
    """
    eps = _ring_field(GaussianMixture.ring())

    x_bar = torch.randn(16, 2, generator=_generator(7), dtype=torch.float64) * math.sqrt(1 + 2.0**2)
    expected = integrate(eps, x_bar, [2.0, 1.2], "heun")
    euler = x_bar + (1.2 - 2.0) * eps(x_bar, 2.0)
    return _compare("Heun's method in σ, one step", lambda: fn(eps, x_bar, 2.0, 1.2), expected,
                    "predict with Euler, x̃ = x̄ + (σ' − σ)·ε(x̄, σ), then correct with the mean slope: "
                    "x̄' = x̄ + (σ' − σ)·(ε(x̄, σ) + ε(x̃, σ'))/2",
                    {"that is Euler's step: Heun adds the corrector with the slope at the predicted point": euler})


# --- notebook 02: Theorem 1's constant C --------------------------------------------------------

__all__ += ["check_constant_C"]


def check_constant_C(fn: Callable) -> Verdict:
    """Theorem 1's constant: ``fn(alpha_T, sigma_1, d, second_moment)`` (floats and an int in, a float out) must
    return C = E[KL(N(sqrt(α_T) x_0, (1 − α_T) I) ‖ N(0, I))] + (d/2) log(2π σ_1²), with E‖x_0‖² = second_moment.

    Compared with :func:`ddim_edu.theorem1.constant_C` on three schedules (α_T from about 4e-5 to 0.8), σ_1 and d.
    """
    from .theorem1 import constant_C

    cases = [(linear_schedule(), None, 2, 1.0), (linear_schedule(T=20), 0.05, 64, 30.0),
             (linear_schedule(T=100, beta_end=0.05), 0.3, 3, 2.5)]
    args, expected = [], []
    for schedule, sigma_1, d, m2 in cases:
        sigma_1 = float(schedule.betas[0].sqrt()) if sigma_1 is None else sigma_1
        sigmas = sigmas_for_eta(schedule, 1.0, sigma_1)
        args.append((float(schedule.alphas_cumprod[-1]), sigma_1, d, m2))
        expected.append(constant_C(schedule, sigmas, d, m2))
    expected = torch.stack(expected)

    def kl_T(a, d, m2, *, dims=True, mean=True, log_sign=-1.0):
        n = d if dims else 1
        return 0.5 * (n * (1 - a) + (a * m2 if mean else 0.0) - n + log_sign * n * math.log(1 - a))

    def wrong(kl=kl_T, decoder=lambda d, s: 0.5 * d * math.log(2 * math.pi * s**2)):
        return torch.tensor([kl(a, d, m2) + decoder(d, s) for a, s, d, m2 in args], dtype=torch.float64)

    return _compare("Theorem 1, the constant C",
                    lambda: torch.stack([torch.as_tensor(fn(*a), dtype=torch.float64).reshape(()) for a in args]),
                    expected,
                    "C = ½(d(1 − α_T) + α_T·E‖x_0‖² − d − d·log(1 − α_T)) + (d/2)·log(2π σ_1²): the prior KL of "
                    "x_T and the normaliser of the decoder −log p_θ^(1)",
                    {"the decoder −log p_θ^(1)(x_0|x_1) = ‖x_0 − f_θ‖²/(2σ_1²) + (d/2)·log(2π σ_1²): its second "
                     "part does not depend on ε_θ and belongs to C": wrong(decoder=lambda d, s: 0.0),
                     "σ_1² is the decoder's variance: its normaliser is (d/2)·log(2π σ_1²), not (d/2)·log(2π σ_1)":
                     wrong(decoder=lambda d, s: 0.5 * d * math.log(2 * math.pi * s)),
                     "the trace and log-determinant terms of the KL count each of the d coordinates":
                     wrong(kl=lambda a, d, m2: kl_T(a, d, m2, dims=False)),
                     "the prior's mean sqrt(α_T)·x_0 contributes α_T·E‖x_0‖²/2 to the KL":
                     wrong(kl=lambda a, d, m2: kl_T(a, d, m2, mean=False)),
                     "KL(N(m, v I) ‖ N(0, I)) = ½(d·v + ‖m‖² − d − d·log v): the log term enters with a minus sign":
                     wrong(kl=lambda a, d, m2: kl_T(a, d, m2, log_sign=1.0))})


# --- notebook 04: Eq 14's noise level σ, and Euler in t ------------------------------------------

__all__ += ["check_alpha_from_sigma", "check_euler_t_step", "check_gaussian_last_step"]


def check_alpha_from_sigma(fn: Callable) -> Verdict:
    """``fn(s)``: α from Eq 14's noise level σ = sqrt((1 − α)/α), for a tensor of σ's (the inverse change of variables)."""
    from .schedules import Schedule

    s = torch.cat([torch.tensor([0.0, 1e-3, 1.0], dtype=torch.float64),
                   torch.rand(13, generator=_generator(8), dtype=torch.float64).mul(5).exp()])  # 0 .. about 150
    return _compare("α from the noise level σ", lambda: fn(s), Schedule.alpha_bar_from_sigma(s),
                    "square σ = sqrt((1 − α)/α) and solve σ²·α = 1 − α for α",
                    {"σ² = (1 − α)/α, not σ: α = 1/(1 + σ²)": 1 / (1 + s),
                     "that is sqrt(α), the factor between x and x̄ = x/sqrt(α); α itself is 1/(1 + σ²)":
                     1 / (1 + s**2).sqrt(),
                     "that is 1 − α, the noise's variance; α = 1/(1 + σ²)": s**2 / (1 + s**2)})


def check_euler_t_step(fn: Callable) -> Verdict:
    """One step of Euler's method on Eq 14 written in the timestep t: ``fn(eps, x_bar, t, t_next, sigma, beta)``
    with ``eps(x_bar, s)`` the field, ``sigma(t)`` the noise level σ(t) and ``beta(t)`` = −d log α/dt (floats).

    Compared with :func:`ddim_edu.solvers.euler_t_step` on the exact field of the 8-Gaussian ring, for two steps
    of DDPM's linear schedule (from t = 900 to 800 and from 60 to 0, timestep indices).
    """
    from .sde import VPSDE
    from .solvers import euler_t_step

    schedule = linear_schedule()
    vp = VPSDE(schedule)
    eps = _ring_field(GaussianMixture.ring())

    def sigma(t):
        return float(schedule.sigma(float(t)))

    def beta(t):
        return float(vp.beta(float(t)))

    g = _generator(9)
    steps = [(900.0, 800.0), (60.0, 0.0)]
    starts = [torch.randn(8, 2, generator=g, dtype=torch.float64) * math.sqrt(1 + sigma(t) ** 2) for t, _ in steps]

    def each(step):
        return torch.stack([step(x, t, t_next) for x, (t, t_next) in zip(starts, steps)])

    expected = each(lambda x, t, t_next: euler_t_step(eps, x, schedule, t, t_next))

    def wrong(rate):
        return each(lambda x, t, t_next: x + (t_next - t) * rate(t) * eps(x, sigma(t)))

    chord = each(lambda x, t, t_next: x + (sigma(t_next) - sigma(t)) * eps(x, sigma(t)))
    return _compare("Euler in t on Eq 14, one step", lambda: each(lambda x, t, t_next: fn(eps, x, t, t_next, sigma, beta)),
                    expected,
                    "by the chain rule dx̄/dt = ε·dσ/dt; from σ² = 1/α − 1, d(σ²)/dt = β(t)(1 + σ²), so "
                    "dσ/dt = β(t)(1 + σ²)/(2σ), taken at the start t of the step",
                    {"that is Euler's step in σ, the chord σ(t') − σ(t) (DDIM): in t the step is the tangent "
                     "(t' − t)·dσ/dt(t)": chord,
                     "the step in t needs the chain rule: dx̄/dt = ε·dσ/dt, not ε": wrong(lambda t: 1.0),
                     "d(σ²)/dt = −(1/α)·d log α/dt = β(t)/α = β(t)(1 + σ²): the factor (1 + σ²) is missing":
                     wrong(lambda t: beta(t) / (2 * sigma(t))),
                     "dσ/dt = d(σ²)/dt / (2σ): the ½ is missing": wrong(lambda t: beta(t) * (1 + sigma(t) ** 2) / sigma(t))})


def check_gaussian_last_step(fn: Callable) -> Verdict:
    """The Gaussian last step: ``fn(d_1, eps_1, s_1, d_2, eps_2, s_2, x_bar_1)`` returns x_0 from the evaluations
    (D_1, ε_1) at σ_1 (at the state x̄_1) and (D_2, ε_2) at σ_2 > σ_1, tensors [B, d].

    Compared with :func:`ddim_edu.solvers.gaussian_x0` on two levels of the exact path of a Gaussian N(m, diag(a))
    in 3-D, where it is exact (every variance a found is positive, so no coordinate falls back to Euler).
    """
    from .solvers import Evaluation, gaussian_x0

    mean = torch.tensor([0.4, -1.0, 0.2], dtype=torch.float64)
    widths = torch.tensor([0.01, 0.3, 1.5], dtype=torch.float64)
    eps = _ring_field(GaussianMixture(mean[None], widths[None]))  # the exact ε(x̄, σ)
    s_1, s_2 = 0.05, 0.4
    x_2 = mean + torch.randn(16, 3, generator=_generator(8), dtype=torch.float64) * torch.sqrt(widths**2 + s_2**2)
    x_1 = mean + (x_2 - mean) * torch.sqrt((widths**2 + s_1**2) / (widths**2 + s_2**2))  # Eq 14's path, σ_2 → σ_1
    e_1, e_2 = (Evaluation(s, x, eps(x, s)) for s, x in ((s_1, x_1), (s_2, x_2)))
    args = (e_1.denoised, e_1.eps, s_1, e_2.denoised, e_2.eps, s_2, x_1)
    a_wrong = (e_1.denoised - e_2.denoised) / (e_1.eps - e_2.eps)  # ε not divided by its σ, here and in μ
    mean_wrong = e_1.denoised - a_wrong * e_1.eps
    return _compare("the Gaussian last step", lambda: fn(*args), gaussian_x0(e_1, e_2),
                    "D − a·ε/σ = m holds at both levels: a = (D_1 − D_2)/(ε_1/σ_1 − ε_2/σ_2), m = D_1 − a·ε_1/σ_1, "
                    "then x_0 = m + (x̄_1 − m)·sqrt(a/(a + σ_1²))",
                    {"that is the Euler step, D_1: along the path x̄ − m ∝ sqrt(a + σ²), so x_0 − m is "
                     "(x̄_1 − m)·sqrt(a/(a + σ_1²)), not D's factor a/(a + σ_1²)": e_1.denoised,
                     "ε enters divided by its own σ: D − a·ε/σ = m, so a = (D_1 − D_2)/(ε_1/σ_1 − ε_2/σ_2)":
                     mean_wrong + (x_1 - mean_wrong) * torch.sqrt(a_wrong / (a_wrong + s_1**2))})


# --- notebook 05: the SDE view and the likelihood ------------------------------------------------

__all__ += ["check_em_step", "check_log_density_scaling", "check_score_from_eps"]


def check_score_from_eps(fn: Callable) -> Verdict:
    """``fn(eps, alpha)``: the score ∇_x log p_t(x) from the exact ε = E[ε | x_t] at α (a [B] tensor), x of shape [B, d].

    Compared with the closed-form score of the 8-Gaussian ring's noised marginal (:meth:`GaussianMixture.score`).
    """
    ring = GaussianMixture.ring(std=0.1)
    alpha, _ = _alphas(32, 10)
    x = torch.randn(32, 2, generator=_generator(10), dtype=torch.float64)
    eps = ring.eps(x, alpha)
    a = alpha[:, None]
    return _compare("the score from ε", lambda: fn(eps, alpha), ring.score(x, alpha),
                    "x_t = sqrt(α)·x_0 + sqrt(1 − α)·ε, so ∇ log p_t(x) = E[∇ log q(x_t | x_0) | x_t] = −E[ε | x_t]/sqrt(1 − α); "
                    "α has shape [B]: use alpha[:, None] against [B, d]",
                    {"the score points towards the data, against the noise: −ε/sqrt(1 − α)": eps / (1 - a).sqrt(),
                     "1 − α is the noise's variance; the score divides ε by its std sqrt(1 − α)": -eps / (1 - a),
                     "ε is divided by the noise's std sqrt(1 − α), not multiplied": -eps * (1 - a).sqrt()})


def check_em_step(fn: Callable) -> Verdict:
    """One Euler–Maruyama step of the reverse-time λ-family in the clock s = −log α:
    ``fn(x, eps, alpha, alpha_prev, lam, z)`` (floats for α_t, α_{t−1} and λ) must return x at α_{t−1}.

    Compared with :func:`ddim_edu.sde.euler_maruyama_coefficients` (the step of ``sample_sde``).
    """
    from .sde import euler_maruyama_coefficients

    schedule = linear_schedule()
    g = _generator(11)
    x, eps, z = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3))
    lam = 0.7
    tau = torch.tensor([450.0, 470.0], dtype=torch.float64)
    a, b, c, _ = euler_maruyama_coefficients(schedule, tau, lam)
    alpha, alpha_prev = float(schedule.alpha_bar(tau[1])), float(schedule.alpha_bar(tau[0]))
    ds = math.log(alpha_prev) - math.log(alpha)
    sd = math.sqrt(1 - alpha)
    return _compare("Euler–Maruyama on the λ-family, one step", lambda: fn(x, eps, alpha, alpha_prev, lam, z),
                    a[1] * x + b[1] * eps + c[1] * z,
                    "with Δs = log α_{t−1} − log α_t and ∇log p = −ε/sqrt(1 − α_t): "
                    "x' = (1 + Δs/2)·x − (1 + λ²)·Δs/(2 sqrt(1 − α_t))·ε + λ·sqrt(Δs)·z",
                    {"Brownian noise over a step of length Δs has std sqrt(Δs): the noise term is λ·sqrt(Δs)·z":
                     a[1] * x + b[1] * eps + lam * ds * z,
                     "the score's weight is (1 + λ²)/2, not (1 + λ)/2":
                     a[1] * x - (1 + lam) * ds / (2 * sd) * eps + c[1] * z,
                     "time runs backwards: the forward drift −½x·ds becomes +½x·Δs": (1 - ds / 2) * x + b[1] * eps + c[1] * z})


def check_log_density_scaling(fn: Callable) -> Verdict:
    """``fn(logp_bar, alpha, d)``: log p_t(x) from the log-density of x̄ = x/sqrt(α) at the same point (α a float).

    Compared with the closed form of the 8-Gaussian ring's noised marginal: x̄ = x_0 + σ ε is the ring with
    variance s² + σ² per component, and its log-density at x/sqrt(α) must turn into ``ring.log_prob(x, α)``.
    """
    ring = GaussianMixture.ring(std=0.1)
    x = torch.randn(16, 2, generator=_generator(12), dtype=torch.float64)
    out = []
    for alpha in (0.9, 0.3, 0.02):
        s = math.sqrt((1 - alpha) / alpha)  # σ of Eq 14
        ve = GaussianMixture(ring.means, (ring.stds**2 + s**2).sqrt())  # x̄ = x_0 + σ ε
        out.append((ve.log_prob(x / math.sqrt(alpha)), alpha))
    d = ring.dim
    expected = torch.stack([ring.log_prob(x, alpha) for _, alpha in out])

    def each(rule):
        return torch.stack([torch.as_tensor(rule(lp, alpha), dtype=torch.float64) for lp, alpha in out])

    return _compare("the change of variables x = sqrt(α)·x̄", lambda: each(lambda lp, alpha: fn(lp, alpha, d)), expected,
                    "p_x(x) = p̄(x/sqrt(α))·|det ∂x̄/∂x| and ∂x̄/∂x = I/sqrt(α) in d dimensions: "
                    "log p_x = log p̄ − (d/2)·log α",
                    {"x = sqrt(α)·x̄ squeezes volume by α^{d/2}, so the density of x is higher: −(d/2)·log α, not +":
                     each(lambda lp, alpha: lp + d / 2 * math.log(alpha)),
                     "each of the d coordinates is scaled by sqrt(α): the Jacobian term is (d/2)·log α, not d·log α":
                     each(lambda lp, alpha: lp - d * math.log(alpha)),
                     "the Jacobian is a product over the d coordinates: (d/2)·log α, not ½·log α":
                     each(lambda lp, alpha: lp - 0.5 * math.log(alpha))})


# --- notebook 03: the α pairs of a sub-sequence τ -----------------------------------------------

__all__ += ["check_step_alphas"]


def check_step_alphas(fn: Callable) -> Verdict:
    """The α's of each step on a sub-sequence: ``fn(alphas_cumprod, tau)`` (float64 [T], increasing int64 [n])
    must return ``(alpha, alpha_prev)``, float64 [n] each: α_{τ_i} and α_{τ_{i−1}}, with α_{τ_0} := α_0 = 1
    for the last step, which lands on clean data.

    Compared with :meth:`ddim_edu.schedules.Schedule.step_alphas` on the linear schedule's "quad" τ for
    S = 10 (where the step between entries is not T // S) and its "trailing" τ for S = 7 (whose first entry
    is 142, not 0).
    """
    schedule = linear_schedule()
    taus = [schedule.timesteps(10, "quad").long(), schedule.timesteps(7, "trailing").long()]
    table = schedule.alphas_cumprod
    one = torch.ones(1, dtype=torch.float64)

    def stacked(pairs):
        return torch.cat([torch.stack([torch.as_tensor(a, dtype=torch.float64).reshape(-1),
                                       torch.as_tensor(b, dtype=torch.float64).reshape(-1)]) for a, b in pairs], dim=1)

    def wrong(previous):  # a previous index computed from τ_i alone; below 0 it is taken as α_0 = 1
        pairs = []
        for tau in taus:
            prev = previous(tau, len(table) // len(tau))
            pairs.append((table[tau], torch.where(prev >= 0, table[prev.clamp(min=0)], one)))
        return stacked(pairs)

    expected = stacked([schedule.step_alphas(tau) for tau in taus])
    return _compare("the α pairs of a sub-sequence τ", lambda: stacked([fn(table, tau.clone()) for tau in taus]),
                    expected,
                    "alpha = alphas_cumprod[τ]; alpha_prev = alphas_cumprod at the previous entry of τ, "
                    "with 1 (α_0, clean data) for the first entry: the last step lands on x_0",
                    {"the last step lands on α_0 = 1 (clean data), not on alphas_cumprod[0] = α_1 = 1 − β_1: "
                     "with α_1 the sample keeps noise of std sqrt(β_1)":
                     stacked([(table[tau], torch.cat([table[:1], table[tau][:-1]])) for tau in taus]),
                     "the step before τ_i is the previous entry τ_{i−1} of τ, not τ_i − T // S: that holds only "
                     "for the evenly spaced τ": wrong(lambda tau, step: tau - step),
                     "on a sub-sequence α_{t−1} becomes α_{τ_{i−1}}, the previous entry of τ, not the index τ_i − 1 "
                     "of the full chain": wrong(lambda tau, step: tau - 1)})


# --- notebook 06: encoding, reconstruction and slerp --------------------------------------------

__all__ += ["check_encode_decode", "check_encode_first_step", "check_slerp", "check_step_gain"]


def check_encode_first_step(fn: Callable) -> Verdict:
    """The first step of DDIM inversion, from σ = 0 up to σ_1 = σ(τ_1): ``fn(eps, x0, s_1)`` must return the x̄_1
    that solves x̄_1 = x_0 + σ_1 ε(x̄_1, σ_1), the one point from which the sampler's last (Euler) step,
    x_0 = x̄_1 − σ_1 ε(x̄_1, σ_1), lands exactly on x_0.

    Compared with :func:`ddim_edu.solvers.encode` on the one-entry τ = (τ_1,), whose x_T is x̄_1/sqrt(1 + σ_1²),
    on the exact field of the 8-Gaussian ring (std 0.05) at τ_1 = 10, where σ_1 ≈ 0.047 is about the ring's own
    scale: one explicit step visibly misses, and plain iteration converges (about 50 iterations to rounding).
    """
    from .solvers import encode, fixed_point

    schedule, ring = linear_schedule(), GaussianMixture.ring()
    eps = _ring_field(ring)
    t_1 = 10  # the timestep index τ_1
    s_1 = float(schedule.sigma(t_1))
    x0 = ring.sample(16, generator=_generator(13))
    expected = encode(ring.eps_model(schedule), x0, schedule, [t_1], "euler") * math.sqrt(1 + s_1**2)
    explicit = x0 + s_1 * eps(x0, s_1)
    downwards, _, _ = fixed_point(lambda y: x0 - s_1 * eps(y, s_1), x0, tol=1e-14, max_iterations=500)
    verdict = _compare("encode's first step, 0 → σ_1", lambda: fn(eps, x0, s_1), expected,
                       "iterate x̄ ← x_0 + σ_1·ε(x̄, σ_1), starting from x̄ = x_0, until it stops changing (about "
                       "50 iterations here: each shrinks the error by about σ_1·|∂ε/∂x̄| < 1); return x̄_1, not x_1 = x̄_1/sqrt(1 + σ_1²)",
                       {"that is one explicit step with ε taken at x_0: the step must invert the sampler's last step, "
                        "which takes ε at x̄_1; solve x̄_1 = x_0 + σ_1·ε(x̄_1, σ_1) by iterating it": explicit,
                        "that is x_1 = x̄_1/sqrt(1 + σ_1²), in the model's coordinates; return x̄_1 itself":
                        expected / math.sqrt(1 + s_1**2),
                        "encoding goes up in σ: x̄_1 = x_0 + σ_1·ε(x̄_1, σ_1), with a plus (the sampler's last step "
                        "subtracts σ_1·ε)": downwards})
    if not verdict:
        return verdict
    got = torch.as_tensor(fn(eps, x0, s_1), dtype=torch.float64)
    back = float((got - s_1 * eps(got, s_1) - x0).abs().max())
    missed = float((explicit - s_1 * eps(explicit, s_1) - x0).abs().max())
    return Verdict(verdict.exercise, True, f"{verdict.measured}; the sampler's last step from your x̄_1 returns x_0 "
                   f"to {back:.1e}, from one explicit step x_0 + σ_1·ε(x_0, σ_1) it would miss by {missed:.1e}")


def check_encode_decode(fn: Callable) -> Verdict:
    """Encode on one grid, decode on another: ``fn(model, x0, schedule, tau_enc, tau_dec)`` must return the x_0 that
    DDIM (η = 0) decodes on ``tau_dec`` from the latent that DDIM inversion finds on ``tau_enc``,
    ``sample(model, encode(model, x0, schedule, tau_enc), schedule, tau_dec)``.

    Run on the exact ε of the 8-Gaussian ring (500 points, float64) with the uniform τ of S = 10 and S = 50, both
    ways round. A right answer's verdict also reports the round-trip RMSE of all four pairings of the two grids,
    measured, so that it says whether decoding on the other grid adds error to the latents of each.
    """
    from .solvers import encode

    schedule, ring = linear_schedule(), GaussianMixture.ring()
    model = ring.eps_model(schedule)
    x0 = ring.sample(500, generator=_generator(14))
    taus = {S: schedule.timesteps(S, "uniform") for S in (10, 50)}
    latents = {S: encode(model, x0, schedule, tau, "euler") for S, tau in taus.items()}
    decoded = {(a, b): sample(model, latents[a], schedule, taus[b], "euler") for a in taus for b in taus}
    pairs = [(10, 50), (50, 10)]

    def stacked(of):
        return torch.stack([torch.as_tensor(of(a, b), dtype=torch.float64) for a, b in pairs])

    verdict = _compare("encode on τ_enc, decode on τ_dec",
                       lambda: stacked(lambda a, b: fn(model, x0, schedule, taus[a].clone(), taus[b].clone())),
                       stacked(lambda a, b: decoded[a, b]),
                       "x_T = encode(model, x0, schedule, tau_enc) (DDIM inversion, method 'euler'), then "
                       "sample(model, x_T, schedule, tau_dec) (DDIM, η = 0)",
                       {"decode on tau_dec: the decoder's grid is the second one": stacked(lambda a, b: decoded[a, a]),
                        "encode on tau_enc: the encoder's grid is the first one": stacked(lambda a, b: decoded[b, b]),
                        "the grids are swapped: encode on tau_enc, decode on tau_dec": stacked(lambda a, b: decoded[b, a]),
                        "that is the latent x_T: decode it with sample on tau_dec": stacked(lambda a, b: latents[a])})
    if not verdict:
        return verdict
    rmse = {k: float((v - x0).pow(2).mean().sqrt()) for k, v in decoded.items()}

    def effect(S, other):
        ratio = rmse[S, other] / rmse[S, S]
        return (f"decoding the S = {S} latents on the S = {other} grid {'adds' if ratio > 1 else 'removes'} error "
                f"({rmse[S, S]:.1e} → {rmse[S, other]:.1e}, {ratio:.2f}×)")

    return Verdict(verdict.exercise, True, f"{verdict.measured}; round-trip RMSE on the ring: {effect(10, 50)}; "
                   f"{effect(50, 10)}")


def check_slerp(fn: Callable) -> Verdict:
    """Section 5.3: ``fn(x0, x1, w)`` (x0, x1 [B, d] float64, w a float in [0, 1]) must return, row by row,
    slerp = sin((1 − w)θ)/sin θ · x0 + sin(wθ)/sin θ · x1 with θ = arccos(⟨x0, x1⟩/(‖x0‖ ‖x1‖)).

    Compared with :func:`ddim_edu.interpolation.slerp` on 8 pairs of latents in d = 64 with different norms, at
    w = 0, 0.3, 0.5, 0.85 and 1.
    """
    from .interpolation import slerp

    g = _generator(15)
    x0 = torch.randn(8, 64, generator=g, dtype=torch.float64) * (0.5 + torch.rand(8, 1, generator=g, dtype=torch.float64))
    x1 = torch.randn(8, 64, generator=g, dtype=torch.float64) * (0.5 + torch.rand(8, 1, generator=g, dtype=torch.float64))
    weights = (0.0, 0.3, 0.5, 0.85, 1.0)

    def each(of):
        return torch.stack([torch.as_tensor(of(w), dtype=torch.float64) for w in weights])

    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    def by_angle(theta, a, b):  # the slerp formula with a given angle θ (a float or [B, 1])
        theta = torch.as_tensor(theta, dtype=torch.float64)
        return lambda w: (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)

    theta_batch = torch.arccos((unit(x0.reshape(1, -1)) * unit(x1.reshape(1, -1))).sum())  # one angle for the batch
    theta = torch.arccos((unit(x0) * unit(x1)).sum(1, keepdim=True))
    return _compare("slerp (Section 5.3)", lambda: each(lambda w: fn(x0.clone(), x1.clone(), w)),
                    each(lambda w: slerp(x0, x1, w)),
                    "θ = arccos(⟨x0, x1⟩/(‖x0‖·‖x1‖)) per row (sum over the last dimension, keepdim), then "
                    "sin((1 − w)θ)/sin θ · x0 + sin(wθ)/sin θ · x1",
                    {"that is linear interpolation: between nearly orthogonal latents its norm sags by up to 1/sqrt(2); "
                     "slerp weighs x0 by sin((1 − w)θ)/sin θ and x1 by sin(wθ)/sin θ": each(lambda w: (1 - w) * x0 + w * x1),
                     "normalise only to compute the angle θ: the weights multiply x0 and x1 themselves, so that w = 0 "
                     "gives x0 and the norms are kept": each(by_angle(theta, unit(x0), unit(x1))),
                     "w = 0 must give x0: x0's weight is sin((1 − w)θ)/sin θ, x1's is sin(wθ)/sin θ":
                     each(lambda w: by_angle(theta, x0, x1)(1 - w)),
                     "θ is the angle of each pair (row), not one angle over the whole batch: reduce over the last "
                     "dimension only": each(by_angle(theta_batch, x0, x1))})


def check_step_gain(fn: Callable) -> Verdict:
    """DDIM's step Φ(y) = y + (σ_a − σ_b) ε(y, σ_b) from σ_b down to σ_a < σ_b, on data N(0, v I): ε is linear in y
    there, so Φ(y) = g y; ``fn(v, s_a, s_b)`` (float64 tensors [n]) must return g.

    Compared with :func:`ddim_edu.solvers.step_monotonicity` (an autograd Jacobian of the library's step on the
    exact ε of such data, whose eigenvalues all equal g) at 12 draws of v from 1e-3 to 10 and σ_a < σ_b from
    0.03 to 30; the verdict also says whether every g is at least ρ = σ_a/σ_b, the bound of notebook 06.
    """
    from .solvers import step_monotonicity

    schedule = linear_schedule()
    g = _generator(16)
    v = 10 ** (4 * torch.rand(12, generator=g, dtype=torch.float64) - 3)
    s_b = 10 ** (3 * torch.rand(12, generator=g, dtype=torch.float64) - 1.5)
    s_a = s_b * (0.05 + 0.9 * torch.rand(12, generator=g, dtype=torch.float64))
    x_bar = torch.randn(1, 2, generator=g, dtype=torch.float64)
    expected = torch.stack([
        step_monotonicity(GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), vi ** 0.5, dtype=torch.float64))
                          .eps_model(schedule), schedule, x_bar, sb, sa)[0]
        for vi, sa, sb in zip(v.tolist(), s_a.tolist(), s_b.tolist())])
    verdict = _compare("the gain of DDIM's step on Gaussian data", lambda: fn(v.clone(), s_a.clone(), s_b.clone()),
                       expected,
                       "for N(0, v I) the x_0 prediction is D = v/(v + σ²)·x̄, so ε = (x̄ − D)/σ = σ x̄/(v + σ²); "
                       "then Φ(y) = y + (σ_a − σ_b)·σ_b y/(v + σ_b²) = g y",
                       {"that is ρ = σ_a/σ_b, the limit of data at one point (v → 0): ε(y, σ_b) = σ_b y/(v + σ_b²) "
                        "carries the data's variance v": s_a / s_b,
                        "Φ evaluates ε at the level it starts from, σ_b, not at σ_a: ε(y, σ_b) = σ_b y/(v + σ_b²)":
                        (v + s_a * s_b) / (v + s_a**2),
                        "the step goes down, from σ_b to σ_a < σ_b: Φ(y) = y + (σ_a − σ_b) ε(y, σ_b), a factor below 1":
                        1 + (s_b - s_a) * s_b / (v + s_b**2)})
    if verdict:
        above = bool((expected >= s_a / s_b).all())
        verdict = Verdict(verdict.exercise, True, f"{verdict.measured}; every g ≥ ρ = σ_a/σ_b: {above}")
    return verdict


# --- notebook 07: the Fréchet distance and σ̂ ----------------------------------------------------

__all__ += ["check_frechet_distance", "check_sigma_hat"]


def check_frechet_distance(fn: Callable) -> Verdict:
    """FID's distance (Heusel et al. 2017): ``fn(mu1, sigma1, mu2, sigma2)`` (NumPy float64 means [D] and covariances
    [D, D]) must return d² = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2}), a number.

    Compared with :func:`ddim_edu.evaluation.fid.frechet_distance` on three seeded pairs of Gaussians (D = 2, 5 and 8)
    whose covariances do not commute, so that (Σ1Σ2)^{1/2} differs from Σ1^{1/2}Σ2^{1/2}; their entries are positive,
    so that an entrywise square root is finite and recognised.
    """
    import numpy as np
    from scipy import linalg

    from .evaluation.fid import frechet_distance

    rng = np.random.default_rng(16)
    cases = []
    for D in (2, 5, 8):
        a, b = rng.uniform(0.1, 1.0, (D, D)), rng.uniform(0.1, 1.0, (D, D))
        cases.append((rng.normal(size=D), a @ a.T / D + 0.2 * np.eye(D), rng.normal(size=D), b @ b.T / D + 0.2 * np.eye(D)))

    def each(of):
        return torch.tensor([float(np.real(np.asarray(of(*case)))) for case in cases], dtype=torch.float64)

    def wrong(mean=lambda d: d @ d, cross=lambda s1, s2: 2 * linalg.sqrtm(s1 @ s2).real):
        return each(lambda m1, s1, m2, s2: mean(m1 - m2) + np.trace(s1 + s2 - cross(s1, s2)))

    return _compare("the Fréchet distance of two Gaussians", lambda: each(fn), each(frechet_distance),
                    "‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1Σ2)^{1/2}), with (Σ1Σ2)^{1/2} the matrix square root "
                    "of the product: scipy.linalg.sqrtm(sigma1 @ sigma2) (keep its real part)",
                    {"the cross term needs the matrix square root of the product, (Σ1Σ2)^{1/2} "
                     "(scipy.linalg.sqrtm), not Σ1Σ2 itself": wrong(cross=lambda s1, s2: 2 * s1 @ s2),
                     "np.sqrt takes the root of each entry; (Σ1Σ2)^{1/2} is the matrix R with R·R = Σ1Σ2: "
                     "scipy.linalg.sqrtm": wrong(cross=lambda s1, s2: 2 * np.sqrt(s1 @ s2)),
                     "(Σ1Σ2)^{1/2} equals Σ1^{1/2}Σ2^{1/2} only when Σ1 and Σ2 commute: take the root of the product":
                     wrong(cross=lambda s1, s2: 2 * (linalg.sqrtm(s1) @ linalg.sqrtm(s2)).real),
                     "the cross term is 2·tr((Σ1Σ2)^{1/2}): the factor 2 is missing":
                     wrong(cross=lambda s1, s2: linalg.sqrtm(s1 @ s2).real),
                     "the means enter squared: ‖μ1 − μ2‖², not ‖μ1 − μ2‖": wrong(mean=lambda d: np.sqrt(d @ d)),
                     "FID is the squared distance d², as written: no square root of the whole":
                     each(lambda *case: math.sqrt(frechet_distance(*case)))})


def check_sigma_hat(fn: Callable) -> Verdict:
    """Table 1's last row: ``fn(alpha, alpha_prev)`` ([n] float64 tensors of α_{τ_i} and α_{τ_{i−1}}) must return
    σ̂_{τ_i} = sqrt(1 − α_{τ_i}/α_{τ_{i−1}}), DDPM's ancestral noise std on the sub-sequence τ.

    Compared with :func:`ddim_edu.forward.sigma_hat` on the steps of the uniform and the quad τ for S = 10 (the
    last step lands on α_0 = 1) and on 32 random pairs of consecutive timesteps.
    """
    from .forward import sigma_hat

    schedule = linear_schedule()
    steps = [schedule.step_alphas(schedule.timesteps(10, spacing)) for spacing in ("uniform", "quad")] + [_alphas(32, 17)]
    alpha = torch.cat([a for a, _ in steps])
    alpha_prev = torch.cat([b for _, b in steps])
    return _compare("σ̂ of Table 1", lambda: fn(alpha.clone(), alpha_prev.clone()), sigma_hat(alpha, alpha_prev),
                    "σ̂ = sqrt(1 − α_{τ_i}/α_{τ_{i−1}}): α is the cumulative product, α_{τ_i} < α_{τ_{i−1}}, so the "
                    "ratio is below 1",
                    {"that is σ_{τ_i}(η = 1) of Eq 16; σ̂ drops its factor sqrt((1 − α_{τ_{i−1}})/(1 − α_{τ_i})) and is "
                     "larger": sigma_eta(alpha, alpha_prev, 1.0),
                     "that is the variance 1 − α_{τ_i}/α_{τ_{i−1}}: σ̂ is a standard deviation, its square root":
                     1 - alpha / alpha_prev,
                     "that is sqrt(1 − α_{τ_i}), the noise std of x_t given x_0 (Eq 4); σ̂ is the std of one step, "
                     "from the ratio α_{τ_i}/α_{τ_{i−1}}": (1 - alpha).sqrt()})
