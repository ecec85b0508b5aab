"""The model contract: what a model is, and the conversions between the ways of writing one.

**The native contract** (the library's, and that of pretrained DDPM/DDIM weights) is
``model(x, t) -> ε``: ``x`` is a batch [B, …] in DDPM's coordinates, x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε
(Eq 4), ``t`` a float tensor [B] of timestep indices (the convention of :mod:`ddim_edu.schedules`:
index i ↔ ᾱ = ``alphas_cumprod[i]``), and the output is ε_θ(x_t), shaped and typed like ``x``.

**Other parameterisations** of the same network output are linear in it given x_t and ᾱ (Eq 4),
so :func:`eps_from_prediction` turns each into ε (the names are diffusers' ``prediction_type``):

- ``"epsilon"``: ε itself (the paper's ε_θ);
- ``"sample"``: the x_0 prediction f_θ of Eq 9, so ε = (x_t - sqrt(ᾱ) x_0) / sqrt(1-ᾱ);
- ``"v_prediction"`` (Salimans & Ho 2022): v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0, so ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t.

**The ODE's coordinates** (Section 4.3): the scaled state x̄ = x / sqrt(ᾱ) and the noise level
σ = sqrt((1-ᾱ)/ᾱ), in which x̄ = x_0 + σ ε. There

- Eq 14's right-hand side is ε itself, as a function of (x̄, σ): a *field* ``eps(x_bar, sigma)``
  (:class:`EpsField` for a model in the native contract, :func:`eps_at_sigma` for one σ);
- the x_0 prediction is the *denoiser* D(x̄, σ) = x̄ - σ ε, the form of EDM (Karras et al. 2022) and
  k-diffusion, whose models take x̄ and σ directly with no DDPM schedule (variance exploding);
  :func:`denoiser_field` turns such a model into a field.

Checks of what a model returns (shape, dtype, finiteness) live here, in :func:`call_model`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .forward import bcast
from .schedules import Schedule

__all__ = [
    "PREDICTION_TYPES",
    "CountingModel",
    "Denoiser",
    "EpsField",
    "Field",
    "Model",
    "as_eps_model",
    "batch_times",
    "call_model",
    "denoiser_field",
    "eps_at_sigma",
    "eps_from_prediction",
    "is_finite",
    "time_input",
    "time_inputs",
    "timesteps_at",
]

Model = Callable[[Tensor, Tensor], Tensor]  # model(x, t) -> ε, the native contract
Field = Callable[[Tensor, float], Tensor]  # eps(x_bar, sigma) -> ε, Eq 14's right-hand side
Denoiser = Callable[[Tensor, Tensor], Tensor]  # denoiser(x_bar, sigma [B]) -> D, the x_0 prediction (EDM's form)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class CountingModel:
    """A model ``model(x, t)`` (or a field ``eps(x_bar, sigma)``) that counts its evaluations in ``nfe``.

    NFE, the number of function evaluations, is what a sampler costs: wrap the model, run the sampler
    with the wrapper and read ``nfe``. For the ODE methods the count is known in advance
    (:meth:`ddim_edu.solvers.Method.nfe`); for torchdiffeq's adaptive solvers only afterwards.
    """

    def __init__(self, model: Model):
        self.model, self.nfe = model, 0

    def __call__(self, x: Tensor, t) -> Tensor:
        self.nfe += 1
        return self.model(x, t)


def time_input(t: float, x: Tensor) -> Tensor:
    """The model's time argument: a float tensor [B] filled with timestep t (float64 for float64 x)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)


def batch_times(t, x: Tensor) -> Tensor:
    """A network's time argument as a tensor [B] on x's device: a [B] tensor, or a scalar for the whole batch.

    For networks that implement the contract (``ddim_edu.toy.nets``, ``ddim_edu.image.unet``) and
    accept a single timestep the way diffusers' networks do; anything else is a ValueError.
    """
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape [B] = [{x.shape[0]}] (or be a scalar), got {tuple(t.shape)}")
    return t


def time_inputs(times: Sequence[float], x: Tensor) -> dict[float, Tensor]:
    """:func:`time_input` for many timesteps at once: ``{t: tensor [B] filled with t}``, rows of one tensor."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    times = list(dict.fromkeys(float(t) for t in times))
    rows = torch.tensor(times, dtype=dtype, device=x.device).unsqueeze(1).expand(-1, x.shape[0])
    return dict(zip(times, rows))


def is_finite(x: Tensor) -> bool:
    """Whether every entry is finite, through their sum: far cheaper than ``isfinite().all()`` (short of overflow)."""
    return math.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).item())


def call_model(model: Model, x: Tensor, t: Tensor, timestep: float, *, check_finite: bool = False) -> Tensor:
    """Evaluate ``model(x, t)`` and check that it returned ε of x's shape and dtype (and, if asked, finite values).

    The shape and dtype checks read attributes only (no synchronisation with a GPU); the finiteness
    check reduces ε to a number on the host, so the samplers run it only when they look for a NaN.
    """
    eps = model(x, t)
    if not isinstance(eps, Tensor) or eps.shape != x.shape:
        shape = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        hint = ("; a diffusers UNet returns an output object: wrap it with ddim_edu.interop.from_diffusers"
                if hasattr(eps, "sample") else "")
        raise ValueError(f"model must return ε with the shape of x {tuple(x.shape)}, got {shape} (at timestep {timestep:g}){hint}")
    if eps.dtype != x.dtype:
        raise ValueError(f"model must return ε in x's dtype {x.dtype}, got {eps.dtype} (at timestep {timestep:g}); cast the model or x")
    if check_finite and not is_finite(eps):
        raise FloatingPointError(
            f"model returned NaN or inf (at timestep {timestep:g}); check its weights and inputs, or sample in float32/float64"
        )
    return eps


# --- parameterisations ----------------------------------------------------------------------------


def eps_from_prediction(output: Tensor, x: Tensor, alpha_bar, prediction_type: str) -> Tensor:
    """ε from a network ``output`` of the given ``prediction_type`` at x_t with ᾱ = ``alpha_bar`` (a scalar or [B]).

    ``"epsilon"``: ε = output; ``"sample"`` (x_0, Eq 9 solved for ε): ε = (x_t - sqrt(ᾱ) x_0)/sqrt(1-ᾱ);
    ``"v_prediction"``: ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t.
    """
    if prediction_type == "epsilon":
        return output
    alpha = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if prediction_type == "sample":
        return (x - bcast(alpha.sqrt(), x) * output) / bcast((1 - alpha).sqrt(), x)
    if prediction_type == "v_prediction":
        return bcast(alpha.sqrt(), x) * output + bcast((1 - alpha).sqrt(), x) * x
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def as_eps_model(model: Model, schedule: Schedule, prediction_type: str) -> Model:
    """A model of any ``prediction_type`` (``model(x, t)`` returning ε, x_0 or v) in the native ε contract.

    ᾱ is read from ``schedule`` at the model's time input t (fractional t on its continuous extension).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type == "epsilon":
        return model

    def eps_model(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).detach().to("cpu", torch.float64)
        alpha = schedule.alpha_bar(t[0] if bool((t == t[0]).all()) else t)  # one ᾱ for the usual one-level batch
        return eps_from_prediction(model(x, t.to(x.device)), x, alpha, prediction_type)

    return eps_model


# --- Eq 14's right-hand side: ε as a function of (x̄, σ) --------------------------------------------


def eps_at_sigma(model: Model, schedule: Schedule, x_bar: Tensor, sigma: float, *, check_finite: bool = False) -> Tensor:
    """ε_θ at noise level σ for the scaled state x̄, for any σ in the schedule's range: the model sees
    ``x = x̄ / sqrt(σ²+1)`` at the timestep ``t(σ)`` (validated, one σ at a time; :class:`EpsField`
    does the conversions of a whole solve at once)."""
    t = timesteps_at(schedule, [float(sigma)])[float(sigma)]
    x = x_bar / (float(sigma) ** 2 + 1) ** 0.5
    return call_model(model, x, time_input(t, x), t, check_finite=check_finite)


def timesteps_at(schedule: Schedule, sigmas: Sequence[float], known: dict | None = None) -> dict[float, float]:
    """``{σ: t}``, the model's time input at each noise level σ > 0 of ``sigmas``, by one validated call
    of :meth:`Schedule.t_from_sigma`; the levels in ``known`` (``{σ: t}``, e.g. an integral grid τ)
    keep their exact timesteps. The one conversion that :class:`EpsField` and the diffusers scheduler
    adapter share, so that both feed a model the same t."""
    known = {float(s): float(t) for s, t in (known or {}).items()}
    others = sorted({float(s) for s in sigmas} - set(known) - {0.0})
    if not others:
        return known
    lo, hi = schedule.sigma_range
    out = [s for s in others if not lo * (1 - 1e-6) <= s <= hi * (1 + 1e-6)]
    if out:
        raise ValueError(f"noise levels {out[:4]} lie outside the schedule's [σ(0), σ(T-1)] = [{lo:.6g}, {hi:.6g}]; "
                         "the model is not defined there")
    inside = torch.tensor(others, dtype=torch.float64).clamp(lo, hi)  # the ends, up to float32 rounding of σ
    return {**dict(zip(others, schedule.t_from_sigma(inside).clamp(0, schedule.T - 1).tolist())), **known}


class EpsField:
    """ε_θ(x̄, σ), Eq 14's right-hand side, for a model in the native contract, with the σ → t
    conversions of a whole solve done once, up front.

    ``sigmas`` are the noise levels the solve will evaluate (e.g. ``METHODS[m].levels(grid)``), and
    ``timesteps`` optionally the exact timesteps of some of them (``{σ: t}``, e.g. an integral grid
    τ, whose σ(τ) → t round trip would otherwise feed the model 245.99999999999997 instead of 246).
    They are converted by one call of :meth:`Schedule.t_from_sigma`; an evaluation at one of them
    then does no validation, no search and no synchronisation with the device: a multiplication
    by ``1/sqrt(1+σ²)`` and the model call. A σ outside the table takes the validated route
    (:func:`eps_at_sigma`) and is added to it. With ``check_finite`` every ε is checked (a host
    synchronisation each), and a NaN or inf raises FloatingPointError naming σ and t.
    """

    def __init__(self, model: Model, schedule: Schedule, sigmas: Sequence[float] = (), timesteps: dict | None = None,
                 *, check_finite: bool = False):
        self.model, self.schedule, self.check_finite = model, schedule, check_finite
        self._t = timesteps_at(schedule, sigmas, timesteps)
        self._like: tuple | None = None  # (batch, dtype, device) of the time inputs made so far
        self._inputs: dict[float, Tensor] = {}  # σ -> the model's time input [B] at σ

    def timestep(self, sigma: float) -> float:
        """The model's time input t at noise level σ (from the table, else converted and added to it)."""
        t = self._t.get(sigma)
        if t is None:
            t = self._t[sigma] = timesteps_at(self.schedule, [sigma])[sigma]
        return t

    def __call__(self, x_bar: Tensor, sigma: float) -> Tensor:
        t_in = self._inputs.get(sigma)
        like = (x_bar.shape[0], x_bar.dtype, x_bar.device)
        if t_in is None or like != self._like:  # the first call, a σ off the table, or another batch
            if like != self._like:
                self._like = like
                self._inputs = {s: time for s, time in zip(self._t, time_inputs(self._t.values(), x_bar).values())}
            t_in = self._inputs.get(sigma)
            if t_in is None:
                t_in = self._inputs[sigma] = time_input(self.timestep(sigma), x_bar)
        x = torch.mul(x_bar, 1.0 / math.sqrt(1.0 + sigma * sigma))  # x = x̄ sqrt(ᾱ), ᾱ = 1/(1+σ²)
        t = self._t[sigma]  # in the table by now
        eps = call_model(self.model, x, t_in, t)
        if self.check_finite and not is_finite(eps):
            raise FloatingPointError(f"the model returned NaN or inf at timestep {t:g} (σ = {sigma:.6g}); "
                                     "check its weights and inputs, or sample in float32/float64")
        return eps


def denoiser_field(denoiser: Denoiser) -> Field:
    """Eq 14's field for a denoiser D(x̄, σ) in EDM's / k-diffusion's form: ε = (x̄ - D(x̄, σ)) / σ.

    ``denoiser(x_bar, sigma)`` takes the state x̄ = x_0 + σ n (variance exploding: EDM's ``x``) and
    σ as a tensor [B], and returns its x_0 prediction shaped like x̄; any σ > 0 may be asked for,
    with no DDPM schedule involved. The σ tensors are made once per level.
    """
    sigmas: dict[tuple, Tensor] = {}

    def eps(x_bar: Tensor, sigma: float) -> Tensor:
        key = (sigma, x_bar.shape[0], x_bar.dtype, x_bar.device)
        s = sigmas.get(key)
        if s is None:
            s = sigmas[key] = torch.full((x_bar.shape[0],), float(sigma), dtype=x_bar.dtype, device=x_bar.device)
        d = denoiser(x_bar, s)
        if not isinstance(d, Tensor) or d.shape != x_bar.shape or d.dtype != x_bar.dtype:
            got = (tuple(d.shape), d.dtype) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"denoiser must return D shaped and typed like x̄ {tuple(x_bar.shape)} {x_bar.dtype}, got {got} "
                             f"(at σ = {sigma:g})")
        return (x_bar - d) / sigma  # x̄ = D + σ ε

    return eps
