"""Sampling and ODE solving: ``sample(model, x_T, schedule, timesteps, method=...)``.

Two families, one entry point. The Eq 12 samplers of :mod:`ddim_edu.sampling` (``"ddim"`` with
any η, ``"sigma_hat"``) walk the discrete τ. The ODE methods integrate Eq 14,
``dx̄/dσ = ε_θ(x̄/sqrt(σ²+1), t(σ))`` (:mod:`ddim_edu.ode`), over the noise levels
σ(τ_S) > … > σ(τ_1) > 0; ``timesteps`` may then be fractional. Every method starts at τ_S,
where ``x_T`` is fed in, and returns x_0: the last step goes from σ(τ_1) to σ = 0 (ᾱ = 1), where
the model cannot be evaluated, so every method takes it as an Euler step (= DDIM's last step), or,
with ``final_step="extrapolate"``, extrapolates the last two x_0 predictions to σ = 0 in σ².

``METHODS`` maps each ODE method's name to its step function and order. A step function has the
signature ``step(eps, x, s, s_next, history) -> x_next``: ``eps(x, σ)`` evaluates ε_θ on the
scaled state, ``s > s_next`` are noise levels, and ``history`` is a list that multistep methods
append ``(σ, x̄, ε)`` to and read back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .ode import eps_at_sigma, probability_flow
from .sampling import Model, check_x, ddim_steps, run_steps, sigma_hat_steps
from .schedules import Schedule

SAMPLERS = {
    "ddim": ddim_steps,  # Eq 12 with σ(η) of Eq 16: η = 0 DDIM, η = 1 DDPM
    "sigma_hat": sigma_hat_steps,  # Table 1's σ̂ row, as the reference code realises it
}


# --- step functions on Eq 14 (x is the scaled state x̄, s the noise level σ) ---------------------


def euler_step(eps, x, s, s_next, history):
    """Euler's method on Eq 14 in σ: ``x̄' = x̄ + (σ' - σ) ε_θ(x̄, σ)``. This is DDIM (Eq 13)."""
    return x + (s_next - s) * eps(x, s)


def heun_step(eps, x, s, s_next, history):
    """Heun's 2nd-order method in σ (Karras et al. 2022, Algorithm 1 without churn); Euler to σ' = 0."""
    e = eps(x, s)
    x_euler = x + (s_next - s) * e
    if s_next == 0:
        return x_euler
    return x + (s_next - s) * 0.5 * (e + eps(x_euler, s_next))


def rk4_step(eps, x, s, s_next, history):
    """The classical 4th-order Runge–Kutta method in σ (stages at σ, twice the midpoint, σ'); Euler to σ' = 0."""
    if s_next == 0:
        return euler_step(eps, x, s, s_next, history)
    h = s_next - s
    k1 = eps(x, s)
    k2 = eps(x + 0.5 * h * k1, s + 0.5 * h)
    k3 = eps(x + 0.5 * h * k2, s + 0.5 * h)
    k4 = eps(x + h * k3, s_next)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def dpm_solver_2_step(eps, x, s, s_next, history):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r₁ = ½) in λ = -log σ; Euler to σ' = 0.

    In (σ, x̄) the exponential integrator reads ``x̄' = x̄ + (σ' - σ) ε(u, σ_mid)`` with the
    λ-midpoint ``σ_mid = sqrt(σ σ')`` and u its DPM-Solver-1 (= Euler = DDIM) predictor.
    """
    if s_next == 0:
        return euler_step(eps, x, s, s_next, history)
    s_mid = math.sqrt(s * s_next)
    u = x + (s_mid - s) * eps(x, s)
    return x + (s_next - s) * eps(u, s_mid)


def dpm_solver_3_step(eps, x, s, s_next, history):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 2, r₁ = ⅓, r₂ = ⅔), noise-prediction form; Euler to σ' = 0.

    With h = λ' - λ and σ_r = σ e^{-rh}, the paper's σ_r (e^{rh} - 1) ε becomes (σ - σ_r) ε in x̄.
    """
    if s_next == 0:
        return euler_step(eps, x, s, s_next, history)
    r1, r2 = 1 / 3, 2 / 3
    h = math.log(s / s_next)
    s1, s2 = s * math.exp(-r1 * h), s * math.exp(-r2 * h)
    e = eps(x, s)
    d1 = eps(x + (s1 - s) * e, s1) - e
    u2 = x + (s2 - s) * e - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * d1
    d2 = eps(u2, s2) - e
    return x + (s_next - s) * e - s_next / r2 * (math.expm1(h) / h - 1) * d2


def dpmpp_2m_step(eps, x, s, s_next, history):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep on the x_0 prediction D = x̄ - σ ε.

    ``x̄' = (σ'/σ) x̄ + (1 - σ'/σ) D̂``, ``D̂ = (1 + 1/(2r)) D_i - D_{i-1}/(2r)``, r = h_{i-1}/h_i in
    λ = -log σ; first order (D̂ = D_i, i.e. DDIM) on the first step and on the last, to σ' = 0.
    """
    e = eps(x, s)
    d = x - s * e
    d_hat = d
    if history and s_next > 0:
        s_prev, x_prev, e_prev = history[-1]
        r = math.log(s_prev / s) / math.log(s / s_next)
        d_hat = (1 + 1 / (2 * r)) * d - (x_prev - s_prev * e_prev) / (2 * r)
    history.append((s, x, e))
    return (s_next / s) * x + (1 - s_next / s) * d_hat


def dpmpp_3m_step(eps, x, s, s_next, history):
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep, third order) on the x_0 prediction D = x̄ - σ ε.

    In λ = -log σ, Eq 14 reads dx̄/dλ = D - x̄, so x̄(λ+h) = e^{-h} x̄ + ∫₀ʰ e^{-(h-τ)} D(λ+τ) dτ.
    With D expanded to second order, its derivatives taken from the last three predictions
    (d₁ ≈ h D', d₂ ≈ h² D''/2 by divided differences on the uneven λ-grid), the integral gives
    ``x̄' = e^{-h} x̄ + (1 - e^{-h}) D_i + φ₂ d₁ + (1 - 2φ₂/h) d₂``, φ₂ = 1 - (1 - e^{-h})/h.
    (Widely used code weights d₂ by ½ - φ₂/h, half the exact weight; measured on Eq 14 that gives
    order ≈ 2.4 instead of 3, see tests/test_solvers.py.) The first step is DPM-Solver-2 (one extra evaluation) and the
    second uses two predictions, so that the start-up errors are O(h³) and the method is of third
    order; the last step, to σ' = 0, is first order.
    """
    e = eps(x, s)
    d = x - s * e
    x_next = (s_next / s) * x + (1 - s_next / s) * d
    if not history and s_next > 0:  # start-up: DPM-Solver-2's λ-midpoint step
        s_mid = math.sqrt(s * s_next)
        x_next = x + (s_next - s) * eps(x + (s_mid - s) * e, s_mid)
    elif history and s_next > 0:
        h = math.log(s / s_next)
        phi_2 = math.expm1(-h) / h + 1
        s_1, x_1, e_1 = history[-1]
        r0 = math.log(s_1 / s) / h
        d1_0 = (d - (x_1 - s_1 * e_1)) / r0
        if len(history) >= 2:
            s_2, x_2, e_2 = history[-2]
            r1 = math.log(s_2 / s_1) / h
            d1_1 = ((x_1 - s_1 * e_1) - (x_2 - s_2 * e_2)) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_next = x_next + phi_2 * d1 + (1 - 2 * phi_2 / h) * d2
        else:
            x_next = x_next + phi_2 * d1_0
    history.append((s, x, e))
    return x_next


def current_prediction(eps, x, s, history):
    """D = x̄ - σ ε at the start of a predictor–corrector step: evaluated here on the first step, else
    the one the previous step evaluated at its end (the last entry of ``history``, (σ, D) pairs)."""
    if not history:
        history.append((s, x - s * eps(x, s)))
    return history[-1][1]


def unipc_step(eps, x, s, s_next, history):
    """UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2"), on the x_0 prediction D = x̄ - σ ε.

    Like :func:`dpmpp_3m_step` it integrates dx̄/dλ = D - x̄, x̄' = e^{-h} x̄ + (1 - e^{-h}) D_i + (the
    integral of D's change), but evaluates the model at the *end* of each step. The predictor
    (UniP-2) takes D's slope from (D_{i-1}, D_i) with weight B(h)/2 = (1 - e^{-h})/2 in λ units,
    which equals the exact weight φ₂ to O(h²). Then D' = D(x̄', σ') fits a quadratic through
    (D_{i-1}, D_i, D') and the corrector (UniC) recomputes x̄' with it integrated exactly (the
    solution of UniC's linear system, whatever B(h)). D' is reused by the next step, so the
    corrector costs no evaluation: order 3 for one evaluation per step. On the first step the
    predictor is DDIM and the corrector weights D' - D_i by B(h)/2 (UniC-1). The last step, to
    σ' = 0, returns D_i. This is diffusers' ``UniPCMultistepScheduler`` at its defaults.
    """
    d = current_prediction(eps, x, s, history)
    if s_next == 0:
        return d
    h = math.log(s / s_next)
    phi_2 = math.expm1(-h) / h + 1
    b_half = -math.expm1(-h) / 2  # B(h)/2 in the units of dx̄/dλ = D - x̄
    base = (s_next / s) * x + (1 - s_next / s) * d
    prev = history[-2] if len(history) >= 2 else None
    if prev is not None:
        r0 = math.log(prev[0] / s) / h  # the previous point sits at u = -r0 in units of h
        x_pred = base + b_half * (d - prev[1]) / r0
    else:
        x_pred = base
    d_next = x_pred - s_next * eps(x_pred, s_next)
    history.append((s_next, d_next))
    if prev is None:
        return base + b_half * (d_next - d)
    # D(u) = D_i + a u + b u² through u = -r0, 0, 1, integrated exactly (see dpmpp_3m_step).
    b = ((prev[1] - d) + r0 * (d_next - d)) / (r0 * (1 + r0))
    a = d_next - d - b
    return base + phi_2 * a + (1 - 2 * phi_2 / h) * b


def sigma_polynomial_weights(nodes: list[float], rho: float) -> list[float]:
    """Weights w_j with ``∫_σ^{σ'} D(u)/u² du = (1/σ) Σ_j w_j D_j`` for D the polynomial in u through
    the nodes ``(σ_j, D_j)``, given as ``nodes = [σ_j/σ]`` and ``rho = σ'/σ``.

    In v = u/σ, ∫ v^k / v² dv from 1 to ρ is 1 - 1/ρ, log ρ and ρ - 1 for k = 0, 1, 2; the weights
    solve the transposed Vandermonde system of the nodes against those moments.
    """
    moments = [1 - 1 / rho, math.log(rho), rho - 1][: len(nodes)]
    vandermonde = torch.tensor([[v**k for k in range(len(nodes))] for v in nodes], dtype=torch.float64)
    return torch.linalg.solve(vandermonde.T, torch.tensor(moments, dtype=torch.float64)).tolist()


def pc_sigma_step(eps, x, s, s_next, history):
    """UniPC's predictor–corrector scheme with D = x̄ - σ ε interpolated in σ instead of λ (this library's).

    Eq 14 as dx̄/dσ = (x̄ - D)/σ has the integrating factor 1/σ: exactly,
    ``x̄' = (σ'/σ) x̄ - σ' ∫_σ^{σ'} D(u)/u² du``. The predictor takes D linear in σ through
    (σ_{i-1}, D_{i-1}), (σ_i, D_i); the corrector, quadratic through those and D' evaluated at the
    predicted x̄' (reused by the next step): order 3 for one evaluation per step, the first step
    DDIM then a linear corrector. Along Eq 14, D tends to x_0 as x_0 + cσ² at small σ, where a
    polynomial in λ = -log σ would need ever higher degrees to follow it; on the mixture benchmark
    this roughly halves UniPC's error at 10 evaluations. The last step, to σ' = 0, returns D_i.
    """
    d = current_prediction(eps, x, s, history)
    if s_next == 0:
        return d
    rho = s_next / s

    def advance(nodes):
        weights = sigma_polynomial_weights([s_j / s for s_j, _ in nodes], rho)
        return rho * (x - sum(w * d_j for w, (_, d_j) in zip(weights, nodes)))

    nodes = history[-2:]
    x_pred = advance(nodes)
    d_next = x_pred - s_next * eps(x_pred, s_next)
    history.append((s_next, d_next))
    return advance([*nodes, (s_next, d_next)])


@dataclass(frozen=True)
class Method:
    """An ODE method: its step function, its order, and its model evaluations per (non-final) step."""

    step: Callable
    order: int
    nfe_per_step: int
    startup_nfe: int = 0

    def nfe(self, S: int) -> int:
        """Model evaluations for S timesteps (S - 1 steps between them and the last one, to σ = 0, costing 1)."""
        return self.nfe_per_step * (S - 1) + 1 + (self.startup_nfe if S > 1 else 0)


METHODS = {
    "euler": Method(euler_step, 1, 1),
    "heun": Method(heun_step, 2, 2),
    "rk4": Method(rk4_step, 4, 4),
    "dpm_solver_2": Method(dpm_solver_2_step, 2, 2),
    "dpm_solver_3": Method(dpm_solver_3_step, 3, 3),
    "dpmpp_2m": Method(dpmpp_2m_step, 2, 1),
    "dpmpp_3m": Method(dpmpp_3m_step, 3, 1, startup_nfe=1),
    "unipc": Method(unipc_step, 3, 1),
    "pc_sigma": Method(pc_sigma_step, 3, 1),
}

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's adaptive solvers
ADAPTIVE_RTOL = ADAPTIVE_ATOL = 1e-5  # their default tolerances here


# --- integration ----------------------------------------------------------------------------------


FINAL_STEPS = ("euler", "extrapolate")  # how the last step, σ(τ_1) → 0, is taken


def extrapolated_x0(d_1: Tensor, d_2: Tensor, s_1: float, s_2: float) -> Tensor:
    """x_0 from the x_0 predictions D_1 at σ_1 and D_2 at σ_2 > σ_1, extrapolated to σ = 0 in σ².

    Eq 14's field is odd in σ (ε = -σ ∇log p_σ, and p_σ depends on σ² only), so for data with a
    smooth density the solution x̄(σ) is even and so is D = x̄ - σ ε: D(σ) = x_0 + c σ² + O(σ⁴).
    The Euler (= DDIM) last step returns D_1, an error c σ_1²; the line through (σ_1², D_1) and
    (σ_2², D_2) cancels c, leaving O(σ_1² σ_2²), at no extra evaluation.
    """
    return d_1 + s_1**2 * (d_1 - d_2) / (s_2**2 - s_1**2)


def integrate(model: Model, x_bar: Tensor, schedule: Schedule, sigmas, method: str = "euler", *,
              final_step: str = "euler", progress: bool = False) -> Tensor:
    """Integrate Eq 14 in the scaled state x̄ along the noise levels ``sigmas`` (any direction).

    ``sigmas`` [N] is strictly monotone; the model is evaluated at every σ > 0 a method asks for
    (σ must not fall below σ(0), the schedule's smallest level, except as a final target 0).
    Autograd stays on (to differentiate through a solve); :func:`sample` and :func:`encode` turn it
    off. A descent that ends at σ = 0 ends with the Euler step (``final_step="euler"``), or with
    :func:`extrapolated_x0` from the last two levels (``"extrapolate"``, needs N ≥ 3).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    extrapolate = final_step == "extrapolate"
    if extrapolate and (len(sigmas) < 3 or sigmas[-1] != 0 or sigmas[-2] > sigmas[-3]):
        raise ValueError("final_step='extrapolate' needs a descent to σ = 0 from at least two noise levels "
                         "(at least 2 timesteps); use final_step='euler'")
    step = METHODS[method].step
    at_s_2 = {}  # the last evaluation at σ_2, the level before σ_1

    def eps(x, s):
        e = eps_at_sigma(model, schedule, x, s)
        if extrapolate and s == sigmas[-3]:
            at_s_2["D"] = x - s * e
        return e

    history: list = []
    pairs = list(zip(sigmas[:-1], sigmas[1:]))
    for s, s_next in tqdm(pairs, desc=method, leave=False) if progress else pairs:
        x_bar = step(eps, x_bar, s, s_next, history)
    if extrapolate:  # every method's last step returned D_1, the x_0 prediction at σ_1
        x_bar = extrapolated_x0(x_bar, at_s_2["D"], sigmas[-2], sigmas[-3])
    return x_bar


def solve_adaptive(model: Model, x_bar: Tensor, schedule: Schedule, sigma_start: float, sigma_end: float, *,
                   method: str = "dopri5", rtol: float = ADAPTIVE_RTOL, atol: float = ADAPTIVE_ATOL) -> tuple[Tensor, int]:
    """Integrate Eq 14 from ``sigma_start`` to ``sigma_end`` with torchdiffeq's adaptive ``method``.

    Returns (x̄ at sigma_end, the number of model evaluations used).
    """
    from torchdiffeq import odeint

    if method not in ADAPTIVE:
        raise ValueError(f"method must be one of torchdiffeq's adaptive solvers {ADAPTIVE}, got {method!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol!r}, atol={atol!r}")
    f = probability_flow(model, schedule)
    span = torch.tensor([sigma_start, sigma_end], dtype=x_bar.dtype)  # torchdiffeq keeps time in y's dtype
    # step_t makes the solver land on sigma_end instead of stepping past it and interpolating:
    # beyond the schedule's noise levels the model is not defined.
    out = odeint(f, x_bar, span, method=method, rtol=rtol, atol=atol, options={"step_t": span})
    return out[-1], f.nfe


def noise_levels(schedule: Schedule, timesteps, method: str) -> list[float]:
    """σ(τ_S) > … > σ(τ_1) for a method, after checking τ is long enough for it."""
    tau = schedule.check_timesteps(timesteps)
    if (method.startswith("dpmpp_") or method == "unipc") and len(tau) < 2:
        raise ValueError(f"timesteps must have at least 2 entries for the multistep method {method!r}")
    return schedule.sigma(tau).flip(0).tolist()


@torch.no_grad()
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
    rtol: float = ADAPTIVE_RTOL,
    atol: float = ADAPTIVE_ATOL,
    **options,
) -> Tensor:
    """Sample x_0 from ``x_T`` along the increasing timesteps τ_1 < … < τ_S with ``method``.

    ``method`` is an Eq 12 sampler (``"ddim"``, ``"sigma_hat"``), an ODE method of ``METHODS``,
    or one of torchdiffeq's adaptive solvers (``ADAPTIVE``, using ``rtol``/``atol`` and only τ_S
    and τ_1 from ``timesteps``). ``eta`` is DDIM's η (Eq 16; only for ``"ddim"``). ``options``
    go to the method (``clip_x0`` for the Eq 12 samplers, ``final_step`` for the ODE methods, see
    :func:`integrate`; ``progress``). With
    ``return_trajectory=True`` (Eq 12 samplers) the result is the stack [S+1, B, …] of
    x_{τ_S} = x_T, …, x_0.
    """
    check_x(x_T)
    if method in SAMPLERS:
        extra = {"eta": eta} if method == "ddim" else {}
        if method != "ddim" and eta != 0.0:
            raise ValueError(f"eta applies to method 'ddim' only; method {method!r} got eta={eta!r}")
        if "final_step" in options:
            raise ValueError(f"final_step applies to the ODE methods {sorted(METHODS)}; method {method!r} ends with "
                             "its own last step (for η = 0 the same as 'euler')")
        steps = SAMPLERS[method](model, x_T, schedule, timesteps, generator=generator, **extra, **options)
        return run_steps(x_T, steps, return_trajectory)
    if method not in METHODS and method not in ADAPTIVE:
        raise ValueError(f"method must be one of {sorted([*SAMPLERS, *METHODS, *ADAPTIVE])}, got {method!r}")
    if eta != 0.0:
        raise ValueError(f"eta applies to method 'ddim' only; the ODE method {method!r} got eta={eta!r}")
    if return_trajectory:
        raise ValueError("return_trajectory is available for the Eq 12 samplers ('ddim', 'sigma_hat') only")
    sigmas = noise_levels(schedule, timesteps, method)
    x_bar = x_T * math.sqrt(1 + sigmas[0] ** 2)  # x̄ = x / sqrt(ᾱ)
    if method in ADAPTIVE:
        if options.get("final_step", "euler") != "euler":
            raise ValueError(f"final_step={options['final_step']!r} needs a fixed grid; the adaptive solver {method!r} "
                             "ends with the Euler step (use a method of METHODS)")
        x_bar, _ = solve_adaptive(model, x_bar, schedule, sigmas[0], sigmas[-1], method=method, rtol=rtol, atol=atol)
        sigmas = sigmas[-1:]
    return integrate(model, x_bar, schedule, [*sigmas, 0.0], method if method in METHODS else "euler", **options)


@torch.no_grad()
def encode(model: Model, x0: Tensor, schedule: Schedule, timesteps, method: str = "euler", *,
           fixed_point_iterations: int = 3, progress: bool = False) -> Tensor:
    """DDIM inversion: integrate Eq 14 upwards, from x_0 (σ = 0) to x_T at σ(τ_S) (Section 4.3).

    The model is not defined at σ = 0, so the first step, 0 → σ(τ_1), inverts :func:`sample`'s
    last Euler step exactly, solving ``x̄_1 = x_0 + σ_1 ε_θ(x̄_1, σ_1)`` by fixed-point iteration
    (a contraction for small σ_1). The remaining steps use ``method``, each evaluating ε at the
    noise levels the method prescribes (not the ε(x_t, t+Δ) shortcut). ``sample`` with the same
    method and timesteps maps the result back to x_0 up to the discretisation error.
    """
    check_x(x0)
    if not isinstance(fixed_point_iterations, int) or fixed_point_iterations < 1:
        raise ValueError(f"fixed_point_iterations must be a positive int, got {fixed_point_iterations!r}")
    sigmas = noise_levels(schedule, timesteps, method)[::-1]  # increasing
    x_bar = x0
    for _ in range(fixed_point_iterations):
        x_bar = x0 + sigmas[0] * eps_at_sigma(model, schedule, x_bar, sigmas[0])
    x_bar = integrate(model, x_bar, schedule, sigmas, method, progress=progress) if len(sigmas) > 1 else x_bar
    return x_bar / math.sqrt(1 + sigmas[-1] ** 2)
