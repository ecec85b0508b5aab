"""Cross-check the ODE methods of :mod:`ddim_edu.solvers` against diffusers' schedulers.

Same exact-ε model (a Gaussian mixture), same x_T, same noise levels, float64 throughout.

======================  ===============================================  =============================
ours                    diffusers                                        agreement
======================  ===============================================  =============================
``euler``               ``EulerDiscreteScheduler``                       1e-6 over a run; to rounding
                                                                         step by step (its ``step``
                                                                         rounds the state to float32)
``heun``                ``HeunDiscreteScheduler``                        to rounding
``dpm_solver_2``        ``KDPM2DiscreteScheduler`` (any grid) and        to rounding
                        ``DPMSolverSinglestepScheduler`` (order 2,
                        ``"dpmsolver"``, λ-uniform grid)
``dpm_solver_3``        none: ``DPMSolverSinglestepScheduler`` order 3   differs at O(h³) per step,
                        is a different third-order method (its second    see the test below
                        stage), see ``test_dpm_solver_3_...``
``rk4``                 none                                             —
``dpmpp_2m``            ``DPMSolverMultistepScheduler``                  1e-6 (float32 inside)
``dpmpp_3m``            none: ``DPMSolverMultistepScheduler`` order 3    differs in its start-up and
                        weights the second difference by half the        its d₂ weight only, see
                        exact integral's weight                          ``test_dpmpp_3m_...``
``unipc``               ``UniPCMultistepScheduler`` (its defaults)       to rounding
``pc_sigma``            none (this library's: UniPC's scheme in σ)       —
======================  ===============================================  =============================

``rk4`` has no counterpart: diffusers has no classical Runge–Kutta scheduler. PNDM's pseudo
Runge–Kutta warm-up (``PNDMScheduler.step_prk``) also takes four ε evaluations per step, but
each stage is a DDIM transfer to the *timestep* midpoint t - δ/2 (an integer index), not to the
σ-midpoint σ + h/2, and it only runs for the first three steps before switching to PLMS; it is
classical RK4 in σ only if σ were linear in t. ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver"`` is a noise-prediction multistep method, which this library does
not have (``dpmpp_2m`` is the data-prediction one).

Conventions the tests bridge:

- State. Euler, Heun and KDPM2 integrate our x̄ = x / sqrt(ᾱ) itself (``scale_model_input``
  divides by sqrt(σ² + 1) to give the model x); they return x̄ at σ = 0, which is x_0. A
  pipeline starts them at ``x_T * init_noise_sigma``, which for ``"linspace"``/``"trailing"``
  spacing is σ_max rather than sqrt(σ_max² + 1) (a relative 2e-5 at σ_max ≈ 157); here both
  routes start at ``x_T * sqrt(σ_max² + 1)``. DPMSolverSinglestep works on x itself.
- Noise levels. diffusers rounds σ to float32 even with float64 ``alphas_cumprod``. Each test
  first checks that diffusers' σ are ours to float32 rounding, then substitutes the float64
  values (same layout, same formula), so what is compared is the method, not float32 rounding.
- Model time. At integer timesteps both libraries mean the same noise level, and the integer-grid
  tests assert diffusers passes the t we use. Between integers they do not: diffusers maps σ to t
  by interpolating log σ linearly in t (``_sigma_to_t``), while :meth:`Schedule.t_from_sigma`
  interpolates log ᾱ; on a 10-point Karras grid the two t differ by up to 0.01 (at t ≈ 18), which
  moves Heun's x_0 by ~5e-5. KDPM2 (Karras σ) rounds, and DPMSolverSinglestep casts to int64, the
  timesteps of fractional grids while keeping the unrounded σ, so a pipeline would evaluate the
  network up to a timestep away from the σ its update assumes. So the tests evaluate the model at t(σ)
  for the σ the scheduler uses at that call (the σ ``scale_model_input`` divides by): the model
  is treated as a function of the noise level, as a continuous-time network would be.
"""
import math

import pytest
import torch

from ddim_edu import solvers
from ddim_edu.mixture import GaussianMixture
from ddim_edu.model import EpsField
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import integrate, sample

diffusers = pytest.importorskip("diffusers", reason="diffusers (the 'compare' extra) is not installed")

# diffusers feeds torch tensors to NumPy 2, which warns thousands of times per run; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

ROUNDING = {"rtol": 1e-12, "atol": 1e-12}  # float64 rounding over a whole run (observed ≤ 6e-14 absolute)
FLOAT32 = {"rtol": 1e-6, "atol": 0.0}  # diffusers' float32 σ against ours


@pytest.fixture(scope="module")
def setup():
    sched = linear_schedule()
    model = GaussianMixture.ring().eps_model(sched)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sched, model, x


def t_of(sched, sigma) -> float:
    """Our timestep for a noise level σ (clamped to the top level, which float32 σ may overshoot)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(max=sched.sigma_range[1])
    return sched.t_from_sigma(sigma).item()


def run(ref, model, sched, x, sigma_of):
    """diffusers' sampling loop: ε at t(σ), σ = ``sigma_of(ref)`` the level of this call.

    Returns the final sample, the last ε, and the (diffusers t, our t) pairs of every call.
    """
    calls = []
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)
        t_ours = t_of(sched, sigma_of(ref))
        calls.append((float(t), t_ours))
        eps = model(x_in, torch.full((len(x),), t_ours, dtype=torch.float64))
        x = ref.step(eps, t, x).prev_sample
    return x, eps, calls


def sigma_at_step(ref):
    return ref.sigmas[ref.step_index if ref.step_index is not None else 0]


def substitute(ref_sigmas: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """Check diffusers' float32 σ against ours (float32 rounding), then return ours to use instead."""
    assert ref_sigmas.shape == ours.shape
    nonzero = ours > 0
    assert bool((ref_sigmas[~nonzero] == 0).all())
    torch.testing.assert_close(ref_sigmas.double()[nonzero], ours[nonzero], **FLOAT32)
    return ours.clone()


def grid(sched, S, spacing):
    tau = sched.timesteps(S, spacing)
    return tau, sched.sigma(tau).flip(0)  # σ(τ_S) > … > σ(τ_1)


ZERO = torch.zeros(1, dtype=torch.float64)


# --- Euler ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S,spacing", [(10, "trailing"), (50, "trailing"), (10, "karras")])
def test_euler_matches_diffusers(setup, S, spacing):
    """Our Euler in σ (= DDIM) vs EulerDiscreteScheduler: 1e-6 over the run, rounding step by step.

    EulerDiscreteScheduler.step casts the state to float32 before updating it, so over a run the
    two differ by float32 rounding of x̄ (observed 1e-7 to 4e-7). Fed a float32-representable state,
    each of its steps equals ours to float64 rounding.
    """
    sched, model, x = setup
    tau, sig = grid(sched, S, spacing)
    sigmas = torch.cat([sig, ZERO])

    def scheduler():
        ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=sched.T, beta_schedule="linear")
        ref.alphas_cumprod = sched.alphas_cumprod.clone()
        if spacing == "trailing":
            ref.set_timesteps(timesteps=tau.flip(0).tolist())
        else:
            ref.set_timesteps(sigmas=sigmas.tolist())
        ref.sigmas = substitute(ref.sigmas, sigmas)
        return ref

    x_bar = x * math.sqrt(1 + sig[0].item() ** 2)
    theirs, _, calls = run(scheduler(), model, sched, x_bar, sigma_at_step)
    if spacing == "trailing":
        assert all(abs(a - b) < 1e-9 for a, b in calls)  # the same t for the model
    ours = sample(model, x, sched, tau, method="euler")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    ref = scheduler()
    y = x_bar.float().double()
    for k, t in enumerate(ref.timesteps):
        eps = model(ref.scale_model_input(y, t), torch.full((len(x),), t_of(sched, sigmas[k]), dtype=torch.float64))
        theirs = ref.step(eps, t, y).prev_sample
        ours = integrate(EpsField(model, sched), y, sigmas[k:k + 2], "euler")
        torch.testing.assert_close(ours, theirs, **ROUNDING)
        y = theirs.float().double()


# --- Heun -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S,spacing", [(10, "trailing"), (50, "trailing"), (10, "karras")])
def test_heun_matches_diffusers(setup, S, spacing):
    """Our Heun in σ vs HeunDiscreteScheduler (Karras et al. Algorithm 1 without churn, Euler into σ = 0).

    diffusers lays the levels out as σ_S, σ_{S-1}, σ_{S-1}, …, σ_1, σ_1, 0: each pair is one Heun
    step (predictor, then corrector evaluated at the step's end); the last step is Euler.
    """
    sched, model, x = setup
    tau, sig = grid(sched, S, spacing)
    ref = diffusers.HeunDiscreteScheduler(num_train_timesteps=sched.T, beta_schedule="linear",
                                          use_karras_sigmas=spacing == "karras")
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    if spacing == "trailing":
        ref.set_timesteps(timesteps=tau.flip(0).tolist())
    else:
        ref.set_timesteps(S)  # Karras ρ = 7 between σ(0) and σ(T-1): our "karras" spacing
    ref.sigmas = substitute(ref.sigmas, torch.cat([sig[:1], sig[1:].repeat_interleave(2), ZERO]))
    theirs, _, calls = run(ref, model, sched, x * math.sqrt(1 + sig[0].item() ** 2), sigma_at_step)
    assert len(calls) == 2 * S - 1  # 2 evaluations per step, 1 for the last (Euler)
    if spacing == "trailing":
        assert all(abs(a - b) < 1e-9 for a, b in calls)
    ours = sample(model, x, sched, tau, method="heun")
    torch.testing.assert_close(ours, theirs, **ROUNDING)


# --- DPM-Solver-2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("S,spacing", [(10, "trailing"), (50, "trailing"), (10, "karras")])
def test_dpm_solver_2_matches_kdpm2(setup, S, spacing):
    """Our DPM-Solver-2 vs KDPM2DiscreteScheduler (k-diffusion's ``sample_dpm_2``).

    Both take one step per pair of grid levels with the stage at the λ-midpoint sqrt(σ σ')
    (KDPM2's ``sigmas_interpol``: the midpoint of log σ), and an Euler step into σ = 0.
    """
    sched, model, x = setup
    tau, sig = grid(sched, S, spacing)
    ref = diffusers.KDPM2DiscreteScheduler(num_train_timesteps=sched.T, beta_schedule="linear",
                                           use_karras_sigmas=spacing == "karras",
                                           # Karras σ run from the spacing's own lowest level: σ(0) for "linspace"
                                           timestep_spacing="trailing" if spacing == "trailing" else "linspace")
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    ref.set_timesteps(S)
    if spacing == "trailing":  # diffusers' "trailing" is ours
        assert torch.equal(ref.timesteps[::2].double(), tau.flip(0))
    levels = torch.cat([sig, ZERO])
    mid = (levels * levels.roll(1)).sqrt()  # mid[k] = sqrt(σ_k σ_{k-1}); mid[0] unused
    ref.sigmas = substitute(ref.sigmas, torch.cat([levels[:1], levels[1:].repeat_interleave(2), ZERO]))
    ref.sigmas_interpol = torch.cat([ref.sigmas_interpol[:1].double(),
                                     substitute(ref.sigmas_interpol[1:], torch.cat([mid[1:].repeat_interleave(2), ZERO]))])

    def level(ref):
        return ref.sigmas[ref.step_index] if ref.state_in_first_order else ref.sigmas_interpol[ref.step_index]

    theirs, _, calls = run(ref, model, sched, x * math.sqrt(1 + sig[0].item() ** 2), level)
    assert len(calls) == 2 * S - 1
    if spacing == "trailing":  # the grid levels (not the midpoints) are integer timesteps
        assert all(abs(a - b) < 1e-9 for a, b in calls[::2])
    ours = sample(model, x, sched, tau, method="dpm_solver_2")
    torch.testing.assert_close(ours, theirs, **ROUNDING)


def singlestep(sched, S, order):
    """DPMSolverSinglestepScheduler (noise prediction) whose grid holds our λ-uniform S-point grid.

    Singlestep DPM-Solver-k in diffusers groups k consecutive grid levels into one step whose
    intermediate stages are the inner levels: with ``lower_order_final`` and N = k(S-1) + 1
    levels, its orders are [1, 2, …, k] × (S-1) + [1]. On N levels uniform in λ (its
    ``use_exponential_sigmas``, from σ(T-1) to σ(0)) the inner levels sit at the λ-fractions
    1/2 (k = 2) or 1/3, 2/3 (k = 3): our stages, and every k-th level is our ``"logsnr"`` grid.
    ``algorithm_type="dpmsolver"`` cannot step into σ = 0 (it requires
    ``final_sigmas_type="sigma_min"``): its last step goes from σ(0) to σ(0), the identity.
    """
    N = order * (S - 1) + 1
    ref = diffusers.DPMSolverSinglestepScheduler(
        num_train_timesteps=sched.T, beta_schedule="linear", algorithm_type="dpmsolver", solver_order=order,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="sigma_min", use_exponential_sigmas=True)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    ref.set_timesteps(N)
    assert ref.order_list == [*range(1, order + 1)] * (S - 1) + [1]
    lo, hi = sched.sigma_range
    levels = torch.linspace(math.log(hi), math.log(lo), N, dtype=torch.float64).exp()
    ref.sigmas = substitute(ref.sigmas, torch.cat([levels, levels[-1:]]))
    ref.set_begin_index(0)  # its int64 timesteps can repeat at the top; start at the first level
    return ref, levels


def run_singlestep(ref, model, sched, x, sig):
    """diffusers' run to σ(τ_1) = σ(0), then the common last step: Euler (= DDIM) into σ = 0."""
    x1, eps1, calls = run(ref, model, sched, x, sigma_at_step)
    assert abs(calls[-1][1] - 0.0) < 1e-9  # the last ε is at τ_1 = 0
    alpha = 1 / (1 + sig[-1].item() ** 2)
    return (x1 - math.sqrt(1 - alpha) * eps1) / math.sqrt(alpha)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # algorithm_type="dpmsolver" is deprecated in diffusers
@pytest.mark.parametrize("S", [5, 20])
def test_dpm_solver_2_matches_singlestep_order_2(setup, S):
    """Our DPM-Solver-2 vs DPMSolverSinglestepScheduler, order 2, noise prediction, midpoint form.

    With r₀ = 1/2 diffusers' ``- σ_t (e^h - 1) (D0 + D1/2)`` is ``- σ_t (e^h - 1) ε(u, s_mid)``:
    Algorithm 1 of Lu et al. (2022), ours.
    """
    sched, model, x = setup
    tau, sig = grid(sched, S, "logsnr")
    ref, levels = singlestep(sched, S, 2)
    torch.testing.assert_close(levels[::2], sig, rtol=1e-13, atol=0)
    theirs = run_singlestep(ref, model, sched, x, sig)
    ours = sample(model, x, sched, tau, method="dpm_solver_2")
    torch.testing.assert_close(ours, theirs, **ROUNDING)


# --- DPM-Solver-3: no counterpart -------------------------------------------------------------------


def dpm_solver_3_diffusers_stage(x, s, s_next, history):
    """Our DPM-Solver-3 with its second stage as diffusers' singlestep order 3 computes it.

    Lu et al.'s Algorithm 2 (ours) predicts u₂ at σ₂ = σ e^{-2h/3} with the φ₂ correction
    ``u₂ = x̄ + (σ₂ - σ) ε - σ₂ (r₂/r₁) ((e^{r₂h} - 1)/(r₂h) - 1) (ε(u₁, σ₁) - ε)``. diffusers reaches
    σ₂ by its own order-2 (midpoint) update over [σ, σ₂], whose midpoint in λ is σ₁:
    ``u₂ = x̄ + (σ₂ - σ) ε(u₁, σ₁)``. The two agree to O(h³) only. Stages 1 and 3 are the same.
    """
    e = history[-1].eps
    if s_next == 0:
        return x + (s_next - s) * e
    h = math.log(s / s_next)
    s1, s2 = solvers.dpm_solver_3_stages(s, s_next, False)
    e1 = yield x + (s1 - s) * e, s1
    e2 = yield x + (s2 - s) * e1, s2
    return x + (s_next - s) * e - s_next * 1.5 * (math.expm1(h) / h - 1) * (e2 - e)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("S", [5, 10])
def test_dpm_solver_3_differs_from_singlestep_order_3_only_in_the_second_stage(setup, S, monkeypatch):
    """DPMSolverSinglestepScheduler order 3 is not our DPM-Solver-3: it is a different third-order method.

    It chains its order-1, order-2 and order-3 updates over each group of three levels, so its
    second stage is a DPM-Solver-2 step, not Algorithm 2's (see ``dpm_solver_3_diffusers_stage``).
    Run through our ``sample`` with that one stage swapped in, ours matches diffusers to rounding;
    with our own stage the two differ far beyond 1e-6 (O(h³) per step, shrinking as S grows).
    """
    sched, model, x = setup
    tau, sig = grid(sched, S, "logsnr")
    ref, levels = singlestep(sched, S, 3)
    torch.testing.assert_close(levels[::3], sig, rtol=1e-13, atol=0)
    theirs = run_singlestep(ref, model, sched, x, sig)
    monkeypatch.setitem(solvers.METHODS, "dpm_solver_3_diffusers_stage",
                        solvers.Method(dpm_solver_3_diffusers_stage, 3, solvers.dpm_solver_3_stages))
    variant = sample(model, x, sched, tau, method="dpm_solver_3_diffusers_stage")
    torch.testing.assert_close(variant, theirs, **ROUNDING)
    ours = sample(model, x, sched, tau, method="dpm_solver_3")
    assert (ours - theirs).abs().max() > 1e-5


# --- DPM-Solver++(2M), and (3M) with a different third-order weight ------------------------------------


def dpm_multistep(sched, model, x, tau, order):
    """DPMSolverMultistepScheduler (dpmsolver++, the last step to σ = 0 first order) over integer τ."""
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=sched.T, beta_schedule="linear",
                                                algorithm_type="dpmsolver++", solver_order=order,
                                                final_sigmas_type="zero", lower_order_final=True)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    ref.set_timesteps(timesteps=tau.long().flip(0).tolist())
    for t in ref.timesteps:
        x = ref.step(model(x, torch.full((len(x),), float(t), dtype=torch.float64)), t, x).prev_sample
    return x


@pytest.mark.parametrize("S", [10, 20, 50])
def test_dpmpp_2m_matches_diffusers(setup, S):
    """Our DPM-Solver++(2M) vs DPMSolverMultistepScheduler (order 2): to 1e-6, as diffusers keeps
    its σ and, inside ``step``, the state in float32."""
    sched, model, x = setup
    tau = sched.timesteps(S, "trailing")
    torch.testing.assert_close(sample(model, x, sched, tau, method="dpmpp_2m"), dpm_multistep(sched, model, x, tau, 2),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("S", [20, 40])
def test_dpmpp_3m_differs_from_diffusers_order_3_only_in_its_weights(setup, S, monkeypatch, dpmpp_3m_variant):
    """DPMSolverMultistepScheduler(solver_order=3) is our ``dpmpp_3m`` with the DDIM start-up and the half d₂
    weight of ``dpmpp_3m_variant``: with those swapped in, the two agree to 1e-6; ours differs
    far beyond that. S ≥ 15, where diffusers lowers the order of the last step only."""
    sched, model, x = setup
    tau = sched.timesteps(S, "trailing")
    theirs = dpm_multistep(sched, model, x, tau, 3)
    step = dpmpp_3m_variant(ddim_start=True, half_d2=True)
    monkeypatch.setitem(solvers.METHODS, "dpmpp_3m_diffusers", solvers.Method(step, 3))
    torch.testing.assert_close(sample(model, x, sched, tau, method="dpmpp_3m_diffusers"), theirs, rtol=0, atol=1e-6)
    assert (sample(model, x, sched, tau, method="dpmpp_3m") - theirs).abs().max() > 1e-4


# --- UniPC ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S,spacing", [(5, "trailing"), (20, "trailing"), (10, "logsnr")])
def test_unipc_matches_diffusers(setup, S, spacing):
    """Our UniPC vs UniPCMultistepScheduler at its defaults (bh2, order 2 with the corrector, x_0 prediction).

    It steps x itself, evaluating the model at the level where the previous step landed. Its
    ``timesteps`` only index the steps here: the noise levels are ours, set in float64, and the
    model is evaluated at t(σ), so fractional grids are compared too.
    """
    sched, model, x = setup
    tau, sig = grid(sched, S, spacing)
    ref = diffusers.UniPCMultistepScheduler(num_train_timesteps=sched.T, beta_schedule="linear")
    assert (ref.config.solver_type, ref.config.solver_order, ref.config.predict_x0) == ("bh2", 2, True)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    ref.set_timesteps(S)  # resets the multistep state; then our levels replace its own
    ref.timesteps = tau.long().flip(0) if spacing == "trailing" else torch.arange(S - 1, -1, -1)
    ref.sigmas = torch.cat([sig, ZERO])
    theirs, _, calls = run(ref, model, sched, x, sigma_at_step)
    assert len(calls) == S
    if spacing == "trailing":
        assert all(abs(a - b) < 1e-9 for a, b in calls)  # the same t for the model
    ours = sample(model, x, sched, tau, method="unipc")
    torch.testing.assert_close(ours, theirs, **ROUNDING)
