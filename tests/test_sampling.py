"""The generalised sampler (Eq 12) and the σ̂ variant: equations, boundaries, closed forms, bad input."""
import math

import pytest
import torch

from ddim_edu.forward import q_sigma_reverse_mean, sigma_eta
from ddim_edu.mixture import GaussianMixture
from ddim_edu.sampling import ddim_steps, predict_x0
from ddim_edu.solvers import sample


def x_T(n=64, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_each_step_is_eq12(sched, ring, eta):
    """x_{τ_{i-1}} = sqrt(α_prev) f_θ + sqrt(1-α_prev-σ²) ε_θ + σ z: the Eq 7 mean at x_0 = f_θ, plus noise."""
    model = ring.eps_model(sched)
    tau = sched.timesteps(20, "trailing")
    traj = sample(model, x_T(), sched, tau, eta=eta, generator=torch.Generator().manual_seed(5), return_trajectory=True)
    noise_gen = torch.Generator().manual_seed(5)
    alpha, alpha_prev = sched.step_alphas(tau)
    for j, i in enumerate(range(len(tau) - 1, -1, -1)):
        x = traj[j]
        eps = model(x, torch.full((len(x),), tau[i].item(), dtype=torch.float64))
        f = predict_x0(x, eps, alpha[i])
        s = sigma_eta(alpha[i], alpha_prev[i], eta)
        expected = q_sigma_reverse_mean(x, f, alpha[i], alpha_prev[i], s)
        if s > 0:
            expected = expected + s * torch.randn(x.shape, generator=noise_gen, dtype=x.dtype)
        torch.testing.assert_close(traj[j + 1], expected, rtol=1e-12, atol=1e-12)


def test_last_step_lands_on_alpha_one(sched, ring):
    """The last step returns f_θ(x_{τ_1}) exactly, not a sample at ᾱ(τ_1 - Δ)."""
    model = ring.eps_model(sched)
    tau = sched.timesteps(10, "uniform")
    for eta in (0.0, 1.0):
        steps = list(ddim_steps(model, x_T(), sched, tau, eta, generator=torch.Generator().manual_seed(0)))
        x_last, x_tau1 = steps[-1], steps[-2]
        eps = model(x_tau1, torch.zeros(len(x_tau1), dtype=torch.float64))
        torch.testing.assert_close(x_last, predict_x0(x_tau1, eps, sched.alphas_cumprod[0]), rtol=1e-13, atol=1e-13)


def test_ddim_on_gaussian_data_is_the_exact_linear_flow(sched):
    """For x_0 ~ N(μ, s²I) the ODE of Eq 14 maps x_T to μ + s(x_T - sqrt(ᾱ_T) μ)/sqrt(ᾱ_T s² + 1 - ᾱ_T).

    DDIM (η = 0) with all 1000 steps must reproduce this closed form to discretisation error,
    and the error must shrink as S grows.
    """
    mu, s = torch.tensor([0.7, -0.3], dtype=torch.float64), 0.4
    data = GaussianMixture(mu[None], torch.tensor([s]))
    model = data.eps_model(sched)
    xT = x_T(256)
    t_top = 999.0
    a_top = sched.alpha_bar(t_top)
    exact = mu + s * (xT - a_top.sqrt() * mu) / torch.sqrt(a_top * s**2 + 1 - a_top)
    errors = []
    for S in (10, 100, 1000):
        x0 = sample(model, xT, sched, sched.timesteps(S, "trailing"))
        errors.append((x0 - exact).pow(2).mean().sqrt().item())
    # DDIM is Euler on Eq 14: first order, so 10x the steps gives 1/10 the error.
    orders = [math.log10(errors[k] / errors[k + 1]) for k in range(2)]
    assert all(abs(p - 1) < 0.15 for p in orders), orders
    assert errors[2] < 3e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samples_have_the_data_distribution(sched, eta):
    """On Gaussian data with the exact ε, η = 0 and η = 1 both sample N(μ, s²) (1000 steps)."""
    mu, s = torch.tensor([0.5], dtype=torch.float64), 0.3
    data = GaussianMixture(mu[None], torch.tensor([s]))
    x0 = sample(data.eps_model(sched), x_T(10000, d=1, seed=1), sched, sched.timesteps(1000), eta=eta,
                generator=torch.Generator().manual_seed(2))
    n = len(x0)
    assert ((x0.mean(0) - mu).abs() < 5 * s / math.sqrt(n)).all()
    assert ((x0.std(0) - s).abs() < 5 * s * math.sqrt(2 / n) + 2e-3).all()


def test_eta_zero_is_deterministic_and_generator_reproduces(sched, ring):
    model = ring.eps_model(sched)
    tau = sched.timesteps(10, "uniform")
    a = sample(model, x_T(), sched, tau, eta=0.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, x_T(), sched, tau, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sample(model, x_T(), sched, tau, eta=0.5, generator=torch.Generator().manual_seed(0))
    d = sample(model, x_T(), sched, tau, eta=0.5, generator=torch.Generator().manual_seed(0))
    e = sample(model, x_T(), sched, tau, eta=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_clipping_is_off_by_default_and_bounds_x0_when_on(sched, ring):
    model = lambda x, t: 0.0 * x  # predicts x0 = x / sqrt(ᾱ): far outside [-1, 1]
    xT = 3 * x_T()
    tau = sched.timesteps(10, "uniform")
    free = sample(model, xT, sched, tau)
    assert free.abs().max() > 10
    clipped = sample(model, xT, sched, tau, clip_x0=1.0)
    assert clipped.abs().max() <= 1.0


def test_sigma_hat_step_is_the_reference_ddpm_update(sched, ring):
    """σ̂ row: x_prev = (sqrt(α_prev) β x̂_0 + sqrt(1-β)(1-α_prev) x_t)/(1-α_t) + σ̂ z, β = 1-α_t/α_prev, x̂_0 clipped."""
    model = ring.eps_model(sched)
    tau = sched.timesteps(10, "quad")
    traj = sample(model, x_T(), sched, tau, method="sigma_hat", generator=torch.Generator().manual_seed(3),
                  return_trajectory=True)
    gen = torch.Generator().manual_seed(3)
    alpha, alpha_prev = sched.step_alphas(tau)
    for j, i in enumerate(range(len(tau) - 1, -1, -1)):
        x = traj[j]
        a, ap = alpha[i], alpha_prev[i]
        beta = 1 - a / ap
        eps = model(x, torch.full((len(x),), tau[i].item(), dtype=torch.float64))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        expected = (ap.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ap) * x) / (1 - a)
        if i > 0:
            expected = expected + beta.sqrt() * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        torch.testing.assert_close(traj[j + 1], expected, rtol=1e-12, atol=1e-12)


def test_sampling_runs_in_float32_on_image_shapes(sched):
    x = torch.randn(2, 3, 8, 8)
    out = sample(lambda x, t: 0.1 * x, x, sched, sched.timesteps(5), eta=0.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_names_the_parameter(sched):
    model = lambda x, t: 0.1 * x
    x = x_T(4)
    tau = sched.timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        sample(model, x, sched, tau, eta=-0.5)
    with pytest.raises(ValueError, match="more than T"):
        sample(model, x, sched, list(range(1001)))
    with pytest.raises(ValueError, match="strictly monotone"):
        sample(model, x, sched, [100, 900, 500])
    with pytest.raises(ValueError, match="strictly monotone"):
        sample(model, x, sched, [100, 500, 500])
    # τ in sampling order (diffusers' scheduler.timesteps) is the same set
    assert torch.equal(sample(model, x, sched, [900, 500, 100]), sample(model, x, sched, [100, 500, 900]))
    with pytest.raises(ValueError, match=r"\[0, T-1\]"):
        sample(model, x, sched, [0, 500, 1000])
    with pytest.raises(ValueError, match="method"):
        sample(model, x, sched, tau, method="ddim2")
    with pytest.raises(ValueError, match="eta applies"):
        sample(model, x, sched, tau, method="sigma_hat", eta=0.5)
    with pytest.raises(ValueError, match="x_T"):
        sample(model, [[0.0, 1.0]], sched, tau)
    with pytest.raises(ValueError, match="x_T"):
        sample(model, torch.zeros(4, dtype=torch.int64).reshape(2, 2), sched, tau)


def test_bad_model_output_is_caught(sched):
    x = x_T(4)
    tau = sched.timesteps(10)
    with pytest.raises(ValueError, match="shape"):
        sample(lambda x, t: x[:, :1], x, sched, tau)
    with pytest.raises(ValueError, match="dtype"):
        sample(lambda x, t: x.float(), x, sched, tau)
    with pytest.raises(ValueError, match="shape"):
        sample(lambda x, t: x.numpy(), x, sched, tau)
    nan_late = lambda x, t: torch.where(t[:, None] < 300, torch.nan, 0.1 * x)
    with pytest.raises(FloatingPointError, match="NaN.*timestep 200"):
        sample(nan_late, x, sched, tau)
    with pytest.raises(FloatingPointError, match="NaN"):
        sample(nan_late, x, sched, tau, method="sigma_hat")
    with pytest.raises(FloatingPointError, match="NaN.*timestep 200"):  # the checked re-run draws the same noise
        sample(nan_late, x, sched, tau, eta=0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="x_T has NaN or inf"):  # finite ε, NaN in x_T
        sample(lambda x, t: torch.nan_to_num(0.1 * x), torch.full_like(x, torch.nan), sched, tau)


def test_steps_check_no_values_on_the_way(sched):
    """A finite run makes no host synchronisation per step: the model is called once per timestep and
    ε is checked only when the result is not finite (then once more per timestep, to name the culprit)."""
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return torch.where(t[:, None] < 300, torch.nan, 0.1 * x) if poisoned else 0.1 * x

    tau = sched.timesteps(10)
    poisoned = False
    sample(model, x_T(4), sched, tau)
    assert len(calls) == 10
    poisoned, calls[:] = True, []
    with pytest.raises(FloatingPointError, match="timestep 200"):
        sample(model, x_T(4), sched, tau)
    assert calls == [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 0.0] + [900.0, 800.0, 700.0, 600.0,
                                                                                         500.0, 400.0, 300.0, 200.0]
