"""Cross-check the ODE methods of :mod:`ddim_edu.solvers` against k-diffusion's samplers.

Same exact-ε model (a Gaussian mixture), same x_T, same noise levels, float64 throughout.

=================  =======================================================  ============================
ours               k-diffusion (``k_diffusion.sampling``)                   agreement
=================  =======================================================  ============================
``euler``          ``sample_euler``; ``sample_euler_ancestral`` η = 0       to rounding
``heun``           ``sample_heun``                                          to rounding
``dpm_solver_2``   ``sample_dpm_2``; ``sample_dpm_2_ancestral`` η = 0       to rounding
``dpm_solver_3``   ``sample_dpm_fast`` (``DPMSolver.dpm_solver_3_step``)    to rounding on its λ-uniform
                                                                            grid; it stops at σ_min
                                                                            and lowers its last step's
                                                                            order, see
                                                                            ``test_dpm_solver_3_...``
``dpmpp_2m``       ``sample_dpmpp_2m``; ``sample_dpmpp_2m_sde`` η = 0,      to rounding
                   ``solver_type="midpoint"``
``dpmpp_3m``       none: ``sample_dpmpp_3m_sde`` η = 0 starts with DDIM     differs in its start-up and
                   and weights d₂ by half the exact weight                  its d₂ weight only, see
                                                                            ``test_dpmpp_3m_...``
``rk4``,           none                                                     —
``unipc``,
``pc_sigma``
=================  =======================================================  ============================

k-diffusion's other samplers have no counterpart here: ``sample_lms`` is a linear multistep
(Adams–Bashforth) method in σ on dx̄/dσ with its weights from ``scipy.integrate.quad`` at a 1e-4
relative tolerance; ``sample_dpmpp_2s_ancestral`` and ``sample_dpmpp_sde`` (η = 0) are
singlestep methods on the x_0 prediction D, whose second stage enters as
``(σ'/σ) x̄ + (1 - σ'/σ) D(u, σ_mid)``, not as our noise-prediction DPM-Solver-2's
``x̄ + (σ' - σ) ε(u, σ_mid)`` (the two differ by (1 - σ'/σ)(σ_mid - σ)(ε(x̄, σ) - ε(u, σ_mid)) per
step); ``sample_dpm_adaptive`` chooses its own steps.

The mapping. k-diffusion integrates Karras et al.'s variance-exploding ODE dx̄/dσ = (x̄ - D(x̄, σ))/σ
for a denoiser D. For an ε-model, D(x̄, σ) = x̄ - σ ε(x̄/sqrt(1 + σ²), t(σ)) (its
``DiscreteEpsDDPMDenoiser``: c_in = 1/sqrt(σ² + 1), c_out = -σ, σ = sqrt((1 - ᾱ)/ᾱ)), so
(x̄ - D)/σ = ε and its ODE is Eq 14 with x̄ = x/sqrt(ᾱ), our state. Hence:

- x̄_T = x_T · sqrt(1 + σ_T²), with σ_T the schedule's σ at our first timestep τ_S;
- k-diffusion's σ grid is our σ(τ_S) > … > σ(τ_1) followed by 0, where ᾱ = 1 and x̄ = x_0, so
  its result is our x_0 as it stands.

Model time. Most tests wrap the ε-model in the denoiser above with t(σ) from
:meth:`Schedule.t_from_sigma`, the conversion our solvers use, so that at every noise level both
sides evaluate the same ε and only the solvers differ; that also holds between integer timesteps
(DPM-Solver-2's midpoints, the Karras grid). ``DiscreteEpsDDPMDenoiser`` itself maps σ to t by
interpolating log σ linearly between integer timesteps, where :meth:`Schedule.t_from_sigma`
interpolates log ᾱ: the two agree at integer timesteps only, so
``test_k_diffusion_denoiser_wrapper_...`` runs it on integer grids with methods that evaluate the
model on grid levels only, and checks that it passes our t.
"""
import math
import warnings

import pytest
import torch

from ddim_edu.model import EpsField

from ddim_edu import solvers
from ddim_edu.solvers import METHODS, integrate, sample

try:
    with warnings.catch_warnings():  # its dependencies (jsonmerge, clip) warn on import; not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        from k_diffusion import external as kd_external
        from k_diffusion import sampling as kd
except (ImportError, RuntimeError, OSError) as err:  # a torchvision built for another torch raises RuntimeError
    pytest.skip(f"k-diffusion does not import here ({type(err).__name__}: {err}); to run these cross-checks "
                "install k-diffusion (pip install k-diffusion) beside a torchvision built for this torch",
                allow_module_level=True)

ROUNDING = {"rtol": 1e-12, "atol": 1e-12}  # float64 rounding over a whole run
S = 10
GRIDS = ["uniform", "trailing", "karras"]  # 0, 100, …, 900; 99, 199, …, 999; fractional, to T - 1


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def denoiser(model, sched):
    """k-diffusion's denoiser for an ε-model: D(x̄, σ) = x̄ - σ ε(x̄/sqrt(1 + σ²), t(σ)), t(σ) ours."""

    def D(x_bar, sigma):
        assert bool((sigma == sigma[0]).all())  # one noise level per call
        s = sigma[0].item()
        t = sched.t_from_sigma(s).expand(len(x_bar))
        return x_bar - s * model(x_bar / math.sqrt(1 + s**2), t)

    return D


def levels(sched, tau):
    """k-diffusion's σ grid for our timesteps: σ(τ_S) > … > σ(τ_1), then 0."""
    return torch.cat([sched.sigma(tau).flip(0), torch.zeros(1, dtype=torch.float64)])


def no_noise(sigma, sigma_next):
    raise AssertionError("an η = 0 sampler drew noise")


PAIRS = [
    ("euler", "sample_euler", {}),
    ("euler", "sample_euler_ancestral", {"eta": 0.0}),
    ("heun", "sample_heun", {}),
    ("dpm_solver_2", "sample_dpm_2", {}),
    ("dpm_solver_2", "sample_dpm_2_ancestral", {"eta": 0.0}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpmpp_2m", "sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "midpoint", "noise_sampler": no_noise}),
]


def run_k(name, kwargs, model, sched, x_T, tau, **extra):
    sigmas = levels(sched, tau)
    x_bar = x_T * math.sqrt(1 + sigmas[0].item() ** 2)
    return getattr(kd, name)(denoiser(model, sched), x_bar, sigmas, disable=True, **kwargs, **extra)


@pytest.mark.parametrize("spacing", GRIDS)
@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=[p[1] for p in PAIRS])
def test_matches_k_diffusion(recorder, sched, ring, x_T, ours, theirs, kwargs, spacing):
    """Our method vs its k-diffusion sampler: the same x_0 to float64 rounding, the same evaluations.

    All of them take the last step, σ(τ_1) → 0, as an Euler step (``final_step="euler"``; for
    DPM-Solver++(2M) its first-order step, x̄' = D, the same). DPM-Solver-2's stage is at the
    λ-midpoint in both: k-diffusion's ``exp(lerp(log σ, log σ', ½))`` is our sqrt(σ σ').
    η = 0 turns the ancestral and SDE samplers into these ODE samplers (the ancestral ones still
    draw noise, scaled by σ_up = 0; ``sample_dpmpp_2m_sde`` must not draw any).
    """
    tau = sched.timesteps(S, spacing)
    model_k, model_ours = recorder(ring.eps_model(sched)), recorder(ring.eps_model(sched))
    theirs_x0 = run_k(theirs, kwargs, model_k, sched, x_T, tau)
    ours_x0 = sample(model_ours, x_T, sched, tau, method=ours)
    torch.testing.assert_close(ours_x0, theirs_x0, **ROUNDING)
    assert len(model_k.calls) == len(model_ours.calls) == METHODS[ours].nfe(S)
    if spacing != "karras":  # on integer grids, the grid-level evaluations are at integer t
        assert {round(t[0].item()) for t in model_k.calls} >= set(tau.long().tolist())
    assert (ours_x0 - x_T).abs().max() > 0.1  # a real run, not an identity


@pytest.mark.parametrize("ours,theirs,kwargs", [PAIRS[0], PAIRS[2], PAIRS[3], PAIRS[5]],
                         ids=[PAIRS[i][1] for i in (0, 2, 3, 5)])
def test_final_step_extrapolate_is_k_diffusion_plus_the_sigma_squared_extrapolation(
        sched, ring, x_T, ours, theirs, kwargs):
    """``final_step="extrapolate"`` has no k-diffusion counterpart; it is k-diffusion's run plus one line.

    Both end with the Euler step into σ = 0, which returns D_1 = D(x̄_1, σ_1), the x_0 prediction
    at the last level σ_1 = σ(τ_1). Our ``"extrapolate"`` replaces it by the value at σ² = 0 of the
    line through (σ_2², D_2) and (σ_1², D_1), D_2 the prediction at the state on the level before:
    taken from k-diffusion's callback, that line gives our result to rounding.
    """
    tau = sched.timesteps(S, "uniform")
    sigmas = levels(sched, tau)
    denoised = {}

    def callback(info):
        denoised[info["i"]] = info["denoised"]

    theirs_x0 = run_k(theirs, kwargs, ring.eps_model(sched), sched, x_T, tau, callback=callback)
    d_1, d_2 = denoised[S - 1], denoised[S - 2]
    torch.testing.assert_close(theirs_x0, d_1, rtol=0, atol=0)  # the Euler step into 0 returns D_1
    s_1, s_2 = sigmas[S - 1].item(), sigmas[S - 2].item()
    line_at_0 = (s_2**2 * d_1 - s_1**2 * d_2) / (s_2**2 - s_1**2)
    ours_x0 = sample(ring.eps_model(sched), x_T, sched, tau, method=ours, final_step="extrapolate")
    torch.testing.assert_close(ours_x0, line_at_0, **ROUNDING)
    assert (ours_x0 - theirs_x0).abs().max() > 1e-6  # a real difference


@pytest.mark.parametrize("method,theirs", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                           ("dpmpp_2m", "sample_dpmpp_2m")])
@pytest.mark.parametrize("spacing", ["uniform", "trailing"])
def test_k_diffusion_denoiser_wrapper_matches_on_integer_grids(recorder, sched, ring, x_T, method, theirs, spacing):
    """k-diffusion's own wrapper, ``DiscreteEpsDDPMDenoiser`` on our float64 ᾱ, gives our x_0.

    It rebuilds the mapping from ᾱ alone: its σ = sqrt((1 - ᾱ)/ᾱ) table is ours, it feeds the model
    x̄/sqrt(σ² + 1) and returns x̄ - σ ε. On integer grids these methods evaluate the model on grid
    levels only, where its σ → t (log σ interpolated between table entries) returns our τ.
    """
    tau = sched.timesteps(S, spacing)
    model = recorder(ring.eps_model(sched))
    wrapped = kd_external.DiscreteEpsDDPMDenoiser(model, sched.alphas_cumprod, quantize=False)
    torch.testing.assert_close(wrapped.sigmas, sched.sigma(torch.arange(sched.T, dtype=torch.float64)),
                               rtol=1e-14, atol=0)
    sigmas = levels(sched, tau)
    theirs_x0 = getattr(kd, theirs)(wrapped, x_T * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, disable=True)
    t_called = torch.stack([t[0] for t in model.calls])
    expected = tau.flip(0) if method != "heun" else torch.cat([tau[-1:], tau[:-1].flip(0).repeat_interleave(2)])
    torch.testing.assert_close(t_called, expected, rtol=0, atol=1e-9)  # the same t as ours
    torch.testing.assert_close(sample(ring.eps_model(sched), x_T, sched, tau, method=method), theirs_x0, **ROUNDING)


@pytest.fixture
def float64_default():
    """``sample_dpm_fast`` builds its grid with ``torch.tensor(σ)`` and ``torch.linspace``: default dtype."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.parametrize("last_order", [1, 2])
def test_dpm_solver_3_matches_dpm_fast_with_its_lowered_last_step(recorder, sched, ring, x_T, float64_default, last_order):
    """Our DPM-Solver-3 (and -2, and Euler) steps are those of k-diffusion's ``sample_dpm_fast``.

    Lu et al.'s (2022) DPM-Solver-fast with n = 3j + r evaluations (r = 1, 2) takes j + 1 steps on
    a λ-uniform grid of j + 2 levels from σ_max to σ_min: j DPM-Solver-3 steps, then one of order
    r. Unlike our methods it lowers the order of its last step, and it stops at σ_min, returning x̄
    there rather than x_0. With the schedule's range (σ(T-1), σ(0)) and j = S - 2, our
    ``integrate`` with ``dpm_solver_3`` over the first S - 1 of those levels, then
    ``dpm_solver_2`` (r = 2) or ``euler`` (r = 1) over the last pair, gives its result to rounding;
    ``dpm_solver_3`` on the last pair as well does not.
    """
    lo, hi = sched.sigma_range
    n = 3 * (S - 2) + last_order
    model_k = recorder(ring.eps_model(sched))
    x_bar = x_T * math.sqrt(1 + hi**2)
    theirs = kd.sample_dpm_fast(denoiser(model_k, sched), x_bar, lo, hi, n, disable=True)
    assert len(model_k.calls) == n
    sig = (-torch.linspace(-math.log(hi), -math.log(lo), S)).exp()  # its grid: uniform in λ = -log σ
    ours = integrate(EpsField(ring.eps_model(sched), sched), x_bar, sig[:-1], "dpm_solver_3")
    ours = integrate(EpsField(ring.eps_model(sched), sched), ours, sig[-2:], {1: "euler", 2: "dpm_solver_2"}[last_order])
    torch.testing.assert_close(ours, theirs, **ROUNDING)
    assert (integrate(EpsField(ring.eps_model(sched), sched), x_bar, sig, "dpm_solver_3") - theirs).abs().max() > 1e-6
    # Its levels are those of our "logsnr" spacing.
    torch.testing.assert_close(sched.sigma(sched.timesteps(S, "logsnr")).flip(0), sig, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", GRIDS)
def test_dpmpp_3m_differs_from_k_diffusion_only_in_start_up_and_d2_weight(recorder, sched, ring, x_T, spacing, monkeypatch,
                                                                          dpmpp_3m_variant):
    """``sample_dpmpp_3m_sde`` (η = 0) is our ``dpmpp_3m`` with the two changes of ``dpmpp_3m_variant``.

    With both swapped in, ours matches it to rounding with the same S evaluations (ours as it
    stands takes S + 1); with either alone, or neither, the two differ far beyond rounding (on
    these grids, measured: the d₂ weight alone moves x_0 by 9e-3 to 1.5, the start-up alone by
    2e-6 to 5e-4).
    """
    tau = sched.timesteps(S, spacing)
    model_k = recorder(ring.eps_model(sched))
    theirs = run_k("sample_dpmpp_3m_sde", {"eta": 0.0, "noise_sampler": no_noise}, model_k, sched, x_T, tau)
    assert len(model_k.calls) == S
    ours = sample(ring.eps_model(sched), x_T, sched, tau, method="dpmpp_3m")
    for ddim_start in (False, True):
        for half_d2 in (False, True):
            name = f"dpmpp_3m_variant_{ddim_start}_{half_d2}"
            monkeypatch.setitem(METHODS, name, solvers.Method(dpmpp_3m_variant(ddim_start, half_d2), 3,
                                                              solvers.no_stages if ddim_start else solvers.dpmpp_3m_stages))
            model_ours = recorder(ring.eps_model(sched))
            variant = sample(model_ours, x_T, sched, tau, method=name)
            assert len(model_ours.calls) == METHODS[name].nfe(S)
            if ddim_start and half_d2:
                torch.testing.assert_close(variant, theirs, **ROUNDING)
            else:
                assert (variant - theirs).abs().max() > 1e-9
            if not (ddim_start or half_d2):  # the variant without changes is ours
                torch.testing.assert_close(variant, ours, **ROUNDING)
