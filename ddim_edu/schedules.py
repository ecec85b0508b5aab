"""Noise schedules: the one place that owns ᾱ, the ODE variable σ and time conversions.

Index convention (used by every public function of the library): a *timestep* ``t`` is the
index ``i ∈ {0, …, T-1}`` that pretrained DDPM/DDIM/diffusers networks take as input, and
``alphas_cumprod[i] = ᾱ_{i+1}``, the paper's ``α_{i+1}``. The paper's ``α_0 := 1`` sits at
index ``-1``: a sampler's last step goes there and returns the x_0 prediction.

The paper writes ``α_t`` for the cumulative product (DDPM's ``ᾱ_t``); here it is ``alpha_bar``.
Its Section-4.3 ODE variable ``σ(t) = sqrt((1-ᾱ)/ᾱ)`` is :meth:`Schedule.sigma` (not the
sampler's noise std σ_t of Eq 7/16, which lives in :mod:`ddim_edu.forward`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["CALIBRATED_GRID", "MODEL_FREE_SPACINGS", "PROFILE_SPACINGS", "SPACINGS", "Schedule", "calibrated_blend", "cosine_schedule", "karras_sigmas",
           "linear_schedule"]

SPACINGS = ("uniform", "leading", "quad", "trailing", "linear", "karras", "logsnr", "blend", "calibrated", "equalised")
PROFILE_SPACINGS = ("equalised",)  # need a model's pilot profile (ddim_edu.solvers.pilot_profile)
MODEL_FREE_SPACINGS = tuple(s for s in SPACINGS if s not in PROFILE_SPACINGS)  # made from S alone (a command line's choices)

# The "calibrated" grid: a "blend" (weight w, t_min) at three anchors S, fitted by
# benchmarks/calibrate_grid.py on mixtures of the kinds of ddim_edu.evaluation.mixture_family drawn
# from seeds 1 and 2 (never on the seed-0 family the solvers are judged on), under DDPM's linear
# schedule, T = 1000: the (w, t_min) whose error, relative to each problem's best blend, has the
# least geometric mean over the problems and the methods dpmpp_2m, unipc and pc_sigma (extrapolated).
CALIBRATED_GRID = ((5, 0.0, 25.0), (10, 0.75, 16.0), (20, 0.75, 3.0))  # (S, w, t_min)


class Schedule:
    """A discrete variance schedule with a continuous extension, all in float64.

    ``alpha_bar(t)`` interpolates ``log ᾱ`` linearly between integer timesteps (equivalently,
    β is spread evenly over each unit interval), so it equals ``alphas_cumprod`` at integers,
    is strictly decreasing, and has a closed-form inverse. It is defined on ``[-1, T-1]``
    with ``alpha_bar(-1) = 1`` (the paper's ``α_0``). diffusers and k-diffusion extend a
    schedule differently (log σ linear between integers), so at fractional t the two map one σ
    to timesteps up to about 0.01 apart; at integers they agree.
    """

    def __init__(self, betas: Tensor):
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"betas must be a 1-D sequence of numbers in (0, 1), got {type(betas).__name__}") from err
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D sequence of length >= 2, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1); got values outside that range")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if not self.alphas_cumprod[-1] > 0:
            first = int(torch.nonzero(self.alphas_cumprod == 0)[0])
            raise ValueError(f"ᾱ underflows to 0 at timestep {first} (the β are too large for T = {len(betas)} in float64): "
                             "σ and the model's inputs would be infinite there; use smaller β or a shorter schedule")
        # log ᾱ at the knots t = -1, 0, …, T-1 (knot -1 is α_0 = 1).
        self._log_alpha_knots = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])

    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return len(self.betas)

    def __repr__(self) -> str:
        return f"Schedule(T={self.T}, beta_1={self.betas[0].item():.3g}, beta_T={self.betas[-1].item():.3g})"

    # --- ᾱ and its continuous extension -------------------------------------------------

    def log_alpha_bar(self, t) -> Tensor:
        """``log ᾱ(t)`` for float ``t ∈ [-1, T-1]``, linear between integers (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(((t < -1) | (t > self.T - 1)).any()) or bool(torch.isnan(t).any()):
            raise ValueError(f"t must lie in [-1, T-1] = [-1, {self.T - 1}], got values from {t.min().item()} to {t.max().item()}")
        u = t + 1.0  # position among the knots
        lo = torch.clamp(torch.floor(u), max=self.T - 1).long()
        frac = u - lo
        knots = self._log_alpha_knots.to(t.device)
        return knots[lo] + frac * (knots[lo + 1] - knots[lo])

    def alpha_bar(self, t) -> Tensor:
        """ᾱ(t) (the paper's α_t at paper time t+1) for float ``t ∈ [-1, T-1]``; exact at integers."""
        return torch.exp(self.log_alpha_bar(t))

    def t_from_log_alpha_bar(self, log_alpha) -> Tensor:
        """Inverse of :meth:`log_alpha_bar`: the float timestep at which ``log ᾱ`` takes a value."""
        log_alpha = torch.as_tensor(log_alpha, dtype=torch.float64)
        if bool(torch.isnan(log_alpha).any()):
            raise ValueError("log ᾱ (or σ) must not be NaN")
        knots = -self._log_alpha_knots.to(log_alpha.device)  # increasing
        y = -log_alpha
        top = knots[-1]
        y = torch.where((y > top) & (y < top * (1 + 1e-12)), top, y)  # float rounding at the top end
        if bool(((y < 0) | (y > top)).any()):
            raise ValueError(
                f"log ᾱ must lie in [{-knots[-1].item():.6g}, 0] for this schedule, "
                f"got values from {log_alpha.min().item():.6g} to {log_alpha.max().item():.6g}"
            )
        hi = torch.clamp(torch.searchsorted(knots, y), 1, self.T)
        lo = hi - 1
        frac = (y - knots[lo]) / (knots[hi] - knots[lo])
        return lo.to(torch.float64) + frac - 1.0

    # --- the ODE variable σ = sqrt((1-ᾱ)/ᾱ) (Section 4.3, Eq 14) ----------------------

    def sigma(self, t) -> Tensor:
        """The ODE variable ``σ(t) = sqrt((1-ᾱ(t))/ᾱ(t))`` (Eq 14), float64; σ(-1) = 0."""
        return torch.sqrt(torch.expm1(-self.log_alpha_bar(t)))

    def t_from_sigma(self, sigma) -> Tensor:
        """Inverse of :meth:`sigma`: the float timestep with ``σ(t) = sigma``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if bool((sigma < 0).any()) or bool(torch.isnan(sigma).any()):
            raise ValueError(f"sigma must be a number >= 0, got {sigma.min().item() if not torch.isnan(sigma).any() else 'NaN'}")
        return self.t_from_log_alpha_bar(-torch.log1p(sigma**2))

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(σ(0), σ(T-1)): the noise levels at which a model can be evaluated."""
        return self.sigma(0.0).item(), self.sigma(float(self.T - 1)).item()

    @staticmethod
    def alpha_bar_from_sigma(sigma) -> Tensor:
        """``ᾱ = 1 / (1 + σ²)``, the inverse change of variables of Eq 14."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return 1.0 / (1.0 + sigma**2)

    # --- sub-sequences τ ------------------------------------------------------------------

    def check_timesteps(self, timesteps, name: str = "timesteps") -> Tensor:
        """Validate a sub-sequence τ within [0, T-1] and return it increasing, τ_1 < … < τ_S, as float64.

        τ may come increasing (this library's grids) or strictly decreasing (the order in which
        sampling visits it, as diffusers' ``scheduler.timesteps``); it is a set of timesteps either way.
        """
        try:
            tau = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a 1-D sequence of numbers, got {type(timesteps).__name__}") from err
        if tau.ndim != 1 or len(tau) == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(tau.shape)}")
        if len(tau) > self.T:
            raise ValueError(f"{name} has {len(tau)} steps, more than T = {self.T}; use at most T steps")
        if not bool(torch.isfinite(tau).all()) or bool(((tau < 0) | (tau > self.T - 1)).any()):
            raise ValueError(f"{name} must lie in [0, T-1] = [0, {self.T - 1}], got {tau.min().item()} .. {tau.max().item()}")
        if len(tau) > 1 and bool((tau[1:] < tau[:-1]).all()):
            tau = tau.flip(0)  # given in sampling order
        if len(tau) > 1 and not bool((tau[1:] > tau[:-1]).all()):
            raise ValueError(f"{name} must be strictly monotone (τ_1 < … < τ_S, or from τ_S down; sampling runs from the "
                             f"largest), got {tau.tolist()[:8]}…")
        return tau

    def _equalised(self, S: int, profile: tuple[Tensor, Tensor] | None, t_min: float) -> Tensor:
        """The ``"equalised"`` grid of :meth:`timesteps`: S levels at equal increments of ∫ c^{1/3} du, t_min to T-1."""
        if profile is None or len(profile) != 2:
            raise ValueError("spacing 'equalised' needs profile=(t, c), a model's pilot profile: "
                             "profile = ddim_edu.solvers.pilot_profile(model, schedule, x_pilot)")
        t, c = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in profile)
        if t.shape != c.shape or len(t) < 3 or not bool(torch.isfinite(c).all() and (c >= 0).all()):
            raise ValueError(f"profile must be (t, c) of one length >= 3 with finite c >= 0, got shapes "
                             f"{tuple(t.shape)} and {tuple(c.shape)}")
        order = torch.argsort(t)
        t, c = t[order], c[order]
        if not (t[0] <= t_min and t[-1] >= self.T - 1 - 1e-9):
            raise ValueError(f"the profile covers t in [{t[0]:.4g}, {t[-1]:.4g}]; the grid needs [{t_min:.4g}, {self.T - 1}]")
        u = -torch.log(self.sigma(t))  # u = -log σ, decreasing in t
        density = c.pow(1 / 3)  # step length h ∝ c^{-1/3} equalises c h³
        density = density + 0.05 * density.mean()
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64),
                                torch.cumsum((density[1:] + density[:-1]) / 2 * (u[:-1] - u[1:]), 0)])  # ∫ from t[0]
        u_ends = -torch.log(self.sigma(torch.tensor([t_min, self.T - 1.0], dtype=torch.float64)))
        ends = np.interp((-u_ends).numpy(), (-u).numpy(), cumulative.numpy())  # ∫ is piecewise linear in u
        levels = np.linspace(ends[0], ends[1], S)  # equal increments of ∫ c^{1/3} du
        u_grid = torch.from_numpy(np.interp(levels, cumulative.numpy(), u.numpy()))
        return self.t_from_sigma(torch.exp(-u_grid))

    def step_alphas(self, timesteps) -> tuple[Tensor, Tensor]:
        """(ᾱ(τ_i), ᾱ(τ_{i-1})) for i = 1..S, float64, with ᾱ(τ_0) := 1 (the step into x_0)."""
        alpha = self.alpha_bar(self.check_timesteps(timesteps))
        return alpha, torch.cat([torch.ones(1, dtype=torch.float64), alpha[:-1]])


    def timesteps(self, S: int, spacing: str = "uniform", *, t_min: float = 0.0, rho: float = 7.0,
                  weight: float = 0.5, profile: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """An increasing sub-sequence τ of timestep indices (float64 tensor), S entries except where noted.

        Integer grids, each computed exactly as the code that defines it:

        - ``"uniform"`` (the paper's reference code, and the default): ``range(0, T, ⌊T/S⌋)``, i.e.
          0, 100, …, 900 for T = 1000, S = 10. Sampling starts at the largest entry (900), below T-1.
          When S does not divide T this has ``⌈T/⌊T/S⌋⌉`` entries, which can be more than S
          (T = 1000, S = 3: 0, 333, 666, 999; any S > T/2: all T timesteps).
        - ``"leading"`` (diffusers' ``timestep_spacing="leading"`` with ``steps_offset=0``): exactly S
          points ``τ_i = (i-1)·⌊T/S⌋``; the same as ``"uniform"`` when S divides T.
        - ``"quad"`` (the reference code's CIFAR-10 choice): ``int()`` of numpy's float64
          ``linspace(0, sqrt(0.8·T), S) ** 2``. For large S, ``int()`` repeats small indices; the
          repeats are dropped (a step from a timestep to itself is the identity for every η, since
          both ᾱ are equal and σ_t = 0), so fewer than S points may come back; the set of values is
          the reference's.
        - ``"trailing"`` (Lin et al. 2023; diffusers' ``timestep_spacing="trailing"``):
          ``round(arange(T, 0, -T/S)) - 1`` in numpy float64, reversed, so sampling starts at T-1,
          where x_T ~ N(0, I) is (almost) exactly distributed. Exactly S points: where floating point
          gives numpy's ``arange`` an (S+1)-th entry near 0 (T = 1000, S = 61), diffusers returns
          that entry as timestep -1; it is dropped here.

        Fractional grids from ``t_min`` (default 0) to T-1, for the ODE methods of
        :mod:`ddim_edu.solvers` (the model is then evaluated between integer timesteps):

        - ``"linear"``: uniform in t.
        - ``"karras"`` (Karras et al. 2022, Eq 5): uniform in σ^{1/ρ}, ρ = ``rho``, with σ the ODE variable.
        - ``"logsnr"``: uniform in -log σ, half the log signal-to-noise ratio (Lu et al.'s λ) (DPM-Solver's grid).
        - ``"blend"``: ``(1 - w) τ_linear + w τ_logsnr`` point by point, w = ``weight`` ∈ [0, 1]: from
          uniform in t (w = 0) to uniform in log σ (w = 1).
        - ``"calibrated"``: the blend whose w and t_min were chosen on a calibration set of exact
          mixtures and frozen (``CALIBRATED_GRID``; between its anchors w and log(1 + t_min) are
          linear in log S, beyond them held), so no problem it is used on was looked at. It sets
          its own t_min.
        - ``"equalised"``: the grid that equalises the local error of a second-order method in
          u = -log σ (the log signal-to-noise ratio, DPM-Solver++(2M)'s variable) along a model's own
          trajectories, from a pilot ``profile = (t, c)`` of :func:`ddim_edu.solvers.pilot_profile`:
          c(u) the RMS size of d²D/du², D = x̄ - σ ε the x_0 prediction. A step of length h at u
          leaves an error ≈ c(u) h³/12, so equal errors need steps h ∝ c^{-1/3}: the levels are placed
          at equal increments of ∫ c^{1/3} du (c^{1/3} floored at 5 % of its mean, so that no stretch
          gets no step), from t_min (the calibrated grid's) to T-1.
        """
        if not isinstance(S, int) or isinstance(S, bool) or S < 1:
            raise ValueError(f"S (number of steps) must be a positive int, got {S!r}")
        if S > self.T:
            raise ValueError(f"S (number of steps) must be <= T = {self.T}, got {S}")
        T = self.T
        if spacing == "uniform":
            tau = torch.arange(0, T, T // S, dtype=torch.float64)  # range(0, T, T // S)
        elif spacing == "leading":
            tau = torch.arange(S, dtype=torch.float64) * (T // S)
        elif spacing == "quad":
            seq = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
            tau = torch.tensor(sorted(set(seq)), dtype=torch.float64)
        elif spacing == "trailing":
            seq = np.round(np.arange(T, 0, -T / S))[:S].astype(np.int64) - 1
            tau = torch.tensor(seq[::-1].tolist(), dtype=torch.float64)
        elif spacing in ("linear", "karras", "logsnr", "blend", "calibrated", "equalised"):
            if spacing in ("calibrated", "equalised"):  # t_min (and for "calibrated" the blend) from CALIBRATED_GRID
                if t_min != 0.0:
                    raise ValueError(f"spacing {spacing!r} chooses its own t_min; got t_min={t_min!r} (use 'blend' to set it)")
                calibrated_weight, t_min = calibrated_blend(S)
                t_min = min(t_min, T - 2)
                if spacing == "calibrated":
                    spacing, weight = "blend", calibrated_weight
            if not 0 <= t_min < T - 1:
                raise ValueError(f"t_min must lie in [0, T-1) = [0, {T - 1}), got {t_min!r}")
            if S < 2:
                raise ValueError(f"S must be >= 2 for spacing {spacing!r} (both ends are on the grid), got {S}")
            if spacing == "blend" and not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
                raise ValueError(f"weight must be a number in [0, 1] (0: uniform in t, 1: uniform in log σ), got {weight!r}")
            u = torch.linspace(0, 1, S, dtype=torch.float64)
            lo, hi = self.sigma(float(t_min)), self.sigma(float(T - 1))
            linear = t_min + u * (T - 1 - t_min)  # uniform in t
            if spacing == "linear":
                tau = linear
            elif spacing == "karras":
                tau = self.t_from_sigma(karras_sigmas(S, lo, hi, rho)[:-1].flip(0))
            elif spacing == "equalised":
                tau = self._equalised(S, profile, t_min)
            else:
                logsnr = self.t_from_sigma(torch.exp(torch.log(lo) + u * (torch.log(hi) - torch.log(lo))))
                tau = logsnr if spacing == "logsnr" else (1 - weight) * linear + weight * logsnr  # blend: point by point
            tau[0], tau[-1] = t_min, T - 1  # exact ends despite rounding in the inverse
        else:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        return tau


def calibrated_blend(S: int) -> tuple[float, float]:
    """(w, t_min) of the ``"calibrated"`` grid for S timesteps: ``CALIBRATED_GRID`` interpolated in log S."""
    anchors = [(math.log(a), w, math.log1p(t)) for a, w, t in CALIBRATED_GRID]
    x = min(max(math.log(S), anchors[0][0]), anchors[-1][0])
    for (x0, w0, l0), (x1, w1, l1) in zip(anchors, anchors[1:]):
        if x <= x1:
            f = (x - x0) / (x1 - x0)
            return w0 + f * (w1 - w0), math.expm1(l0 + f * (l1 - l0))
    raise AssertionError("unreachable: x is clamped to the anchors")


def karras_sigmas(n: int, sigma_min, sigma_max, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), Eq 5: n noise levels from σ_max down to σ_min, uniform in σ^{1/ρ}, then 0.

    A grid for :func:`ddim_edu.solvers.integrate` on any σ range (variance exploding, EDM's σ_min =
    0.002, σ_max = 80, or a DDPM schedule's ``sigma_range``): float64 [n + 1], decreasing, ending at 0,
    where every method takes its last step. ρ = 7 concentrates the levels at small σ.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n (number of noise levels) must be an int >= 2, got {n!r}")
    lo, hi = float(sigma_min), float(sigma_max)
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    levels = (lo ** (1 / rho) + u * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho  # increasing, σ^{1/ρ} uniform
    levels[0], levels[-1] = lo, hi  # exact ends despite rounding
    return torch.cat([levels.flip(0), torch.zeros(1, dtype=torch.float64)])


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear β schedule (Ho et al. 2020): β from ``beta_start`` to ``beta_end`` over T steps."""
    _check_T(T)
    return Schedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """The cosine schedule of Nichol & Dhariwal (2021): ᾱ(u) ∝ cos²((u+s)/(1+s)·π/2), β clipped at ``max_beta``."""
    _check_T(T)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
    return Schedule(betas)


def _check_T(T) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise ValueError(f"T must be an int >= 2, got {T!r}")
