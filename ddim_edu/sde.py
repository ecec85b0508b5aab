"""The SDE view (Song et al. 2021, "Score-Based Generative Modeling through SDEs") in score_sde's words.

The VP-SDE ``dx = -½ β(t) x dt + sqrt(β(t)) dw`` is DDPM's forward process in continuous time.
Time is the library's timestep index (:mod:`ddim_edu.schedules`): t ∈ [-1, T-1], t = -1 is clean
data (ᾱ = 1), and one unit of t is one DDPM step (score_sde rescales to [0, 1] and multiplies β by T).

β(t) is chosen so that the SDE's marginals are *exactly* the schedule's: the schedule's ᾱ(t)
interpolates log ᾱ linearly between integers, so ``β(t) = -d log ᾱ/dt`` is piecewise constant,
``-log(1 - β_i)`` on the unit interval (i-1, i] (β_i = ``schedule.betas[i]``; ≈ β_i to first order).
Then ``exp(-∫_{-1}^t β) = ᾱ(t)`` and :meth:`VPSDE.marginal_prob` is Eq 4 at every integer t.

The reverse-time family (Song et al. 2021, Sec. 4.3 and App. D; Karras et al. 2022, Eq 6)

    dx = [f(x, t) - (1+λ²)/2 · g(t)² ∇log p_t(x)] dt + λ g(t) dw̄,      (time running backwards)

has the same marginals p_t for every λ ≥ 0: λ = 0 is the probability-flow ODE (whose (σ, x̄) form
is Eq 14, DDIM's ODE), λ = 1 is the reverse SDE, whose discretisation is DDPM's ancestral sampler.
In the limit of small steps DDIM's η plays λ's role: the noise of one DDIM step is
``σ_t(η)² ≈ η² β dt`` (Eq 16 with 1 - ᾱ_t/ᾱ_{t-1} ≈ β dt) against ``λ² g² dt = λ² β dt`` here.
Unlike η (Eq 7 has no real solution for η > 1), λ > 1 is allowed: more noise, same marginals.
The ε-model gives the score: ``∇log p_t(x) = -ε_θ(x, t) / sqrt(1 - ᾱ(t))``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .forward import bcast
from .model import Model, call_model
from .sampling import Requests, check_x, drive, noise_like, run_steps
from .schedules import Schedule

__all__ = [
    "ReverseFamilySDE",
    "SDE_METHODS",
    "TORCHSDE_METHODS",
    "VPSDE",
    "brownian_tree",
    "euler_maruyama_coefficients",
    "sample_sde",
    "sde_requests",
    "standard_normal_logp",
]


def standard_normal_logp(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension, [B]: the prior at t = T-1."""
    d = z[0].numel()
    return -0.5 * (z.reshape(z.shape[0], -1) ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)


class VPSDE:
    """The variance-preserving SDE of a discrete schedule (module docstring), on t ∈ [-1, T-1].

    Methods take ``t`` as a float, a 0-d tensor or a [B] tensor (one time per sample).
    """

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        # -d log ᾱ/dt on the unit interval (i-1, i]: log ᾱ drops by -log(1-β_i) across it.
        self._beta_steps = -torch.log1p(-schedule.betas)

    @property
    def t_end(self) -> float:
        """The end of time, t = T-1, where the prior N(0, I) is fed in (the start is t = -1, clean data)."""
        return float(self.schedule.T - 1)

    def __repr__(self) -> str:
        return f"VPSDE({self.schedule!r})"

    def beta(self, t) -> Tensor:
        """β(t) = -d log ᾱ/dt = -log(1-β_i) for t ∈ (i-1, i] (i = ceil(t); t = -1 takes i = 0), float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(torch.isnan(t).any()) or bool(((t < -1) | (t > self.t_end)).any()):
            raise ValueError(f"t must lie in [-1, T-1] = [-1, {self.t_end:g}], got values from {t.min().item()} to {t.max().item()}")
        i = torch.ceil(t).clamp(0, self.schedule.T - 1).long()
        return self._beta_steps.to(t.device)[i]

    def sde(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """The forward SDE ``dx = -½ β(t) x dt + sqrt(β(t)) dw``: (drift shaped like x, diffusion g(t))."""
        beta = self.beta(t)
        return -0.5 * bcast(beta, x) * x, beta.sqrt()

    def marginal_prob(self, x0: Tensor, t) -> tuple[Tensor, Tensor]:
        """q(x_t | x_0) = N(mean, std² I): ``(sqrt(ᾱ(t)) x_0, sqrt(1-ᾱ(t)))``; Eq 4 at integer t, exact."""
        alpha = self.schedule.alpha_bar(t)
        return bcast(alpha.sqrt(), x0) * x0, (1 - alpha).sqrt()

    def prior_sampling(self, shape, *, generator: torch.Generator | None = None, dtype=torch.float64, device=None) -> Tensor:
        """x_T ~ N(0, I) at t = T-1 (approximately the marginal there: ᾱ(T-1) ≈ 4e-5 on DDPM's schedule)."""
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_logp(self, z: Tensor) -> Tensor:
        """``log N(z; 0, I)`` per sample, [B]."""
        return standard_normal_logp(z)

    def score(self, model: Model, x: Tensor, t) -> Tensor:
        """``∇_x log p_t(x) ≈ -ε_θ(x, t) / sqrt(1-ᾱ(t))`` (exact for the exact ε); needs t ≥ 0."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool((t < 0).any()):
            raise ValueError(f"t must be >= 0 for the model (it is not defined below timestep 0), got {t.min().item()}")
        t_in = t.expand(x.shape[0]) if t.ndim == 0 else t
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        eps = call_model(model, x, t_in.to(device=x.device, dtype=dtype), t_in.max().item(), check_finite=True)
        return -eps / bcast((1 - self.schedule.alpha_bar(t)).sqrt(), x)

    def reverse_family(self, model: Model, lam: float):
        """The reverse-time family ``dx = [f - (1+λ²)/2 g² ∇log p_t] dt + λ g dw̄`` as ``rsde(x, t) -> (drift, diffusion)``.

        As in score_sde, the drift is to be used with a *negative* time step (integration from
        t = T-1 down): ``x_{t-h} ≈ x_t - drift·h + diffusion·sqrt(h) z``. λ = 0 is the
        probability-flow ODE, λ = 1 the reverse SDE; every λ ≥ 0 has the marginals of the forward SDE.
        """
        lam = _check_lam(lam)

        def rsde(x: Tensor, t) -> tuple[Tensor, Tensor]:
            drift, g = self.sde(x, t)
            drift = drift - bcast(0.5 * (1 + lam**2) * g**2, x) * self.score(model, x, t)
            return drift, lam * g

        return rsde

    def reverse(self, model: Model, probability_flow: bool = False):
        """score_sde's ``reverse``: the reverse SDE (λ = 1), or with ``probability_flow=True`` the
        probability-flow ODE ``dx/dt = f - ½ g² ∇log p_t`` (λ = 0, diffusion 0). See :meth:`reverse_family`."""
        return self.reverse_family(model, 0.0 if probability_flow else 1.0)

    def probability_flow_ode(self, model: Model):
        """The probability-flow ODE in (t, x) as ``f(t, x) -> dx/dt`` in torchdiffeq's shape, with ``f.nfe``.

        ``dx/dt = -½ β(t) (x + ∇log p_t(x)) = -½ β(t) (x - ε_θ(x, t)/sqrt(1-ᾱ(t)))``. With
        ``x̄ = x/sqrt(ᾱ)`` and ``σ = sqrt((1-ᾱ)/ᾱ)`` the chain rule turns it into Eq 14, ``dx̄/dσ = ε_θ``.
        β(t) jumps at every integer t, so adaptive solvers do better on Eq 14 (:mod:`ddim_edu.ode`).
        """
        rsde = self.reverse(model, probability_flow=True)

        def f(t: Tensor, x: Tensor) -> Tensor:
            f.nfe += 1
            return rsde(x, float(t))[0]

        f.nfe = 0
        return f

    def torchsde(self, model: Model, lam: float = 1.0, *, shape=None, sde_type: str = "ito") -> "ReverseFamilySDE":
        """The reverse-time λ-family as an SDE object for ``torchsde.sdeint`` (``f``, ``g``, ``sde_type``,
        ``noise_type``), in the time u = log ᾱ(t); see :class:`ReverseFamilySDE`.

        ``torchsde.sdeint(sde, x_T, sde.times(timesteps), bm=...)`` integrates it from τ_S to τ_1
        (x_T of shape [B, d]; ``shape`` reshapes y for an image model). Building it needs no torchsde.
        """
        return ReverseFamilySDE(self, model, lam, shape=shape, sde_type=sde_type)


def _check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0 (0: probability-flow ODE, 1: reverse SDE), got {lam!r}")
    return float(lam)


# --- samplers from the probability-flow ODE (λ = 0) to the reverse SDE (λ = 1) ----------------


def euler_maruyama_coefficients(schedule: Schedule, timesteps, lam: float) -> tuple[list, list, list, Tensor]:
    """Per-step ``x ← a x + b ε_θ(x, τ_i) + c z`` of Euler–Maruyama on the λ-family, τ_i → τ_{i-1}.

    The step is taken in the clock ``s = -log ᾱ(t)`` (ds = β dt), where the VP-SDE reads
    ``dx = -½ x ds + dw_s`` and the family ``dx = [-½ x - (1+λ²)/2 ∇log p] ds + λ dw̄_s``. With
    ``Δs = log ᾱ(τ_{i-1}) - log ᾱ(τ_i)`` (= ∫β dt over the step, so the schedule is used exactly;
    τ_0 := -1, ᾱ = 1) and ``∇log p = -ε/sqrt(1-ᾱ(τ_i))``:

        a = 1 + Δs/2,   b = -(1+λ²) Δs / (2 sqrt(1-ᾱ(τ_i))),   c = λ sqrt(Δs).

    This is Euler–Maruyama in t with ∫β dt in place of β(τ_i)·h; both are first order.
    Returns (a, b, c) as lists of Python floats indexed like τ, and τ (float64).
    """
    lam = _check_lam(lam)
    tau = schedule.check_timesteps(timesteps)
    log_alpha = schedule.log_alpha_bar(tau)
    log_alpha_prev = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha[:-1]])
    ds = log_alpha_prev - log_alpha  # > 0
    a = 1 + ds / 2
    b = -(1 + lam**2) * ds / (2 * (-torch.expm1(log_alpha)).sqrt())
    c = lam * ds.sqrt()
    return a.tolist(), b.tolist(), c.tolist(), tau


def sde_requests(x_T: Tensor, schedule: Schedule, timesteps, lam: float = 1.0, *,
                 generator: torch.Generator | None = None) -> Requests:
    """Euler–Maruyama on the reverse-time λ-family from τ_S (x_T) down to ᾱ = 1, as a request generator
    (the protocol of :mod:`ddim_edu.sampling`: yields (x, t), receives ε_θ(x, t), returns x_0).

    Each step is ``x ← a x + b ε_θ(x, τ_i) + c z`` with the coefficients of
    :func:`euler_maruyama_coefficients`; λ = 0 draws no noise (the probability-flow ODE), λ = 1 is
    the reverse SDE. Noise comes from ``generator``.
    """
    check_x(x_T)
    a, b, c, tau = euler_maruyama_coefficients(schedule, timesteps, lam)
    tau_f = tau.tolist()
    x = x_T
    for i in range(len(tau_f) - 1, -1, -1):
        eps = yield x, tau_f[i]
        x = torch.add(x * a[i], eps, alpha=b[i])  # drift
        if c[i] > 0:
            x = x.add_(noise_like(x, generator), alpha=c[i])  # diffusion
    return x


# Euler–Maruyama: weak order 1; strong order 1 too here, since the noise λ g(t) dw̄ is additive.
SDE_METHODS = {"euler_maruyama": sde_requests}


@torch.no_grad()
def sample_sde(model: Model, x_T: Tensor, schedule: Schedule, timesteps, *, lam: float = 1.0,
               method: str = "euler_maruyama", generator: torch.Generator | None = None, dt: float | None = None,
               bm=None, return_trajectory: bool = False) -> Tensor:
    """Sample x_0 by integrating the reverse-time λ-family (λ = 0: probability-flow ODE, λ = 1: reverse SDE).

    ``method="euler_maruyama"`` takes :func:`sde_requests`' steps on the grid τ. As the number of
    steps grows, λ = η gives the same distribution as DDIM's ``solvers.sample(..., eta=η)``: λ = 1 ↔
    DDPM's ancestral sampler, λ = 0 ↔ DDIM. ``method`` may also be one of torchsde's solvers
    (``TORCHSDE_METHODS``, e.g. ``"srk"``; needs torchsde): :func:`torchsde.sdeint` then integrates
    the same family on the same grid in the time u = log ᾱ (:class:`ReverseFamilySDE`), ``dt=None``
    taking one step per interval of the grid and a float ``dt`` splitting each interval into equal
    steps of at most ``dt`` in u; its noise is ``bm`` (a torchsde Brownian motion on [log ᾱ(τ_S), 0]
    of shape [B, x_T[0].numel()]), by default :func:`brownian_tree` seeded from ``generator``. Its
    last step, from τ_1 to ᾱ = 1 where no model can be evaluated, is Euler–Maruyama's; torchsde's
    ``"euler"`` with ``dt=None`` takes exactly ``"euler_maruyama"``'s steps, with the noise of the
    Brownian motion. With ``return_trajectory=True`` returns the stack [S+1, B, …] from x_T to x_0.
    """
    check_x(x_T)
    lam = _check_lam(lam)
    tau = schedule.check_timesteps(timesteps)
    if method not in SDE_METHODS and method not in TORCHSDE_METHODS:
        raise ValueError(f"method must be one of {sorted(SDE_METHODS)} or torchsde's {sorted(TORCHSDE_METHODS)}, got {method!r}")
    if dt is not None and (isinstance(dt, bool) or not isinstance(dt, (int, float)) or not (math.isfinite(dt) and dt > 0)):
        raise ValueError(f"dt must be None (one step per interval of the grid) or a number > 0, got {dt!r}")
    if method in SDE_METHODS:
        if dt is not None or bm is not None:
            raise ValueError(f"dt and bm apply to torchsde's methods {sorted(TORCHSDE_METHODS)}, not to {method!r}")
        steps = drive(model, sde_requests(x_T, schedule, tau, lam, generator=generator), tau.flip(0).tolist())
        return run_steps(x_T, steps, return_trajectory)
    return _sample_torchsde(model, x_T, schedule, tau, lam, method, dt, generator, bm, return_trajectory)


# --- the λ-family handed to torchsde ---------------------------------------------------------


class ReverseFamilySDE:
    """The reverse-time λ-family as a torchsde SDE, in torchsde's time ``u = log ᾱ(t)``.

    torchsde integrates forward in time, and sampling runs from t = τ_S down, so time is changed
    to u = log ᾱ(t) = -s (s = -log ᾱ is the clock of :func:`euler_maruyama_coefficients`), which
    rises from log ᾱ(τ_S) to 0 at the data. In s the VP-SDE reads ``dx = -½ x ds + dw_s``; turned
    around, the family reads

        dx = [½ x - (1+λ²)/2 · ε_θ(x, t(u)) / sqrt(1 - e^u)] du + λ dW_u.

    Unlike the form in t, whose β(t) jumps at every integer t, the drift is as smooth as ε_θ is in
    the noise level, which is what higher-order solvers ("srk") need to show their order, and the
    noise is additive with a constant λ. Since g = λ does not depend on x, the Itô and Stratonovich
    forms coincide: ``sde_type`` can be either, to suit the method. ``noise_type`` is "diagonal"
    (g is λ for every coordinate, shaped like y; torchsde's "additive" wants g as a [B, d, d] matrix).

    torchsde's state y is [B, d]; ``shape`` is one sample's shape, to which y is reshaped for the
    model (None: y is passed as it is). ``nfe`` counts model evaluations; ``f`` remembers its last
    few evaluations under ``torch.no_grad()``, since torchsde evaluates it again at the same (u, y)
    (once per ``sdeint`` call to check shapes, and inside "srk"'s stages).
    """

    noise_type = "diagonal"

    def __init__(self, vpsde: VPSDE, model: Model, lam: float = 1.0, *, shape=None, sde_type: str = "ito"):
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich' (equal here: the noise is additive), got {sde_type!r}")
        self.schedule = vpsde.schedule
        self.model = model
        self.lam = _check_lam(lam)
        self.shape = None if shape is None else tuple(shape)
        self.sde_type = sde_type
        self.nfe = 0
        self._memo: list[tuple] = []

    def __repr__(self) -> str:
        return f"ReverseFamilySDE(lam={self.lam:g}, sde_type={self.sde_type!r}, {self.schedule!r})"

    def times(self, timesteps) -> Tensor:
        """torchsde's ``ts`` for a grid τ: ``log ᾱ(τ)`` from τ_S to τ_1, increasing (float64)."""
        return self.schedule.log_alpha_bar(self.schedule.check_timesteps(timesteps)).flip(0)

    def timestep(self, u) -> float:
        """The timestep t with log ᾱ(t) = u, kept in [0, T-1] where the model is defined (rounding)."""
        t = self.schedule.t_from_log_alpha_bar(min(float(u), 0.0)).item()
        return min(max(t, 0.0), float(self.schedule.T - 1))

    def f(self, u, y: Tensor) -> Tensor:
        """The drift ``½ y - (1+λ²)/2 · ε_θ(y, t(u)) / sqrt(1 - e^u)`` in u, [B, d]."""
        u = float(u)
        cache = not torch.is_grad_enabled()
        if cache:
            for u_m, y_m, version, drift in self._memo:
                if y_m is y and u_m == u and version == y._version:
                    return drift
        t = self.timestep(u)
        x = y if self.shape is None else y.reshape(y.shape[0], *self.shape)
        t_in = torch.full((y.shape[0],), t, dtype=torch.float64 if y.dtype == torch.float64 else torch.float32, device=y.device)
        eps = call_model(self.model, x, t_in, t, check_finite=True).reshape(y.shape)
        self.nfe += 1
        drift = 0.5 * y - (0.5 * (1 + self.lam**2) / math.sqrt(-math.expm1(u))) * eps
        if cache:
            self._memo = [(u, y, y._version, drift), *self._memo[:3]]
        return drift

    def g(self, u, y: Tensor) -> Tensor:
        """The diffusion: λ in every coordinate (diagonal noise), shaped like y."""
        return y.new_full((1, 1), self.lam).expand_as(y)


# torchsde's methods that take diagonal noise, with the SDE type each solves (one and the same SDE
# here, the noise being additive), and model evaluations per step (counted in tests/test_sde.py).
TORCHSDE_METHODS = {
    "euler": "ito",  # 1; Euler–Maruyama, with dt=None sde_requests' steps
    "milstein": "ito",  # 1; = euler here (g does not depend on x)
    "srk": "ito",  # 4; stochastic Runge–Kutta (Rößler 2010), strong order 1.5
    "midpoint": "stratonovich",  # 2
    "heun": "stratonovich",  # 2
    "euler_heun": "stratonovich",  # 1; = euler here
    "reversible_heun": "stratonovich",  # 1, +1 per interval of the grid; needs small steps (dt) near the data
}


def brownian_tree(x_T: Tensor, schedule: Schedule, timesteps, *, generator: torch.Generator | None = None):
    """The Brownian motion :func:`sample_sde` uses by default for torchsde's methods: a torchsde Brownian tree on
    ``[log ᾱ(τ_S), 0]`` with one coordinate per entry of x_T, seeded from ``generator``.

    A tree (``halfway_tree=True``) fixes the whole path by its seed, so that it can be queried at
    any resolution: ``dt`` changes the steps, not the noise. It carries the space-time Lévy area
    that "srk" needs.
    """
    import torchsde

    tau = schedule.check_timesteps(timesteps)
    u = schedule.log_alpha_bar(tau)
    u_S = u[-1].item()
    # Resolve the path well below the smallest step (the last one, from τ_1 to ᾱ = 1).
    smallest = torch.cat([-u[:1], u[:-1] - u[1:]]).min().item()
    tol = 10.0 ** math.floor(math.log10(min(1e-6, 1e-3 * smallest)))
    gen_device = generator.device if generator is not None else "cpu"
    entropy = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=gen_device))
    # The tree rounds times to multiples of tol: start one below u_S's, so that u_S lies inside.
    return torchsde.BrownianInterval(
        t0=(math.floor(u_S / tol) - 1) * tol, t1=0.0, size=(x_T.shape[0], x_T[0].numel()), dtype=x_T.dtype, device=x_T.device,
        entropy=entropy, tol=tol, halfway_tree=True, levy_area_approximation="space-time",
    )


def _sample_torchsde(model, x_T, schedule, tau, lam, method, dt, generator, bm, return_trajectory) -> Tensor:
    """:func:`sample_sde` with one of torchsde's methods (arguments checked)."""
    try:
        import torchsde
    except ImportError as err:
        raise ImportError(f'method {method!r} needs torchsde: pip install torchsde (or pip install -e ".[sde]")') from err

    if bm is None:
        bm = brownian_tree(x_T, schedule, tau, generator=generator)
    sde = ReverseFamilySDE(VPSDE(schedule), model, lam, shape=x_T.shape[1:], sde_type=TORCHSDE_METHODS[method])
    u = schedule.log_alpha_bar(tau).tolist()  # u_i = log ᾱ(τ_i), decreasing in i
    y = x_T.reshape(x_T.shape[0], -1)
    xs = [x_T]
    extra = None  # the solver's state (reversible Heun's), carried from one interval to the next
    for i in range(len(u) - 1, 0, -1):
        # τ_{i+1} → τ_i (u[i] = log ᾱ(τ_{i+1}) with 0-based lists): n equal steps in u.
        h = u[i - 1] - u[i]
        n = 1 if dt is None else max(1, math.ceil(h / dt - 1e-9))
        ts = torch.tensor([u[i], u[i - 1]], dtype=torch.float64, device=y.device)
        # dt a hair over h/n, so that rounding never leaves a sliver of a step at the end.
        ys, extra = torchsde.sdeint(sde, y, ts, bm=bm, method=method, dt=h / n * (1 + 1e-10), extra=True, extra_solver_state=extra)
        y = ys[-1]
        xs.append(y.reshape(x_T.shape))
    # Last step, τ_1 → ᾱ = 1 (u = 0): Euler–Maruyama with the drift at τ_1, as in sde_requests.
    drift = sde.f(u[0], y)
    y = y + drift * (0.0 - u[0])
    if lam > 0:
        y = y + lam * bm(u[0], 0.0)
    xs.append(y.reshape(x_T.shape))
    return torch.stack(xs) if return_trajectory else xs[-1]
