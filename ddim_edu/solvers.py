"""Sampling and ODE solving: ``sample(model, x_T, schedule, timesteps, method=...)``.

Two families, one entry point. The Eq 12 samplers of :mod:`ddim_edu.sampling` (``"ddim"`` with
any η, ``"sigma_hat"``) walk the discrete τ. The ODE methods integrate Eq 14,
``dx̄/dσ = ε_θ(x̄/sqrt(σ²+1), t(σ))`` (:mod:`ddim_edu.ode`), over the noise levels
σ(τ_S) > … > σ(τ_1) > 0; ``timesteps`` may then be fractional. Every method starts at τ_S,
where ``x_T`` is fed in, and returns x_0: the last step goes from σ(τ_1) to σ = 0 (ᾱ = 1), where
the model cannot be evaluated, so every method takes it as an Euler step (= DDIM's last step), or,
with ``final_step="extrapolate"``, extrapolates the last two x_0 predictions to σ = 0 in σ², or,
with ``final_step="gaussian"``, follows the exact path of the Gaussian the last two evaluations fit.

**The step protocol.** ``METHODS`` maps each ODE method's name to a :class:`Method`: its step
function, its order, and where it evaluates the model. A step ``step(x, s, s_next, history)``
advances the scaled state x̄ from noise level ``s`` to ``s_next``. ``history`` is a list of
:class:`Evaluation` records (σ, x̄, ε and the x_0 prediction D = x̄ - σ ε), one per grid level,
the last three kept: on entry ``history[-1]`` is the evaluation at ``s``, made by the driver on
x̄ itself, or, for the predictor–corrector methods (``Method.reuses_last``), the one the previous
step made at its predicted state and appended. A step that needs ε elsewhere is a generator:
``eps = yield x, sigma`` asks for ε_θ(x, σ). Written so, one step serves both ways of running a
solver: :func:`integrate` answers the requests by calling a field ε(x̄, σ), and
:class:`ddim_edu.interop.DiffusersScheduler` answers them with the outputs a diffusers pipeline
hands it. ``Method.stages`` declares the noise levels of a step's extra evaluations, so the
σ → t conversions of a whole solve are made once (:class:`ddim_edu.model.EpsField`) and the
evaluation count is known before the solve (:meth:`Method.nfe`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from types import GeneratorType

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .forward import check_eta
from .model import EpsField, Field, Model, is_finite
from .ode import probability_flow
from .sampling import check_x, ddim_requests, drive, run_steps, sigma_hat_requests
from .schedules import Schedule
from .sde import VPSDE

__all__ = [
    "ADAPTIVE",
    "ADAPTIVE_ATOL",
    "ADAPTIVE_RTOL",
    "ConvergenceError",
    "Evaluation",
    "FINAL_STEPS",
    "INVERSIONS",
    "METHODS",
    "METHOD_GROUPS",
    "Method",
    "SAMPLERS",
    "answer",
    "check_inversion",
    "check_model",
    "check_options",
    "dpm_solver_2_step",
    "dpm_solver_3_stages",
    "dpm_solver_3_step",
    "dpmpp_2m_step",
    "dpmpp_3m_stages",
    "dpmpp_3m_step",
    "encode",
    "end_stage",
    "euler_step",
    "euler_step_",
    "euler_t_step",
    "extrapolated_x0",
    "fixed_point",
    "gaussian_x0",
    "heun_step",
    "integrate",
    "lambda_midpoint",
    "method_listing",
    "no_stages",
    "pc_sigma_step",
    "pilot_profile",
    "rk4_stages",
    "rk4_step",
    "sample",
    "sample_euler_t",
    "sigma_polynomial_weights",
    "sigma_rate",
    "solve",
    "solve_adaptive",
    "unipc_step",
]

SAMPLERS = {  # the Eq 12 samplers, as request generators (ddim_edu.sampling)
    "ddim": ddim_requests,  # Eq 12 with σ(η) of Eq 16: η = 0 DDIM, η = 1 DDPM
    "sigma_hat": sigma_hat_requests,  # Table 1's σ̂ row, as the reference code realises it
}


@dataclass(eq=False)
class Evaluation:
    """One model evaluation on Eq 14: at noise level ``sigma`` and scaled state ``x`` (x̄), ``eps`` = ε_θ(x̄, σ)."""

    sigma: float
    x: Tensor
    eps: Tensor
    _denoised: Tensor | None = field(default=None, repr=False)

    @property
    def denoised(self) -> Tensor:
        """D = x̄ - σ ε, the x_0 prediction (Eq 9 in the scaled state, since x̄ = x_0 + σ ε); computed once."""
        if self._denoised is None:
            self._denoised = torch.add(self.x, self.eps, alpha=-self.sigma)
        return self._denoised


# --- where the steps evaluate the model (besides the start of the step) --------------------------


def no_stages(s: float, s_next: float, first: bool) -> tuple[float, ...]:
    """A one-evaluation step: only the evaluation at its start."""
    return ()


def end_stage(s: float, s_next: float, first: bool) -> tuple[float, ...]:
    """One more evaluation at the end of the step (none on the last step, to σ' = 0)."""
    return (s_next,) if s_next > 0 else ()


def rk4_stages(s: float, s_next: float, first: bool) -> tuple[float, ...]:
    """The classical Runge–Kutta stages: the midpoint in σ twice, then the end."""
    if s_next == 0:
        return ()
    mid = s + 0.5 * (s_next - s)
    return mid, mid, s_next


def lambda_midpoint(s: float, s_next: float, first: bool) -> tuple[float, ...]:
    """The midpoint in -log σ (Lu et al.'s λ), sqrt(σ σ') (DPM-Solver-2's r₁ = ½)."""
    return (math.sqrt(s * s_next),) if s_next > 0 else ()


def dpm_solver_3_stages(s: float, s_next: float, first: bool) -> tuple[float, ...]:
    """DPM-Solver-3's intermediate levels σ e^{-r h}, r = ⅓, ⅔, h = log(σ/σ') (Lu et al. 2022, Algorithm 2)."""
    if s_next == 0:
        return ()
    h = math.log(s / s_next)
    return s * math.exp(-h / 3), s * math.exp(-2 * h / 3)


def dpmpp_3m_stages(s: float, s_next: float, first: bool) -> tuple[float, ...]:
    """DPM-Solver++(3M) starts with a DPM-Solver-2 step (the midpoint in -log σ); later steps evaluate once."""
    return lambda_midpoint(s, s_next, first) if first else ()


# --- step functions on Eq 14 (x is the scaled state x̄, s the noise level σ) ---------------------


def euler_step(x, s, s_next, history):
    """Euler's method on Eq 14 in σ: ``x̄' = x̄ + (σ' - σ) ε_θ(x̄, σ)``. This is DDIM (Eq 13)."""
    return torch.add(x, history[-1].eps, alpha=s_next - s)


def euler_step_(x, s, s_next, history):
    """:func:`euler_step` written into ``x``, for a solve whose states nobody else holds (no new tensor)."""
    return x.add_(history[-1].eps, alpha=s_next - s)  # x̄ += (σ' - σ) ε_θ(x̄, σ)


def heun_step(x, s, s_next, history):
    """Heun's 2nd-order method in σ (Karras et al. 2022, Algorithm 1 without churn); Euler to σ' = 0."""
    e = history[-1].eps
    x_euler = torch.add(x, e, alpha=s_next - s)  # Euler predictor
    if s_next == 0:
        return x_euler
    e_next = yield x_euler, s_next
    return x + (s_next - s) * 0.5 * (e + e_next)  # trapezoidal corrector


def rk4_step(x, s, s_next, history):
    """The classical 4th-order Runge–Kutta method in σ (stages at σ, twice the midpoint, σ'); Euler to σ' = 0."""
    k1 = history[-1].eps
    if s_next == 0:
        return torch.add(x, k1, alpha=-s)
    h = s_next - s
    s_mid, _, _ = rk4_stages(s, s_next, False)
    k2 = yield x + 0.5 * h * k1, s_mid
    k3 = yield x + 0.5 * h * k2, s_mid
    k4 = yield x + h * k3, s_next
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def dpm_solver_2_step(x, s, s_next, history):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r₁ = ½) in -log σ; Euler to σ' = 0.

    In (σ, x̄) the exponential integrator reads ``x̄' = x̄ + (σ' - σ) ε(u, σ_mid)`` with the
    midpoint in -log σ, ``σ_mid = sqrt(σ σ')``, and u its DPM-Solver-1 (= Euler = DDIM) predictor.
    """
    e = history[-1].eps
    if s_next == 0:
        return torch.add(x, e, alpha=-s)
    (s_mid,) = lambda_midpoint(s, s_next, False)
    e_mid = yield x + (s_mid - s) * e, s_mid
    return x + (s_next - s) * e_mid


def dpm_solver_3_step(x, s, s_next, history):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 2, r₁ = ⅓, r₂ = ⅔), noise-prediction form; Euler to σ' = 0.

    With h = log(σ/σ') and σ_r = σ e^{-rh}, the paper's σ_r (e^{rh} - 1) ε becomes (σ - σ_r) ε in x̄.
    """
    e = history[-1].eps
    if s_next == 0:
        return torch.add(x, e, alpha=-s)
    r1, r2 = 1 / 3, 2 / 3
    h = math.log(s / s_next)
    s1, s2 = dpm_solver_3_stages(s, s_next, False)
    d1 = (yield x + (s1 - s) * e, s1) - e
    u2 = x + (s2 - s) * e - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * d1
    d2 = (yield u2, s2) - e
    return x + (s_next - s) * e - s_next / r2 * (math.expm1(h) / h - 1) * d2


def dpmpp_2m_step(x, s, s_next, history):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep on the x_0 prediction D = x̄ - σ ε.

    ``x̄' = (σ'/σ) x̄ + (1 - σ'/σ) D̂``, ``D̂ = (1 + 1/(2r)) D_i - D_{i-1}/(2r)``, r = h_{i-1}/h_i in
    u = -log σ; first order (D̂ = D_i, i.e. DDIM) on the first step and on the last, to σ' = 0.
    """
    d = history[-1].denoised
    rho = s_next / s
    x_next = torch.lerp(d, x, rho)  # ρ x̄ + (1 - ρ) D_i: DDIM
    if len(history) < 2 or s_next == 0:
        return x_next
    prev = history[-2]
    r = math.log(prev.sigma / s) / math.log(s / s_next)
    # + (1 - ρ)(D̂ - D_i) = (1 - ρ)(D_i - D_{i-1}) / (2r)
    return x_next.add_(d, alpha=(1 - rho) / (2 * r)).add_(prev.denoised, alpha=-(1 - rho) / (2 * r))


def dpmpp_3m_step(x, s, s_next, history):
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep, third order) on the x_0 prediction D = x̄ - σ ε.

    In u = -log σ (Lu et al.'s λ), Eq 14 reads dx̄/du = D - x̄, so x̄(u+h) = e^{-h} x̄ + ∫₀ʰ e^{-(h-r)} D(u+r) dr.
    With D expanded to second order, its derivatives taken from the last three predictions
    (d₁ ≈ h D', d₂ ≈ h² D''/2 by divided differences on the uneven grid in u), the integral gives
    ``x̄' = e^{-h} x̄ + (1 - e^{-h}) D_i + φ₂ d₁ + (1 - 2φ₂/h) d₂``, φ₂ = 1 - (1 - e^{-h})/h.
    (Widely used code weights d₂ by ½ - φ₂/h, half the exact weight; measured on Eq 14 that gives
    order ≈ 2.4 instead of 3, see tests/test_solvers.py.) The first step is DPM-Solver-2 (one extra evaluation) and the
    second uses two predictions, so that the start-up errors are O(h³) and the method is of third
    order; the last step, to σ' = 0, is first order.
    """
    current = history[-1]
    d = current.denoised
    if s_next == 0:
        return d
    if len(history) == 1:  # start-up: DPM-Solver-2's step through the midpoint in -log σ
        (s_mid,) = dpmpp_3m_stages(s, s_next, True)
        e_mid = yield x + (s_mid - s) * current.eps, s_mid
        return x + (s_next - s) * e_mid
    x_next = (s_next / s) * x + (1 - s_next / s) * d
    h = math.log(s / s_next)
    phi_2 = math.expm1(-h) / h + 1
    p1 = history[-2]
    r0 = math.log(p1.sigma / s) / h
    d1_0 = (d - p1.denoised) / r0
    if len(history) == 2:
        return x_next + phi_2 * d1_0
    p2 = history[-3]
    r1 = math.log(p2.sigma / p1.sigma) / h
    d1_1 = (p1.denoised - p2.denoised) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return x_next + phi_2 * d1 + (1 - 2 * phi_2 / h) * d2


def unipc_step(x, s, s_next, history):
    """UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2"), on the x_0 prediction D = x̄ - σ ε.

    Like :func:`dpmpp_3m_step` it integrates dx̄/du = D - x̄ (u = -log σ), x̄' = e^{-h} x̄ + (1 - e^{-h}) D_i + (the
    integral of D's change), but evaluates the model at the *end* of each step. The predictor
    (UniP-2) takes D's slope from (D_{i-1}, D_i) with weight B(h)/2 = (1 - e^{-h})/2 in units of u,
    which equals the exact weight φ₂ to O(h²). Then D' = D(x̄', σ') fits a quadratic through
    (D_{i-1}, D_i, D') and the corrector (UniC) recomputes x̄' with it integrated exactly (the
    solution of UniC's linear system, whatever B(h)). D' is reused by the next step
    (``reuses_last``), so the corrector costs no evaluation: order 3 for one evaluation per step.
    On the first step the predictor is DDIM and the corrector weights D' - D_i by B(h)/2 (UniC-1).
    The last step, to σ' = 0, returns D_i. This is diffusers' ``UniPCMultistepScheduler`` at its defaults.
    """
    d = history[-1].denoised
    if s_next == 0:
        return d
    h = math.log(s / s_next)
    phi_2 = math.expm1(-h) / h + 1
    b_half = -math.expm1(-h) / 2  # B(h)/2 in the units of dx̄/du = D - x̄
    base = torch.lerp(d, x, s_next / s)  # (σ'/σ) x̄ + (1 - σ'/σ) D_i, DDIM
    prev = history[-2] if len(history) >= 2 else None
    if prev is not None:
        r0 = math.log(prev.sigma / s) / h  # the previous point sits at u = -r0 in units of h
        x_pred = torch.add(base, d, alpha=b_half / r0).add_(prev.denoised, alpha=-b_half / r0)  # UniP-2
    else:
        x_pred = base  # DDIM
    end = Evaluation(s_next, x_pred, (yield x_pred, s_next))
    history.append(end)  # the next step's start
    d_next = end.denoised
    if prev is None:
        return torch.add(base, d_next, alpha=b_half).add_(d, alpha=-b_half)  # UniC-1
    # D(u) = D_i + a u + b u² through u = -r0, 0, 1, integrated exactly (see dpmpp_3m_step):
    # b = ((D_{i-1} - D_i) + r0 (D' - D_i)) / (r0 (1 + r0)), a = D' - D_i - b, and
    # x̄' = base + φ₂ a + (1 - 2φ₂/h) b, expanded into one weight per prediction.
    c = (1 - 2 * phi_2 / h - phi_2) / (r0 * (1 + r0))  # the weight of b's numerator
    return base.add_(d_next, alpha=phi_2 + c * r0).add_(d, alpha=-phi_2 - c * (1 + r0)).add_(prev.denoised, alpha=c)


def sigma_polynomial_weights(nodes: list[float], rho: float) -> list[float]:
    """Weights w_j with ``∫_σ^{σ'} D(u)/u² du = (1/σ) Σ_j w_j D_j`` for D the polynomial in u through
    the nodes ``(σ_j, D_j)``, given as ``nodes = [σ_j/σ]`` and ``rho = σ'/σ``.

    In v = u/σ, ∫ v^k / v² dv from 1 to ρ is 1 - 1/ρ, log ρ and ρ - 1 for k = 0, 1, 2; the weights
    solve the transposed Vandermonde system Σ_j w_j v_j^k = (moment k) of the nodes against those
    moments (at most 3×3, by Gaussian elimination in Python floats: no tensor work per step).
    """
    n = len(nodes)
    rows = [[v**k for v in nodes] + [m] for k, m in enumerate([1 - 1 / rho, math.log(rho), rho - 1][:n])]
    for col in range(n):  # elimination with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
    w = [0.0] * n
    for r in range(n - 1, -1, -1):
        w[r] = (rows[r][n] - sum(rows[r][c] * w[c] for c in range(r + 1, n))) / rows[r][r]
    return w


def pc_sigma_step(x, s, s_next, history):
    """UniPC's predictor–corrector scheme with D = x̄ - σ ε interpolated in σ instead of -log σ (this library's).

    Eq 14 as dx̄/dσ = (x̄ - D)/σ has the integrating factor 1/σ: exactly,
    ``x̄' = (σ'/σ) x̄ - σ' ∫_σ^{σ'} D(u)/u² du``. The predictor takes D linear in σ through
    (σ_{i-1}, D_{i-1}), (σ_i, D_i); the corrector, quadratic through those and D' evaluated at the
    predicted x̄' (reused by the next step): order 3 for one evaluation per step, the first step
    DDIM then a linear corrector. Along Eq 14, D tends to x_0 as x_0 + cσ² at small σ, where a
    polynomial in -log σ would need ever higher degrees to follow it; on the mixture benchmark
    this roughly halves UniPC's error at 10 evaluations. The last step, to σ' = 0, returns D_i.
    """
    if s_next == 0:
        return history[-1].denoised
    rho = s_next / s

    def advance(nodes):  # x̄' = ρ (x̄ - Σ_j w_j D_j)
        weights = sigma_polynomial_weights([s_j / s for s_j, _ in nodes], rho)
        out = torch.add(x, nodes[0][1], alpha=-weights[0])
        for w, (_, d_j) in zip(weights[1:], nodes[1:]):
            out.add_(d_j, alpha=-w)
        return out.mul_(rho)

    nodes = [(e.sigma, e.denoised) for e in history[-2:]]
    x_pred = advance(nodes)  # predictor: D linear in σ
    end = Evaluation(s_next, x_pred, (yield x_pred, s_next))
    history.append(end)  # the next step's start
    return advance([*nodes, (s_next, end.denoised)])  # corrector: D quadratic in σ


@dataclass(frozen=True)
class Method:
    """An ODE method on Eq 14: its step (see the module docstring), its order, and where it evaluates the model.

    ``stages(s, s_next, first)``: the noise levels of a step's evaluations besides its start
    (``first``: the solve's first step). ``reuses_last``: the start of each step after the first
    reuses the evaluation the previous step made last (the predictor–corrector methods).
    ``min_timesteps``: the fewest timesteps τ the method takes. ``multistep``: a step reads evaluations
    made at earlier (higher) levels besides its own start, so it cannot be run, or inverted, alone
    (every method that ``reuses_last`` is multistep). ``step_in_place``: the same step writing x̄'
    into the x̄ it is given, which it may when nothing reads that x̄ afterwards (see :func:`solve`);
    it saves one new state tensor per step, which on images is most of a step's own cost.
    """

    step: Callable
    order: int
    stages: Callable[[float, float, bool], tuple[float, ...]] = no_stages
    reuses_last: bool = False
    min_timesteps: int = 1
    multistep: bool = False
    step_in_place: Callable | None = None

    def levels(self, sigmas: Sequence[float]) -> list[float]:
        """The noise level of every model evaluation, in order, of a solve along the grid ``sigmas``."""
        out = []
        for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            if i == 0 or not self.reuses_last:
                out.append(s)
            out.extend(self.stages(s, s_next, i == 0))
        return out

    def nfe(self, S: int) -> int:
        """Model evaluations for S timesteps: S - 1 steps between them, then the last one to σ = 0."""
        return len(self.levels([float(S - i) for i in range(S)] + [0.0]))

    def steps_for(self, budget: int, minimum: int = 1) -> int:
        """The most timesteps S (at least ``minimum``) whose solve costs at most ``budget`` evaluations.

        NFE grows with S for every method, so this is where ``nfe`` first exceeds the budget, less one;
        comparing methods at equal cost means giving each ``steps_for`` the same budget.
        """
        minimum = max(minimum, self.min_timesteps)
        if self.nfe(minimum) > budget:
            raise ValueError(f"budget {budget} is below the {self.nfe(minimum)} evaluations of {minimum} timesteps")
        S = minimum
        while self.nfe(S + 1) <= budget:
            S += 1
        return S


METHODS = {
    "euler": Method(euler_step, 1, step_in_place=euler_step_),
    "heun": Method(heun_step, 2, end_stage),
    "rk4": Method(rk4_step, 4, rk4_stages),
    "dpm_solver_2": Method(dpm_solver_2_step, 2, lambda_midpoint),
    "dpm_solver_3": Method(dpm_solver_3_step, 3, dpm_solver_3_stages),
    "dpmpp_2m": Method(dpmpp_2m_step, 2, multistep=True),
    "dpmpp_3m": Method(dpmpp_3m_step, 3, dpmpp_3m_stages, multistep=True),
    "unipc": Method(unipc_step, 3, end_stage, reuses_last=True, multistep=True),
    "pc_sigma": Method(pc_sigma_step, 3, end_stage, reuses_last=True, multistep=True),
}

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's adaptive solvers
ADAPTIVE_RTOL = ADAPTIVE_ATOL = 1e-5  # their default tolerances here

METHOD_GROUPS = {  # the names by family (METHODS as it stands: a method registered later is listed too)
    "Eq 12 samplers": SAMPLERS,
    "ODE methods (Eq 14)": METHODS,
    "adaptive ODE solvers (torchdiffeq)": ADAPTIVE,
}

# How the last step, σ(τ_1) → 0, is taken, and the fewest timesteps each needs.
FINAL_STEPS = {"euler": 1, "extrapolate": 2, "gaussian": 2}


def check_model(model, schedule) -> None:
    """Refuse a model that cannot be called and a schedule that is not a :class:`Schedule`."""
    if not callable(model):
        raise ValueError(f"model must be a callable model(x, t) -> ε (see ddim_edu.model), got {type(model).__name__}")
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a ddim_edu.schedules.Schedule (e.g. linear_schedule()), got {type(schedule).__name__}")


def method_listing() -> str:
    """The valid method names, by family."""
    return "; ".join(f"{group}: {', '.join(names)}" for group, names in METHOD_GROUPS.items())


def check_options(method: str, n_timesteps: int | None = None, *, eta: float = 0.0, clip_x0: float | None = None,
                  final_step: str = "euler", rtol: float | None = None, atol: float | None = None,
                  return_trajectory: bool = False) -> None:
    """Refuse an unknown method (listing the valid names), an option the method does not take (naming
    the methods that take it), a bad value, and fewer timesteps than the method and final step need."""
    if method not in SAMPLERS and method not in METHODS and method not in ADAPTIVE:
        raise ValueError(f"unknown method {method!r}. Valid methods are {method_listing()}")
    check_eta(eta)
    if clip_x0 is not None and not (isinstance(clip_x0, (int, float)) and not isinstance(clip_x0, bool) and clip_x0 > 0):
        raise ValueError(f"clip_x0 must be a number > 0 (x_0 is clamped to [-clip_x0, clip_x0]; math.inf: no clipping) "
                         f"or None (the method's default), got {clip_x0!r}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {tuple(FINAL_STEPS)}, got {final_step!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tol!r}")
    takers = {  # option: (its value, the methods that take it)
        "eta": (eta != 0, ("ddim",)),
        "clip_x0": (clip_x0 is not None, tuple(SAMPLERS)),
        "final_step": (final_step != "euler", tuple(METHODS)),
        "rtol": (rtol is not None, ADAPTIVE),
        "atol": (atol is not None, ADAPTIVE),
        "return_trajectory": (bool(return_trajectory), (*SAMPLERS, *METHODS)),
    }
    for name, (given, methods) in takers.items():
        if given and method not in methods:
            raise ValueError(f"{name} applies to the methods {', '.join(methods)}; method {method!r} does not take it")
    if n_timesteps is not None:
        # an adaptive solver integrates from σ(τ_S) to σ(τ_1): two distinct timesteps
        need = max(METHODS[method].min_timesteps if method in METHODS else 2 if method in ADAPTIVE else 1,
                   FINAL_STEPS[final_step])
        if n_timesteps < need:
            raise ValueError(f"method {method!r} with final_step={final_step!r} needs at least {need} timesteps, got {n_timesteps}")


# --- integration ----------------------------------------------------------------------------------


def extrapolated_x0(d_1: Tensor, d_2: Tensor, s_1: float, s_2: float) -> Tensor:
    """x_0 from the x_0 predictions D_1 at σ_1 and D_2 at σ_2 > σ_1, extrapolated to σ = 0 in σ².

    Eq 14's field is odd in σ (ε = -σ ∇log p_σ, and p_σ depends on σ² only), so for data with a
    smooth density the solution x̄(σ) is even and so is D = x̄ - σ ε: D(σ) = x_0 + c σ² + O(σ⁴).
    The Euler (= DDIM) last step returns D_1, an error c σ_1²; the line through (σ_1², D_1) and
    (σ_2², D_2) cancels c, leaving O(σ_1² σ_2²), at no extra evaluation.
    """
    return d_1 + s_1**2 * (d_1 - d_2) / (s_2**2 - s_1**2)


def gaussian_x0(last: Evaluation, previous: Evaluation, x_bar: Tensor | None = None) -> Tensor:
    """x_0 from the last two evaluations (at σ_1 < σ_2), exact when the data are locally one Gaussian N(m, diag(a)).

    For such data (mean m, variance a, coordinate by coordinate) the x_0 prediction is
    D = m + (x̄ - m) a/(a + σ²) and ε = (x̄ - D)/σ = (x̄ - m) σ/(a + σ²), so D - a ε/σ = m at every
    (x̄, σ). Two evaluations give two such equations in the two unknowns, linear in a:

        a = (D_1 - D_2) / (ε_1/σ_1 - ε_2/σ_2),   m = D_1 - a ε_1/σ_1,

    and along Eq 14's exact path x̄(σ) - m ∝ sqrt(a + σ²), so x_0 = m + (x̄_1 - m) sqrt(a/(a + σ_1²)).
    No further evaluation is needed. The fit (m, a) describes the data, not the state it was read at,
    so the path may start from any state at σ_1: ``x_bar``, the solve's own x̄_1 (default: the state
    the last evaluation was made at, ``last.x``, which it is for a one-step method). A
    predictor–corrector method (unipc, pc_sigma) evaluates at its predicted x̄_1 and then corrects it
    with that evaluation; :func:`solve` starts from the corrected x̄_1, the method's own state at σ_1
    (what it returns when the solve stops there), so that the last step continues the solve's
    trajectory and carries its error, not the predictor's. Where the
    fit is not a Gaussian (a ≤ 0 or not finite: the sample still moves between modes, or ε does not
    change), a = 0 is taken, and the step is the Euler (= DDIM) step, x_0 = D_1. For mixtures whose
    modes are narrower than σ_1 the Euler step leaves an error of the order of a mode's width sqrt(a)
    (x_0 lies about sqrt(a) from m, D_1 almost at m); this step removes it once the sample has settled
    on a mode. On data that are not locally a diagonal Gaussian it keeps the Euler step's order 2 in
    σ_1: the fit matches D and ε/σ at the two levels, not how the data depart from a Gaussian, which
    enters at O(σ_1²) (measured on a smooth three-mode density: a quarter of Euler's error, where
    :func:`extrapolated_x0` reaches order 4). It is the last step for narrow modes, the extrapolation
    for smooth densities.
    """
    s_1, s_2 = last.sigma, previous.sigma
    slope = last.eps / s_1 - previous.eps / s_2  # ε/σ = (x̄ - m)/(a + σ²)
    a = (last.denoised - previous.denoised) / slope  # the mode's variance, per coordinate
    a = torch.where(torch.isfinite(a) & (a > 0), a, torch.zeros_like(a))  # no Gaussian fit: the Euler step
    mean = last.denoised - a * last.eps / s_1  # m = D - a ε/σ
    x_1 = last.x if x_bar is None else x_bar
    return mean + (x_1 - mean) * torch.sqrt(a / (a + s_1**2))  # the exact path from x̄_1 down to σ = 0


def solve(method: str, x_bar: Tensor, sigmas: Sequence[float], *, final_step: str = "euler",
          trajectory: list | None = None, progress: bool = False,
          own_states: bool = False) -> Generator[tuple[Tensor, float], Tensor, Tensor]:
    """One solve of Eq 14 along ``sigmas`` as a request generator: yields (x̄, σ), receives ε_θ(x̄, σ),
    returns x̄ at ``sigmas[-1]`` (see the module docstring). ``trajectory``, if a list, receives x̄
    after every step. ``final_step="extrapolate"`` replaces the last step's D_1 by :func:`extrapolated_x0`,
    ``"gaussian"`` by :func:`gaussian_x0` along the path from the solve's x̄_1 (a predictor–corrector
    method's corrected state, not the predicted one its last evaluation was made at).

    ``own_states=True`` says that the states are the solve's own, ``x_bar`` included: whoever answers
    the requests keeps no reference to the x̄ it is shown and returns an ε that is not x̄ (as
    :class:`ddim_edu.model.EpsField`, which hands the model a scaled copy). A method with a
    ``step_in_place`` then overwrites its state, unless a trajectory or a last step from two levels
    reads the states later. Without autograd only: an overwritten state may have been saved for backward.
    """
    m = METHODS[method]
    in_place = own_states and m.step_in_place is not None and trajectory is None and final_step == "euler"
    step = m.step_in_place if in_place else m.step
    history: list[Evaluation] = []
    pairs = list(zip(sigmas[:-1], sigmas[1:]))
    for s, s_next in tqdm(pairs, desc=method, leave=False) if progress else pairs:
        if not (m.reuses_last and history):
            history.append(Evaluation(s, x_bar, (yield x_bar, s)))  # the evaluation at the start of the step
        x_start = x_bar  # the state the step starts from (after the loop: the solve's x̄ at σ_1)
        out = step(x_bar, s, s_next, history)
        x_bar = (yield from out) if isinstance(out, GeneratorType) else out
        del history[:-3]  # the steps read at most the last three evaluations
        if trajectory is not None:
            trajectory.append(x_bar)
    if final_step != "euler":  # every method's last step returned D_1, the x_0 prediction at σ_1
        last, previous = history[-1], history[-2]
        x_bar = (extrapolated_x0(last.denoised, previous.denoised, last.sigma, previous.sigma)
                 if final_step == "extrapolate" else gaussian_x0(last, previous, x_start))  # from the corrected x̄_1
        if trajectory is not None:
            trajectory[-1] = x_bar
    return x_bar


def answer(requests: Generator, eps: Field):
    """Run a request generator to its end, answering each request (x, σ) with ``eps(x, σ)``; its return value."""
    try:
        x, s = next(requests)
        while True:
            x, s = requests.send(eps(x, s))
    except StopIteration as done:
        return done.value


def integrate(eps: Field, x_bar: Tensor, sigmas, method: str = "euler", *, final_step: str = "euler",
              progress: bool = False, trajectory: list | None = None) -> Tensor:
    """Integrate Eq 14, dx̄/dσ = ε(x̄, σ), in the scaled state x̄ along the noise levels ``sigmas`` (any direction).

    ``eps(x_bar, sigma)`` is the field: :class:`ddim_edu.model.EpsField` for a model in the native
    contract ``model(x, t)`` (give it ``METHODS[method].levels(sigmas)`` to convert every σ once),
    :func:`ddim_edu.model.denoiser_field` for an EDM / k-diffusion denoiser D(x̄, σ) over any σ
    range, or any callable. ``sigmas`` [N] is strictly monotone; the field is evaluated at every
    σ > 0 a method asks for, never at a final 0. Autograd stays on (to differentiate through a
    solve); :func:`sample` and :func:`encode` turn it off. A descent that ends at σ = 0 ends with
    the Euler step (``final_step="euler"``), or with :func:`extrapolated_x0` from the last two
    levels (``"extrapolate"``, needs N ≥ 3), or with :func:`gaussian_x0` from them (``"gaussian"``, N ≥ 3).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {tuple(FINAL_STEPS)}, got {final_step!r}")
    sigmas = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    steps = [b - a for a, b in zip(sigmas[:-1], sigmas[1:])]
    if not sigmas or not all(math.isfinite(s) and s >= 0 for s in sigmas) or not (
            all(h < 0 for h in steps) or all(h > 0 for h in steps)):
        raise ValueError(f"sigmas must be finite noise levels >= 0, strictly monotone, got {sigmas[:8]}")
    if final_step != "euler" and (len(sigmas) < 3 or sigmas[-1] != 0 or steps[0] > 0):
        raise ValueError(f"final_step={final_step!r} needs a descent to σ = 0 from at least two noise levels "
                         "(at least 2 timesteps); use final_step='euler'")
    return answer(solve(method, x_bar, sigmas, final_step=final_step, trajectory=trajectory, progress=progress), eps)


def solve_adaptive(model: Model, x_bar: Tensor, schedule: Schedule, sigma_start: float, sigma_end: float, *,
                   method: str = "dopri5", rtol: float = ADAPTIVE_RTOL, atol: float = ADAPTIVE_ATOL,
                   check_finite: bool = False) -> tuple[Tensor, int]:
    """Integrate Eq 14 from ``sigma_start`` to ``sigma_end`` with torchdiffeq's adaptive ``method``.

    Returns (x̄ at sigma_end, the number of model evaluations used).
    """
    from torchdiffeq import odeint

    if method not in ADAPTIVE:
        raise ValueError(f"method must be one of torchdiffeq's adaptive solvers {ADAPTIVE}, got {method!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol!r}, atol={atol!r}")
    f = probability_flow(model, schedule, check_finite=check_finite)
    span = torch.tensor([sigma_start, sigma_end], dtype=x_bar.dtype)  # torchdiffeq keeps time in y's dtype
    # step_t makes the solver land on sigma_end instead of stepping past it and interpolating:
    # beyond the schedule's noise levels the model is not defined.
    out = odeint(f, x_bar, span, method=method, rtol=rtol, atol=atol, options={"step_t": span})
    return out[-1], f.nfe


def _sample(model, x_T, schedule, tau, method, eta, generator, *, clip_x0, final_step, rtol, atol, return_trajectory,
            progress, check_finite) -> Tensor:
    """One run of :func:`sample` (arguments checked); ``check_finite`` checks every ε on the way."""
    if method in SAMPLERS:
        extra = {"eta": eta} if method == "ddim" else {}
        if clip_x0 is not None:  # None: the sampler's default
            extra["clip_x0"] = None if clip_x0 == math.inf else clip_x0
        requests = SAMPLERS[method](x_T, schedule, tau, generator=generator, **extra)
        bar = tqdm(total=len(tau), desc=method, leave=False) if progress else None
        steps = drive(model, requests, tau.flip(0).tolist(), check_finite=check_finite, progress=bar)
        return run_steps(x_T, steps, return_trajectory)
    sigmas = schedule.sigma(tau).flip(0).tolist()  # σ(τ_S) > … > σ(τ_1)
    known = dict(zip(sigmas, tau.flip(0).tolist()))  # exact timesteps on the grid
    x_bar = x_T * math.sqrt(1 + sigmas[0] ** 2)  # x̄ = x / sqrt(ᾱ)
    if method in ADAPTIVE:  # checked always: a NaN would otherwise stop torchdiffeq with a step size underflow
        x_bar, _ = solve_adaptive(model, x_bar, schedule, sigmas[0], sigmas[-1], method=method, check_finite=True,
                                  rtol=ADAPTIVE_RTOL if rtol is None else rtol, atol=ADAPTIVE_ATOL if atol is None else atol)
        sigmas, method = sigmas[-1:], "euler"
    grid = [*sigmas, 0.0]
    field = EpsField(model, schedule, METHODS[method].levels(grid), known, check_finite=check_finite)
    trajectory = [] if return_trajectory else None
    # x̄ is made here and the field shows the model only a scaled copy: the solve may overwrite its states. The
    # grid comes from checked timesteps, so the solve is run directly, without integrate()'s checks of it.
    x0 = answer(solve(method, x_bar, grid, final_step=final_step, trajectory=trajectory, progress=progress,
                      own_states=True), field)
    if return_trajectory:  # in the model's coordinates x = x̄ / sqrt(1 + σ²)
        return torch.stack([x_T, *(x / math.sqrt(1 + s**2) for x, s in zip(trajectory, grid[1:]))])
    return x0


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
    clip_x0: float | None = None,
    final_step: str = "euler",
    rtol: float | None = None,
    atol: float | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    """Sample x_0 from ``x_T`` along the timesteps τ (in either order; sampling runs from the largest) with ``method``.

    ``method`` is an Eq 12 sampler (``"ddim"``, ``"sigma_hat"``), an ODE method of ``METHODS``,
    or one of torchdiffeq's adaptive solvers (``ADAPTIVE``, using only τ_S and τ_1). Options, each
    refused by a method that does not take it: ``eta``, DDIM's η (Eq 16; ``"ddim"``); ``clip_x0``,
    clamp the x_0 prediction to [-c, c] (the Eq 12 samplers; None: the sampler's default, none for
    ``"ddim"`` and 1 for ``"sigma_hat"`` as the reference code; ``math.inf``: none); ``final_step``, how an ODE method takes its last step
    (:func:`integrate`); ``rtol``/``atol``, an adaptive solver's tolerances (default
    ``ADAPTIVE_RTOL``/``ADAPTIVE_ATOL``); ``return_trajectory``, the stack [S+1, B, …] of
    x_{τ_S} = x_T, …, x_{τ_1}, x_0 in the model's coordinates; ``progress``, a tqdm bar.

    The steps check no values on the way (no host synchronisation per step). The result is checked:
    if it holds NaN or inf, the run is repeated (with the same noise, when ``generator`` is given)
    checking x_T and every ε, and FloatingPointError names the first timestep where ε was not finite.
    """
    check_x(x_T)
    check_model(model, schedule)
    tau = schedule.check_timesteps(timesteps)
    check_options(method, len(tau), eta=eta, clip_x0=clip_x0, final_step=final_step, rtol=rtol, atol=atol,
                  return_trajectory=return_trajectory)
    state = generator.get_state() if generator is not None else None
    args = (model, x_T, schedule, tau, method, eta, generator)
    options = dict(clip_x0=clip_x0, final_step=final_step, rtol=rtol, atol=atol, return_trajectory=return_trajectory)
    out = _sample(*args, **options, progress=progress, check_finite=False)
    if is_finite(out[-1] if return_trajectory else out):
        return out
    # Find the cause: the same run, checking as it goes.
    if not is_finite(x_T):
        raise FloatingPointError("x_T has NaN or inf entries; the sample is not finite")
    if state is not None:
        generator.set_state(state)
    _sample(*args, **options, progress=False, check_finite=True)
    raise FloatingPointError(f"the sampled x_0 has NaN or inf although x_T and every ε_θ were finite: a step of "
                             f"{method!r} overflowed (check eta, clip_x0 and the timesteps)"
                             + ("" if state is not None or method not in ("ddim", "sigma_hat") else
                                "; or the re-run, without a generator, drew other noise"))


# --- a grid from the model's own trajectories ---------------------------------------------------


@torch.no_grad()
def pilot_profile(model: Model, schedule: Schedule, x_pilot: Tensor, *, levels: int = 60) -> tuple[Tensor, Tensor]:
    """Where Eq 14's solutions bend, measured on a pilot batch: ``(t, c)`` for ``schedule.timesteps(S, "equalised", profile=...)``.

    The pilot ``x_pilot`` [B, …] (a few draws of x_T ~ N(0, I), not the ones to be sampled) is
    carried from T-1 to t = 0 by DDIM (Euler in σ) on ``levels`` levels uniform in u = -log σ (the
    log signal-to-noise ratio); at each level the x_0 prediction D = x̄ - σ ε is recorded, and c is
    the RMS over the batch and the coordinates of the second difference quotient of D in u
    (d²D/du² to O(h²) on the uniform grid; at the two ends the neighbour's value). The pilot costs ``levels`` evaluations of the pilot batch,
    once per model: the grids for every S are then made from the profile at no further cost.
    """
    check_x(x_pilot, "x_pilot")
    check_model(model, schedule)
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 3:
        raise ValueError(f"levels must be an int >= 3, got {levels!r}")
    tau = schedule.timesteps(levels, "logsnr")  # uniform in u = -log σ from t = 0 to T-1
    sigmas = schedule.sigma(tau).flip(0).tolist()  # σ(T-1) > … > σ(0)
    field = EpsField(model, schedule, sigmas, dict(zip(sigmas, tau.flip(0).tolist())))
    predictions = []

    def recording(x_bar, sigma):
        eps = field(x_bar, sigma)
        predictions.append(Evaluation(sigma, x_bar, eps).denoised)  # D = x̄ - σ ε
        return eps

    x_end = integrate(recording, x_pilot * math.sqrt(1 + sigmas[0] ** 2), sigmas, "euler")
    recording(x_end, sigmas[-1])  # D at the last level
    d = torch.stack(predictions).flatten(1).double()  # [levels, B·dims], u increasing
    h = math.log(sigmas[0] / sigmas[1])  # the step in u
    second = (d[2:] - 2 * d[1:-1] + d[:-2]) / h**2  # d²D/du² at the interior levels
    c = second.pow(2).mean(dim=1).sqrt()
    c = torch.cat([c[:1], c, c[-1:]])  # the ends take their neighbours' values
    return tau, c.flip(0)  # t increasing


# --- Eq 14 written in the timestep t: the same field, another variable ----------------------------


def sigma_rate(schedule: Schedule, t) -> Tensor:
    """dσ/dt: how fast Eq 14's noise level σ(t) = sqrt((1-ᾱ(t))/ᾱ(t)) changes with the timestep t > -1 (float64).

    From σ² = 1/ᾱ - 1: d(σ²)/dt = -(1/ᾱ) d log ᾱ/dt = (1 + σ²) β(t), so ``dσ/dt = β(t) (1 + σ²) / (2σ)``,
    with β(t) = -d log ᾱ/dt of the schedule's continuous extension (:meth:`ddim_edu.sde.VPSDE.beta`:
    -log(1 - β_i) on the unit interval (i-1, i]; at an integer t, the interval below, which a step down crosses).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    s = schedule.sigma(t)
    return VPSDE(schedule).beta(t) * (1 + s**2) / (2 * s)


def euler_t_step(eps: Field, x_bar: Tensor, schedule: Schedule, t: float, t_next: float) -> Tensor:
    """One step of Euler's method on Eq 14 written in the timestep t: by the chain rule Eq 14 reads
    ``dx̄/dt = ε(x̄, σ(t)) · dσ/dt``, so ``x̄' = x̄ + (t' - t) · dσ/dt(t) · ε(x̄, σ(t))`` (:func:`sigma_rate`).

    The same field ``eps(x_bar, sigma)`` as Euler in σ (:func:`euler_step`, = DDIM), whose step is
    ``x̄ + (σ(t') - σ(t)) · ε``: the two move along the same ε, by the tangent (t' - t) σ'(t) here and by
    the chord σ(t') - σ(t) there.
    """
    s = float(schedule.sigma(float(t)))
    return torch.add(x_bar, eps(x_bar, s), alpha=(t_next - t) * float(sigma_rate(schedule, float(t))))


@torch.no_grad()
def sample_euler_t(model: Model, x_T: Tensor, schedule: Schedule, timesteps, *, return_trajectory: bool = False) -> Tensor:
    """Sample x_0 from ``x_T`` by Euler's method on Eq 14 written in the timestep t (:func:`euler_t_step`), along τ.

    The counterpart of ``sample(..., method="euler")`` (Euler in σ, = DDIM) for comparing the two on the same
    grid and the same model: one evaluation per timestep, steps in t from τ_S down to τ_1, then the last step to
    σ = 0 (ᾱ = 1), taken in σ as by every method of this module (there σ(t) ∝ sqrt(t + 1) has an infinite slope
    in t). Both are of first order; they differ in the error constant, since the trajectories of Eq 14 are
    nearly straight in σ and σ(t) is not linear in t. ``return_trajectory``: the stack [S+1, B, …] of x_{τ_S} = x_T,
    …, x_{τ_1}, x_0 in the model's coordinates.
    """
    check_x(x_T)
    check_model(model, schedule)
    tau = schedule.check_timesteps(timesteps).flip(0)  # τ_S > … > τ_1
    times, sigmas = tau.tolist(), schedule.sigma(tau).tolist()
    field = EpsField(model, schedule, sigmas, dict(zip(sigmas, times)))
    x_bar = x_T * math.sqrt(1 + sigmas[0] ** 2)  # x̄ = x / sqrt(ᾱ)
    xs = [x_T]
    for t, t_next, s_next in zip(times, times[1:], sigmas[1:]):
        x_bar = euler_t_step(field, x_bar, schedule, t, t_next)
        xs.append(x_bar / math.sqrt(1 + s_next**2))
    x_bar = torch.add(x_bar, field(x_bar, sigmas[-1]), alpha=-sigmas[-1])  # the last step, σ(τ_1) → 0, in σ
    return torch.stack([*xs, x_bar]) if return_trajectory else x_bar


# --- inversion ------------------------------------------------------------------------------------


class ConvergenceError(ArithmeticError):
    """An iteration did not reach its tolerance; the message gives the residual and what to change.

    Where the iteration ran on a batch, nothing is lost with it: ``x`` holds the result for every sample
    (for those that did not converge, the best iterate reached) and ``converged``, a bool tensor [B],
    says which samples reached the tolerance. Both are None where there is no batch result.
    """

    def __init__(self, message: str, x: Tensor | None = None, converged: Tensor | None = None):
        super().__init__(message)
        self.x, self.converged = x, converged


def _anderson_step(f: Tensor, dx: Tensor, df: Tensor) -> Tensor:
    """Anderson's step (type II, mixing 1; Walker & Ni 2011) from an iterate x with residual f = g(x) - x.

    Per sample: ``f`` is [B, n], the columns of ``dx`` [B, n, m] are earlier steps and those of ``df``
    the changes of the residual along them (zero columns: empty slots). The secant model of the
    residual, f(x - ΔX γ) ≈ f - ΔF γ, is least at γ = argmin ‖f - ΔF γ‖; the step goes to that point
    and one plain step on, x + p = (x - ΔX γ) + (f - ΔF γ). For a linear g with n independent steps in
    memory this is the fixed point. γ comes from the pseudo-inverse (an SVD, on every device), which
    gives empty and dependent columns no weight (a QR solve does not: LAPACK's ``gelsy``, the CPU
    default, returns γ = 0 for a sample with an empty column, and on a GPU ``gels`` assumes full rank).
    """
    gamma = torch.linalg.pinv(df) @ f.unsqueeze(2)  # γ = argmin ‖f - ΔF γ‖ per sample, [B, m, 1]
    return f - ((dx + df) @ gamma).squeeze(2)  # p = f - (ΔX + ΔF) γ


def _step_to_cut(x: Tensor, p: Tensor, z: Tensor, f_z: Tensor) -> Tensor:
    """The t [B] at which x + t p meets the cut ⟨f(z), y - z⟩ = 0 left by a trial z that overshot the root
    (f(z) = g(z) - z, [B, n]); inf where p does not head through it from the side x is on, or no cut (f_z = 0).

    When y ↦ y - g(y) is monotone, ⟨(y - g(y)) - (y' - g(y')), y - y'⟩ ≥ 0, the fixed point y* satisfies
    ⟨f(z), y* - z⟩ ≥ 0 for every z (take y' = y*): y* lies on the side of the plane through z that f(z)
    points to, and a step beyond the plane moves away from every solution.
    """
    heading = (f_z * p).sum(1)  # ⟨f(z), p⟩ < 0: p heads for the far side of the plane
    t = (f_z * (z - x)).sum(1) / heading  # ⟨f(z), x + t p - z⟩ = 0
    return torch.where((heading < 0) & (t > 0), t, math.inf)


def _push(columns: Tensor, new: Tensor, where: Tensor) -> Tensor:
    """``columns`` [B, n, m] with ``new`` [B, n] appended as the last column (the first dropped) in the samples ``where``."""
    return torch.where(where[:, None, None], torch.cat([columns[:, :, 1:], new.unsqueeze(2)], dim=2), columns)


def fixed_point(g: Callable[[Tensor], Tensor], x: Tensor, *, tol: float, max_iterations: int,
                memory: int = 5, held: Tensor | None = None) -> tuple[Tensor, int, float]:
    """Solve x = g(x) for a batch [B, …], each sample by Anderson acceleration with a safeguard.

    Plain iteration x ← g(x) converges at the rate of g's largest Jacobian eigenvalue, which for DDIM
    inversion is close to 1 (the step σ_a → σ_b of a narrow mode: ≈ 1 - σ_a/σ_b). Anderson's method
    (:func:`_anderson_step`) uses the last ``memory`` (at most the per-sample size n) accepted steps as a
    secant model and, for a linear g, converges in about n + 1 evaluations. For a nonlinear g its
    model can mislead: in DDIM inversion the solution of a hard step lies where the posterior over the
    data's modes starts to switch, the residual is flat on one side and steep on the other, and the
    secant step from the flat side lands far beyond, in the next mode. So each sample keeps an
    accepted iterate x and tries x + t p:

    - a trial is accepted when its residual ‖g - x‖ does not exceed the current one; its step joins the memory;
    - a rejected trial halves t (backtracking along p); if it overshot the root along p,
      ⟨g(z) - z, p⟩ < 0, its plane cuts later Anderson steps to half way (:func:`_step_to_cut`);
    - an Anderson direction that fails (not downhill, ⟨g(x) - x, p⟩ ≤ 0, or t below 1/5) is dropped with the
      memory, and the sample starts over with the plain step p = g(x) - x.

    The halving of the plain step always ends (accepted) when y ↦ y - g(y) is monotone with a positive
    definite Jacobian, which is the case of DDIM inversion with the exact ε (see :func:`encode`). Each
    sample stops at ‖g(x) - x‖ ≤ ``tol`` · ‖g(x)‖ and is held there while the others go on (its row is
    still evaluated with the batch). The samples where ``held`` (bool [B]) is true are not solved: they
    are returned as they are given. Returns (g(x) of every sample where it stopped, evaluations of g,
    the largest relative residual of the samples solved). After ``max_iterations`` evaluations raises
    :class:`ConvergenceError`, whose ``x`` holds that result for the samples that stopped, g(x) at the best
    iterate for the others, and whose ``converged`` says which stopped (held samples count as stopped).
    """
    B, shape = x.shape[0], x.shape
    held = torch.zeros(B, dtype=torch.bool, device=x.device) if held is None else held.to(x.device)

    def evaluate(y):  # g(y) and the residual f = g(y) - y, flattened, in float64
        g_y = g(y.reshape(shape).to(x.dtype)).reshape(B, -1).double()
        return g_y, g_y - y

    y = x.reshape(B, -1).double()
    g_y, f = evaluate(y)
    relative = torch.where(held, 0.0, f.norm(dim=1) / g_y.norm(dim=1).clamp_min(1e-300))
    done, out = held | (relative <= tol), torch.where(held[:, None], y, g_y)
    m = min(memory, y.shape[1])
    dx, df = y.new_zeros(*y.shape, m), y.new_zeros(*y.shape, m)  # accepted steps and residual changes
    filled = torch.zeros(B, dtype=torch.long, device=y.device)  # steps in memory
    z, f_z = torch.zeros_like(y), torch.zeros_like(y)  # the last trial that overshot, and its residual (none: 0)
    p, t = f, torch.ones_like(relative)
    fresh = torch.ones_like(done)  # a new direction is due (after an accepted trial or a dropped direction)
    k = 1  # evaluations of g
    while not bool(done.all()):
        if k == max_iterations:
            best = torch.where(done[:, None], out, y + f)  # g at the accepted iterate where a sample did not stop
            raise ConvergenceError(f"the fixed-point iteration did not converge: relative residual "
                                   f"{relative.max().item():.3g} after {max_iterations} evaluations (tol {tol:g})",
                                   best.reshape(shape).to(x.dtype), done.clone())
        k += 1
        anderson = filled > 0
        p = torch.where(fresh[:, None], _anderson_step(f, dx, df), p)
        cut = torch.where(anderson, 0.5 * _step_to_cut(y, p, z, f_z), math.inf)  # half way to the cut
        t = torch.where(fresh, cut.clamp(max=1.0), t)
        trial = torch.where(done[:, None], y, y + t[:, None] * p)  # stopped samples stay where they are
        g_t, f_t = evaluate(trial)
        relative_t = f_t.norm(dim=1) / g_t.norm(dim=1).clamp_min(1e-300)
        stops = ~done & (relative_t <= tol)
        out = torch.where(stops[:, None], g_t, out)
        accepted = ~done & ~stops & (f_t.norm(dim=1) <= f.norm(dim=1))  # the residual does not grow
        overshot = ~done & ~stops & ~accepted & ((f_t * p).sum(1) < 0)  # ⟨f(trial), p⟩ < 0: past the root along p
        z, f_z = torch.where(overshot[:, None], trial, z), torch.where(overshot[:, None], f_t, f_z)
        dx, df = _push(dx, trial - y, accepted), _push(df, f_t - f, accepted)
        filled = torch.where(accepted, (filled + 1).clamp(max=m), filled)
        moved = accepted | stops
        y, f = torch.where(moved[:, None], trial, y), torch.where(moved[:, None], f_t, f)
        relative = torch.where(moved, relative_t, relative)
        done = done | stops
        t = torch.where(accepted, t, 0.5 * t)  # backtrack along p
        dropped = ~done & ~accepted & anderson & ((fresh & ((f * p).sum(1) <= 0)) | (t < 0.2))
        dx, df = torch.where(dropped[:, None, None], 0.0, dx), torch.where(dropped[:, None, None], 0.0, df)
        filled = torch.where(dropped, 0, filled)
        t = torch.where(dropped, 1.0, t)
        fresh = accepted | dropped
    return out.reshape(shape).to(x.dtype), k, relative.max().item()


INVERSIONS = ("explicit", "exact")  # how encode takes its steps above the first (see encode)


def check_inversion(method: str, inversion: str) -> None:
    """Refuse an unknown ``inversion``, and ``inversion="exact"`` with a multistep method (see :func:`encode`)."""
    if inversion not in INVERSIONS:
        raise ValueError(f"inversion must be one of {INVERSIONS} ('explicit': the method's steps upwards; 'exact': "
                         f"each step solved so that sample's step maps it back), got {inversion!r}")
    if inversion == "exact" and METHODS[method].multistep:
        supported = [name for name, m in METHODS.items() if not m.multistep]
        raise ValueError(f"inversion='exact' supports the one-step methods {supported}, not {method!r}: {method!r} "
                         "is a multistep method, whose decoding step from σ_{i+1} to σ_i reads the evaluations at "
                         "the levels above σ_{i+1}, which the upward pass has not reached when it solves for x̄_{i+1}")


@torch.no_grad()
def encode(model: Model, x0: Tensor, schedule: Schedule, timesteps, method: str = "euler", *,
           inversion: str = "explicit", tol: float | None = None, max_iterations: int = 200,
           stats: dict | None = None, progress: bool = False) -> Tensor:
    """DDIM inversion: integrate Eq 14 upwards, from x_0 (σ = 0) to x_T at σ(τ_S) (Section 4.3).

    The model is not defined at σ = 0, so the first step, 0 → σ(τ_1), inverts :func:`sample`'s
    last (Euler) step exactly: it solves ``x̄_1 = x_0 + σ_1 ε_θ(x̄_1, σ_1)`` — the x_0 prediction at
    x̄_1 equals x_0 — by :func:`fixed_point` to the relative tolerance ``tol``, raising
    :class:`ConvergenceError` after ``max_iterations``. (Every one-step method's last step, to σ = 0,
    is that Euler step: it returns D = x̄_1 - σ_1 ε.) The default ``tol`` is a hundred times the dtype's
    machine epsilon with ``inversion="explicit"``, and with ``"exact"`` at least 1e-9 (below).

    The steps above it, σ_i → σ_{i+1}, depend on ``inversion``:

    - ``"explicit"`` (default): ``method``'s own steps, taken upwards, each evaluating ε at the noise
      levels the method prescribes (not the ε(x_t, t+Δ) shortcut). ``sample`` with the same method and
      timesteps maps the result back to x_0 up to the discretisation error of those steps (Eq 14 is
      integrated both ways, the errors do not cancel).
    - ``"exact"``: each step is the exact inverse of the step ``sample`` takes back down. Write Φ for
      the decoding step from σ_{i+1} to σ_i (the step function of ``method`` with its stages, and the
      same σ → t conversions as ``sample``'s). Encoding must give the x̄_{i+1} with Φ(x̄_{i+1}) = x̄_i,
      that is the fixed point of ``x̄_{i+1} = x̄_i - (Φ(x̄_{i+1}) - x̄_{i+1})``; for Euler (= DDIM,
      Eq 13) ``x̄_{i+1} = x̄_i + (σ_{i+1} - σ_i) ε_θ(x̄_{i+1}, σ_{i+1})``: the explicit step evaluates ε at
      the start, the inverse at the end. Each is solved by :func:`fixed_point` (safeguarded Anderson)
      from the explicit Euler step (ε at x̄_i known from the step below: no evaluation), the iteration
      scaled by the inverse of Φ's gain on Gaussian data of x_0's scale (:func:`_invert_steps`), to
      ``tol``, raising :class:`ConvergenceError` naming the step after ``max_iterations`` evaluations of Φ. Then
      ``sample(model, encode(...), schedule, timesteps, method)`` returns x_0 up to about ``tol``
      relative (a residual r in the decoded x̄_i reaches x_0 as about r relative to ‖x̄_i‖; measured
      at S = 10 on :func:`ddim_edu.evaluation.mixture_family.family`: at most 4e-9 with the default
      1e-9, for 82 % of the evaluations of tol = 100 eps), whatever S. Only one-step methods (not
      ``Method.multistep``: euler, heun, rk4, dpm_solver_2, dpm_solver_3) can be inverted so: a multistep
      method's decoding step reads evaluations at the levels above σ_{i+1}, not yet reached by the upward
      pass; they raise ValueError.

      For Euler with the exact ε every step has exactly one solution: in x̄, ε = -σ ∇ log p_σ, so
      Φ(y) = y + (σ_{i+1} - σ_i) σ_{i+1} ∇ log p_{σ_{i+1}}(y) is the gradient of ½‖y‖² +
      (σ_{i+1} - σ_i) σ_{i+1} log p_{σ_{i+1}}(y), whose Hessian ρ I + (1 - ρ) Cov[x_0 | y] / σ_{i+1}² ⪰ ρ I
      (ρ = σ_i / σ_{i+1}) is positive definite: Φ is strongly monotone, a bijection. The steps are hard
      nonetheless where the solution lies at the edge of a mode, the posterior over modes starting to
      switch: there the residual is flat (slope ≈ ρ) on the mode's side and steep beyond, which is what
      the safeguards of :func:`fixed_point` are for. A higher-order decoding step need not be onto:
      Heun's misses some x̄_i at S = 10 on narrow modes (Levenberg–Marquardt with exact Jacobians stalls
      there too, at residuals up to 0.8 relative), and :class:`ConvergenceError` is then the answer.

    Where some samples of the batch do not converge, the others are not lost: each failed sample keeps
    its best iterate, takes the explicit Euler step up at each later step (``"exact"``), and the encode
    goes on to the end, then raises :class:`ConvergenceError` naming the first step that failed. Its
    ``x`` holds x_T for every sample, its ``converged`` (bool [B]) marks those encoded to ``tol``.

    ``stats``, if a dict, receives ``"nfe"``, the model evaluations of the whole encode (each a call on
    the batch), and ``"iterations"``, the evaluations of the fixed-point map of each implicit step: the
    first step's, then with ``inversion="exact"`` one per step above it (one of Φ costs the method's
    evaluations per step, e.g. two for Heun).
    """
    check_x(x0, "x0")
    check_model(model, schedule)
    if method not in METHODS:
        raise ValueError(f"method must be one of the ODE methods {sorted(METHODS)}, got {method!r}")
    check_inversion(method, inversion)
    if not isinstance(max_iterations, int) or isinstance(max_iterations, bool) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
    if tol is None:  # exact: x_0 back to a few 1e-9 in float64, where 100 eps costs a fifth more evaluations
        eps_100 = 100 * torch.finfo(x0.dtype).eps
        tol = eps_100 if inversion == "explicit" else max(1e-9, eps_100)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"stats must be a dict (to receive the evaluation counts) or None, got {type(stats).__name__}")
    tau = schedule.check_timesteps(timesteps)
    sigmas = schedule.sigma(tau).tolist()  # increasing
    times = tau.tolist()
    levels = (METHODS[method].levels(sigmas[::-1] + [0.0]) if inversion == "exact"  # sample's own table
              else METHODS[method].levels(sigmas) + sigmas[:1])
    eps_field = EpsField(model, schedule, levels, dict(zip(sigmas, times)))
    nfe = 0

    def field(x_bar, sigma):
        nonlocal nfe
        nfe += 1
        return eps_field(x_bar, sigma)

    s_1 = sigmas[0]
    failures: list[str] = []  # the first failed step's message and advice
    try:
        x_bar, k, _ = fixed_point(lambda y: torch.add(x0, field(y, s_1), alpha=s_1), x0, tol=tol, max_iterations=max_iterations)
        failed = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    except ConvergenceError as err:
        failures.append(f"encode's first step (0 → σ(τ_1) = {s_1:.4g}): {err}; raise max_iterations or tol, "
                        "or start τ at a smaller timestep")
        x_bar, k, failed = err.x, max_iterations, ~err.converged
    iterations = [k]
    if len(sigmas) > 1 and inversion == "explicit":
        x_bar = integrate(field, x_bar, sigmas, method, progress=progress)
    elif len(sigmas) > 1:
        x_bar = _invert_steps(field, x0, x_bar, sigmas, times, method, tol=tol, max_iterations=max_iterations,
                              iterations=iterations, failed=failed, failures=failures, progress=progress)
    if stats is not None:
        stats.update(nfe=nfe, iterations=iterations)
    x_T = x_bar / math.sqrt(1 + sigmas[-1] ** 2)
    if failures:
        raise ConvergenceError(f"{failures[0]}. {int(failed.sum())} of {len(x0)} samples did not converge; the "
                               "error's x holds x_T for every sample (exact for those where its converged is true)",
                               x_T, ~failed)
    return x_T


def step_monotonicity(model: Model, schedule: Schedule, x_bar: Tensor, sigma_b: float, sigma_a: float, *,
                      chunk: int = 64) -> Tensor:
    """How monotone DDIM's step from σ_b down to σ_a < σ_b is at x̄ [B, …]: per sample, the smallest
    eigenvalue of the symmetric part (J + Jᵀ)/2 of the Jacobian J of Φ(y) = y + (σ_a - σ_b) ε_θ(y, σ_b).

    For the exact ε, J = ρ I + (1 - ρ) Cov[x_0 | y] / σ_b², ρ = σ_a / σ_b (:func:`encode`), so the
    value is at least ρ everywhere, and that makes Φ a bijection: exact inversion has one answer
    per step. A network's ε carries no such guarantee; a value below ρ (or below 0) at some x̄ says
    the argument does not hold for it there. Autograd, ``chunk`` samples at a time (Φ acts on each
    sample alone, so the Jacobian of its sum over a chunk holds every sample's); float64 eigenvalues.
    """
    if not 0 < sigma_a < sigma_b:
        raise ValueError(f"need 0 < sigma_a < sigma_b (a step down from sigma_b), got sigma_b={sigma_b}, sigma_a={sigma_a}")
    field = EpsField(model, schedule, [sigma_b])
    lowest = []
    for part in x_bar.split(chunk):
        def phi(y):  # Φ, sample's Euler step σ_b → σ_a, summed over the chunk: d(Σ_b Φ_b)_i / d y_b = (J_b)_i
            return answer(solve("euler", y, [sigma_b, sigma_a]), field).sum(0).flatten()

        with torch.enable_grad():
            jac = torch.autograd.functional.jacobian(phi, part, vectorize=True)  # [n, chunk, *shape]
        jac = jac.flatten(2).transpose(0, 1).double()  # [chunk, n out, n in]
        lowest.append(torch.linalg.eigvalsh((jac + jac.transpose(1, 2)) / 2)[:, 0])
    return torch.cat(lowest)


def _gaussian_gain(method: str, s_b: float, s_a: float, c: float) -> float:
    """The factor by which ``method``'s step from σ_b down to σ_a scales x̄ for data N(0, c I).

    For such data ε(x̄, σ) = σ x̄ / (c + σ²) (Eq 14's field is linear), so every step is a multiplication;
    for Euler it is (c + σ_a σ_b) / (c + σ_b²) = ρ + (1 - ρ) c / (c + σ_b²), ρ = σ_a / σ_b: the Jacobian
    ρ I + (1 - ρ) Cov[x_0 | x̄] / σ_b² of the step (see :func:`encode`) with the posterior covariance of
    Gaussian data, between ρ (σ_b far above the data's scale) and 1 (far below).
    """
    return answer(solve(method, torch.ones(1, dtype=torch.float64), [s_b, s_a]), lambda x, s: s * x / (c + s * s)).item()


def _invert_steps(field: Field, x0: Tensor, x_bar: Tensor, sigmas: list[float], times: list[float], method: str, *,
                  tol: float, max_iterations: int, iterations: list[int], failed: Tensor, failures: list[str],
                  progress: bool) -> Tensor:
    """:func:`encode`'s steps above the first with ``inversion="exact"``: from x̄ at σ_1 = ``sigmas[0]`` up to
    ``sigmas[-1]``, each x̄_{i+1} solving Φ(x̄_{i+1}) = x̄_i for the decoding step Φ of ``method`` (one-step).

    Each solve iterates y ← y + β (x̄_i - Φ(y)), β = 1 / :func:`_gaussian_gain` for data of the scale of
    ``x0`` (c = the mean of x_0², per coordinate): its fixed point is the same for every β > 0, and
    with β the inverse of Φ's Jacobian on Gaussian data it is that data's solution after one evaluation,
    where β = 1 (the plain iteration) contracts only by 1 - ρ far above the data's scale. The tolerance
    is scaled by β too, so that whatever β it bounds ‖Φ(y) - x̄_i‖ ≤ ``tol`` ‖x̄_{i+1}‖ (x̄_{i+1}: the
    iterate returned, one step on from y).

    A sample whose solve does not converge keeps its best iterate and from then on takes the explicit
    Euler step up (the solve's starting point, held there), so that the others go on; ``failed`` (bool [B])
    marks such samples, in place, and ``failures`` receives the message of the first step that had one.
    """
    eps = (x_bar - x0) / sigmas[0]  # ε(x̄_1, σ_1) from the first step's equation, x̄_1 = x_0 + σ_1 ε
    c = x0.double().pow(2).mean().item()  # the data's scale c = mean x_0², per coordinate
    pairs = list(enumerate(zip(sigmas[:-1], sigmas[1:]), start=1))
    for i, (s_a, s_b) in tqdm(pairs, desc=f"encode ({method}, exact)", leave=False) if progress else pairs:
        start: list[Tensor] = []  # ε at the latest iterate, at σ_b: the next step's predictor

        def recording(x, s):
            e = field(x, s)
            if s == s_b:
                start[:] = [e]
            return e

        beta = 1 / _gaussian_gain(method, s_b, s_a, c)

        def g(y, x_a=x_bar, s_a=s_a, s_b=s_b, beta=beta):  # its fixed point is mapped to x̄_a by Φ
            return y + beta * (x_a - answer(solve(method, y, [s_b, s_a]), recording))  # y + β (x̄_a - Φ(y)), Φ: σ_b → σ_a

        try:
            x_bar, k, _ = fixed_point(g, torch.add(x_bar, eps, alpha=s_b - s_a), tol=tol * beta,
                                      max_iterations=max_iterations, held=failed)
        except ConvergenceError as err:
            failures.append(f"encode's step {i + 1} of {len(sigmas)} (τ_{i} = {times[i - 1]:g} → τ_{i + 1} = "
                            f"{times[i]:g}, σ {s_a:.4g} → {s_b:.4g}), inverting {method}'s decoding step: {err}; "
                            "raise max_iterations or tol, or use more timesteps")
            x_bar, k = err.x, max_iterations
            failed |= ~err.converged
        iterations.append(k)
        eps = start[0]
    return x_bar
