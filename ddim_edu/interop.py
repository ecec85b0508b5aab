"""Adapters between this library and diffusers: their models on our samplers, our methods in their pipelines.

- :func:`from_diffusers` turns a diffusers ``UNet2DModel`` (any configuration) and its scheduler
  into ``(model, schedule)`` in this library's contract (:mod:`ddim_edu.model`), so that
  ``solvers.sample(model, x_T, schedule, timesteps, method=...)`` is one call: the schedule is
  rebuilt from the scheduler's β, its ``prediction_type`` (ε, x_0 or v) is converted to ε, and the
  input is cast to the network's dtype and the output back.
- :class:`DiffusersScheduler` is a scheduler with diffusers' protocol (``set_timesteps``,
  ``timesteps``, ``step(model_output, t, sample).prev_sample``), so that a pipeline such as
  ``DDPMPipeline(unet=unet, scheduler=DiffusersScheduler(method="pc_sigma"))`` samples with this
  library's methods, exactly as :func:`ddim_edu.solvers.sample` does.

For an EDM / k-diffusion denoiser D(x, σ), which needs no DDPM schedule, see
:func:`ddim_edu.model.denoiser_field` with :func:`ddim_edu.solvers.integrate` and
:func:`ddim_edu.schedules.karras_sigmas`. diffusers is imported only by the caller: nothing here
needs it installed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from .forward import check_eta, q_sample
from .model import PREDICTION_TYPES, Model, as_eps_model, eps_from_prediction, timesteps_at
from .sampling import ddim_requests, sigma_hat_requests
from .schedules import SPACINGS, Schedule, cosine_schedule
from .solvers import ADAPTIVE, FINAL_STEPS, METHODS, SAMPLERS, check_options, solve

__all__ = ["DiffusersScheduler", "SchedulerOutput", "from_diffusers", "schedule_from_config"]


def _config_get(scheduler, key: str, default=None):
    config = getattr(scheduler, "config", {})
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def from_diffusers(unet, scheduler) -> tuple[Model, Schedule]:
    """``(model, schedule)`` for a diffusers ``UNet2DModel`` and the scheduler it was trained with.

    ``schedule`` is :class:`~ddim_edu.schedules.Schedule` of ``scheduler.betas``. ``model(x, t)`` calls
    ``unet(x, t).sample`` with x cast to the network's dtype (a float32 network accepts float64
    states this way) and returns ε in x's dtype, converted from the scheduler's
    ``prediction_type`` (``"epsilon"``, ``"v_prediction"`` or ``"sample"``) at ᾱ(t).
    """
    betas = getattr(scheduler, "betas", None)
    if not isinstance(betas, Tensor):
        raise ValueError(f"scheduler must be a diffusers scheduler with a tensor of betas (DDPMScheduler, DDIMScheduler, "
                         f"DPMSolverMultistepScheduler, ...), got {type(scheduler).__name__}")
    schedule = Schedule(betas.double().cpu())
    prediction_type = _config_get(scheduler, "prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler's prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not callable(unet):
        raise ValueError(f"unet must be a diffusers UNet2DModel (callable), got {type(unet).__name__}")
    parameter = next(iter(unet.parameters()), None) if hasattr(unet, "parameters") else None
    dtype = parameter.dtype if parameter is not None else None

    def network(x: Tensor, t: Tensor) -> Tensor:
        out = unet(x if dtype is None else x.to(dtype), t)
        out = getattr(out, "sample", out)  # UNet2DOutput
        if not isinstance(out, Tensor):
            raise ValueError(f"unet(x, t) must return a tensor or an output with .sample, got {type(out).__name__}")
        return out.to(x.dtype)

    return as_eps_model(network, schedule, prediction_type), schedule


# --- a diffusers-style scheduler over this library's methods ------------------------------------------


@dataclass
class SchedulerOutput:
    """What :meth:`DiffusersScheduler.step` returns: the sample the pipeline feeds the model next (x_0 at the end)."""

    prev_sample: Tensor


# Config entries of diffusers' schedulers that do not change what these methods compute.
_IGNORED = {
    "_class_name": "bookkeeping",
    "_diffusers_version": "bookkeeping",
    "_use_default_values": "bookkeeping",
    "variance_type": "DDPM's choice of ancestral variance; ddim uses σ(η) of Eq 16",
    "set_alpha_to_one": "the last step always lands on ᾱ = 1 (the paper's α_0)",
    "skip_prk_steps": "PNDM's warm-up",
    "solver_order": "the method fixes its order",
    "algorithm_type": "the method fixes its algorithm",
    "solver_type": "the method fixes its algorithm",
    "lower_order_final": "every method takes its own last step to σ = 0",
    "disable_corrector": "the method fixes its corrector",
    "predict_x0": "the method fixes its parameterisation",
    "timestep_type": "discrete timesteps",
    "sample_max_value": "used only with clip_sample or thresholding",
    "dynamic_thresholding_ratio": "used only with thresholding",
    "clip_sample_range": "read with clip_sample",
}
# Config entries that would change the computation and are not implemented: their neutral values.
_NEUTRAL = {"thresholding": False, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
            "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
            "euler_at_final": False, "final_sigmas_type": "zero"}


def schedule_from_config(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                         beta_schedule: str = "linear", trained_betas=None) -> Schedule:
    """The :class:`Schedule` a diffusers scheduler config describes (its β, as diffusers builds them)."""
    T = num_train_timesteps
    if trained_betas is not None:
        return Schedule(torch.as_tensor(trained_betas, dtype=torch.float64))
    if beta_schedule == "linear":
        return Schedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float32).double())
    if beta_schedule == "scaled_linear":  # the latent-diffusion schedule
        return Schedule((torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2).double())
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_schedule(T)
    raise ValueError(f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2' (or pass trained_betas), "
                     f"got {beta_schedule!r}")


class DiffusersScheduler:
    """A scheduler with diffusers' protocol that samples with a method of :func:`ddim_edu.solvers.sample`.

    ``set_timesteps(S)`` chooses τ (``timestep_spacing``: diffusers' ``"leading"`` (with
    ``steps_offset``), ``"trailing"`` or ``"linspace"``, or any spacing of
    :meth:`Schedule.timesteps`) and lists in ``timesteps`` the time input of every model evaluation
    the method makes, in order: a pipeline's ``for t in scheduler.timesteps`` then calls the model
    exactly where :func:`~ddim_edu.solvers.sample` would. Methods with several evaluations per
    step, and the predictor–corrector methods (whose corrector runs when the next step's evaluation
    arrives), are driven through the same step functions as ``sample`` (the request protocol of
    :mod:`ddim_edu.solvers`), so the result equals ``sample``'s on the same model and x_T. The
    scheduler keeps the solver's state itself, so the sample a pipeline passes to :meth:`step` must
    be the one the previous step returned; torchdiffeq's adaptive solvers, whose evaluations are
    not known in advance, are refused.

    ``config`` takes diffusers' scheduler config entries (so ``DiffusersScheduler.from_config(
    pipe.scheduler.config, method=...)`` works): ``num_train_timesteps``, ``beta_start``,
    ``beta_end``, ``beta_schedule``, ``trained_betas``, ``prediction_type``, ``timestep_spacing``,
    ``steps_offset``, ``clip_sample`` (with ``clip_sample_range``: the Eq 12 samplers' ``clip_x0``).
    Entries that do not change these methods are ignored; ones that would (``thresholding``, …)
    are refused unless they have their neutral value. ``timestep_spacing="equalised"`` takes the
    model's pilot profile as ``profile=`` (:func:`ddim_edu.solvers.pilot_profile`; not a config entry).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, method: str = "pc_sigma", *, eta: float = 0.0, final_step: str = "euler",
                 profile: tuple[Tensor, Tensor] | None = None, **config):
        if method in ADAPTIVE:
            raise ValueError(f"method {method!r} chooses its evaluations while it runs, but a pipeline asks for all of "
                             f"them (scheduler.timesteps) first; use one of {', '.join([*SAMPLERS, *METHODS])}")
        check_options(method, eta=eta, final_step=final_step)
        unknown = sorted(set(config) - {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                        "prediction_type", "timestep_spacing", "steps_offset", "clip_sample",
                                        *_IGNORED, *_NEUTRAL})
        if unknown:
            raise ValueError(f"unknown scheduler config entries {unknown}")
        changed = {k: v for k, v in config.items() if k in _NEUTRAL and k not in _IGNORED and v != _NEUTRAL[k]}
        if changed:
            raise ValueError(f"{changed} would change the computation and is not implemented here; "
                             f"pass the neutral values {({k: _NEUTRAL[k] for k in changed})}")
        self.method, self.eta, self.final_step = method, check_eta(eta), final_step
        self.schedule = schedule_from_config(**{k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                                      "beta_schedule", "trained_betas") if k in config})
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.timestep_spacing = config.get("timestep_spacing", "leading")
        if self.timestep_spacing not in ("linspace", *SPACINGS):
            raise ValueError(f"timestep_spacing must be one of {('linspace', *SPACINGS)}, got {self.timestep_spacing!r}")
        if (profile is None) != (self.timestep_spacing != "equalised"):
            raise ValueError("timestep_spacing='equalised' takes profile=ddim_edu.solvers.pilot_profile(model, schedule, "
                             "x_pilot), and profile= is for that spacing only"
                             f" (got timestep_spacing={self.timestep_spacing!r}, profile {'given' if profile is not None else 'not given'})")
        self.profile = profile
        self.steps_offset = int(config.get("steps_offset", 0))
        if self.steps_offset and self.timestep_spacing != "leading":
            raise ValueError("steps_offset applies to timestep_spacing='leading' only")
        clip = config.get("clip_sample")  # absent: the sampler's own default (none for ddim, 1 for sigma_hat)
        self._clip = {} if clip is None else {"clip_x0": float(config.get("clip_sample_range", 1.0)) if clip else None}
        if clip and method not in SAMPLERS:
            raise ValueError(f"clip_sample=True applies to the Eq 12 samplers ({', '.join(SAMPLERS)}); the ODE method "
                             f"{method!r} does not clip x_0: pass clip_sample=False")
        self.config = MappingProxyType({"method": method, "eta": self.eta, "final_step": final_step,
                                        "num_train_timesteps": self.schedule.T, **config})
        self.timesteps: Tensor | None = None
        self.num_inference_steps: int | None = None
        self._tau: Tensor | None = None
        self._run = None

    @classmethod
    def from_config(cls, config: Mapping, **kwargs) -> "DiffusersScheduler":
        """Like diffusers' ``Scheduler.from_config(other.config, ...)``; ``kwargs`` (``method=``, …) take precedence."""
        return cls(**{**dict(config), **kwargs})

    def __len__(self) -> int:
        return self.schedule.T

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The model takes the sample as it is (x_t in DDPM's coordinates)."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Eq 4, x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, at integer timesteps [B] (for image-to-image pipelines)."""
        alpha = self.schedule.alphas_cumprod[torch.as_tensor(timesteps).long().cpu()]
        return q_sample(original_samples, alpha, noise)

    def _grid(self, S: int) -> Tensor:
        """τ for S steps, increasing, as ``timestep_spacing`` defines it."""
        T = self.schedule.T
        if self.timestep_spacing == "linspace":  # diffusers': round(linspace(0, T-1, S))
            return torch.tensor(sorted(set(np.linspace(0, T - 1, S).round().astype(np.int64).tolist())), dtype=torch.float64)
        tau = self.schedule.timesteps(S, self.timestep_spacing, profile=self.profile)
        return tau + self.steps_offset if self.steps_offset else tau

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose τ for ``num_inference_steps`` steps and list the time input of every model evaluation in ``timesteps``."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        tau = self.schedule.check_timesteps(self._grid(num_inference_steps))
        check_options(self.method, len(tau), eta=self.eta, final_step=self.final_step)
        if self.method in SAMPLERS:
            times = tau.flip(0).tolist()
            self._levels = None
        else:
            sigmas = self.schedule.sigma(tau).flip(0).tolist()
            self._grid_sigmas = [*sigmas, 0.0]
            self._levels = METHODS[self.method].levels(self._grid_sigmas)
            self._t = timesteps_at(self.schedule, self._levels, dict(zip(sigmas, tau.flip(0).tolist())))
            times = [self._t[s] for s in self._levels]
        integral = all(float(t).is_integer() for t in times)
        # Integer timesteps as diffusers gives them; fractional ones as the float32 time input sample() feeds.
        self.timesteps = torch.tensor(times, dtype=torch.int64 if integral else torch.float32, device=device)
        self.num_inference_steps = num_inference_steps
        self._tau, self._run = tau, None

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """Take the model's output at ``sample`` (the time input ``timestep``) and return the next sample to evaluate
        the model at, or x_0 after the last evaluation, as ``SchedulerOutput(prev_sample)`` (``(prev_sample,)`` with
        ``return_dict=False``)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self._run is None:  # the first evaluation: start the solve from x_T = sample
            self._run = self._start(sample, generator)
            self._index, self._returned = 0, sample
        elif self._index >= len(self.timesteps):
            raise ValueError("the solve is finished: call set_timesteps again before stepping anew")
        elif sample is not self._returned and not torch.equal(sample, self._returned):
            raise ValueError("the sample passed to step() is not the one the previous step returned; this scheduler keeps "
                             "the solver's state, so pipelines that edit the sample between steps are not supported")
        expected = self.timesteps[self._index].item()
        given = float(torch.as_tensor(timestep).reshape(-1)[0])
        if abs(given - expected) > 1e-4 * max(1.0, abs(expected)):
            raise ValueError(f"step() got timestep {given:g} where scheduler.timesteps[{self._index}] = {expected:g}; "
                             "call the model at the entries of scheduler.timesteps, in order")
        x_in, level = self._pending
        alpha = self.schedule.alpha_bar(level) if self._levels is None else 1.0 / (1.0 + level * level)
        eps = eps_from_prediction(model_output.to(sample.dtype), sample, alpha, self.prediction_type)
        try:
            request = self._run.send(eps)
        except StopIteration as done:
            prev = done.value
        else:
            prev = self._model_input(request)
        self._index += 1
        self._returned = prev
        return SchedulerOutput(prev) if return_dict else (prev,)

    def _start(self, x_T: Tensor, generator):
        """The request generator of the solve, advanced to its first request."""
        if self.method == "ddim":
            run = ddim_requests(x_T, self.schedule, self._tau, self.eta, generator=generator, **self._clip)
        elif self.method == "sigma_hat":
            run = sigma_hat_requests(x_T, self.schedule, self._tau, generator=generator, **self._clip)
        else:
            x_bar = x_T * math.sqrt(1 + self._grid_sigmas[0] ** 2)  # x̄ = x / sqrt(ᾱ)
            run = solve(self.method, x_bar, self._grid_sigmas, final_step=self.final_step)
        self._model_input(next(run))
        return run

    def _model_input(self, request) -> Tensor:
        """Remember a request and return the sample the model is to be evaluated at: x itself for the Eq 12
        samplers (a timestep), x = x̄ / sqrt(1 + σ²) for the ODE methods (a noise level)."""
        x, level = request
        self._pending = request
        return x if self._levels is None else x * (1.0 / math.sqrt(1.0 + level * level))
