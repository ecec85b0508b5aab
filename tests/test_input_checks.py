"""Bad input to the paper's core is refused with a ValueError that names the parameter, instead of a silent
NaN, a clamp where an equation is undefined, or a raw Python or torch error from deep inside."""
import math

import pytest
import torch

from ddim_edu import GaussianMixture, linear_schedule, theorem1
from ddim_edu.interpolation import slerp
from ddim_edu.schedules import Schedule
from ddim_edu.solvers import encode, sample

SCHED = linear_schedule()
RING = GaussianMixture.ring()
MODEL = RING.eps_model(SCHED)
X = torch.randn(4, 2, dtype=torch.float64)

CASES = {
    "schedule from a string": (lambda: Schedule("abc"), "betas must be a 1-D sequence of numbers"),
    "ᾱ underflowing to 0": (lambda: Schedule(torch.full((2000,), 0.9)), "ᾱ underflows to 0 at timestep"),
    "σ = NaN": (lambda: SCHED.t_from_sigma(float("nan")), "sigma must be a number >= 0, got NaN"),
    "log ᾱ = NaN": (lambda: SCHED.t_from_log_alpha_bar(float("nan")), "must not be NaN"),
    "Karras ρ = 0": (lambda: SCHED.timesteps(10, "karras", rho=0.0), "rho must be a finite number > 0"),
    "Karras ρ = NaN": (lambda: SCHED.timesteps(10, "karras", rho=float("nan")), "rho must be a finite number > 0"),
    "η = 2 in Theorem 1": (lambda: theorem1.sigmas_for_eta(SCHED, 2.0, 0.01), "the largest η for this schedule is 1.35"),
    "σ_t beyond Eq 7 in γ": (lambda: theorem1.gamma_exact(SCHED, torch.full((1000,), 0.5, dtype=torch.float64)),
                             r"Eq 7 needs σ_t² <= 1 - α_\(t-1\), violated at t = \[2"),
    "int data to Theorem 1": (lambda: theorem1.j_sigma_samples(MODEL, torch.ones(4, 2, dtype=torch.long), SCHED, 1.0, 0.01),
                              "x0 must be a floating-point tensor of data points"),
    "1-D data to Theorem 1": (lambda: theorem1.l_gamma_samples(MODEL, torch.ones(4, dtype=torch.float64), SCHED,
                                                               torch.ones(1000, dtype=torch.float64)), "x0 must be"),
    "mixture weight inf": (lambda: GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [0.1, 0.1], [1.0, math.inf]),
                           "weights must be positive and finite"),
    "mixture mean NaN": (lambda: GaussianMixture([[math.nan, 0.0]], [0.1]), "means must be finite"),
    "mixture std inf": (lambda: GaussianMixture([[0.0, 0.0]], [math.inf]), "stds must be positive and finite"),
    "mixture of K = 0": (lambda: GaussianMixture(torch.zeros(0, 2), torch.zeros(0)), "at least one component"),
    "slerp weight NaN": (lambda: slerp(torch.randn(2, 3), torch.randn(2, 3), math.nan), "weight must lie in"),
    "slerp int latents": (lambda: slerp(torch.ones(2, 3, dtype=torch.long), 2 * torch.ones(2, 3, dtype=torch.long), 0.5),
                          "x0 must be a floating-point batch of latents"),
    "slerp 1-D latents": (lambda: slerp(torch.randn(3), torch.randn(3), 0.5), "batch of latents"),
    "no model": (lambda: sample(None, X, SCHED, [0, 10]), "model must be a callable"),
    "schedule as a list": (lambda: sample(MODEL, X, [0.1, 0.2], [0, 10]), "schedule must be a ddim_edu.schedules.Schedule"),
    "encode without model": (lambda: encode(None, X, SCHED, [0, 10]), "model must be a callable"),
    "η as a string": (lambda: sample(MODEL, X, SCHED, [0, 10], eta="0.5"), "eta must be a finite number"),
    "η = None": (lambda: sample(MODEL, X, SCHED, [0, 10], eta=None), "eta must be a finite number"),
    "η = inf": (lambda: sample(MODEL, X, SCHED, [0], eta=math.inf), "eta must be a finite number"),
    "clip_x0 = -1": (lambda: sample(MODEL, X, SCHED, [0, 10], clip_x0=-1.0), "clip_x0 must be a number > 0"),
    "clip_x0 = NaN": (lambda: sample(MODEL, X, SCHED, [0, 10], clip_x0=math.nan), "clip_x0 must be a number > 0"),
    "rtol for a fixed grid": (lambda: sample(MODEL, X, SCHED, [0, 10], "heun", rtol=1e-3), "rtol applies to the methods dopri5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_by_name(case):
    call, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_nan_in_x_T_is_named_not_returned():
    with pytest.raises(FloatingPointError, match="x_T has NaN or inf"):
        sample(MODEL, torch.full((4, 2), math.nan, dtype=torch.float64), SCHED, [0, 10], "unipc")


def test_an_empty_batch_samples_to_an_empty_batch():
    assert sample(MODEL, torch.zeros(0, 2, dtype=torch.float64), SCHED, [0, 10]).shape == (0, 2)
