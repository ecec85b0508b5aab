"""The VP-SDE of the schedule: β(t), marginals (Eq 4), the probability-flow ODE as Eq 14, and the λ-family of samplers."""
import math
import sys

import pytest
import torch

from ddim_edu.forward import q_sample
from ddim_edu.evaluation.metrics import energy_distance
from ddim_edu.mixture import GaussianMixture
from ddim_edu.ode import probability_flow
from ddim_edu.schedules import cosine_schedule, linear_schedule
from ddim_edu.sde import TORCHSDE_METHODS, VPSDE, euler_maruyama_coefficients, sample_sde
from ddim_edu.solvers import sample

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
STD = 0.3


@pytest.fixture(scope="module")
def vp(sched):
    return VPSDE(sched)


@pytest.fixture(scope="module")
def ring():
    return GaussianMixture.ring(K=8, radius=1.0, std=0.1)


def gaussian():
    return GaussianMixture(MU[None], torch.tensor([STD]))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_x_T(sched, n, seed=0):
    """x_T from the Gaussian data's exact marginal at T-1, so that the only error left is the sampler's."""
    alpha = sched.alpha_bar(float(sched.T - 1))
    return alpha.sqrt() * MU + (alpha * STD**2 + 1 - alpha).sqrt() * randn(n, 2, seed=seed)


# --- the SDE itself ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule])
def test_beta_is_minus_dlog_alpha_dt(make):
    """β(t) = -d log ᾱ/dt inside every unit interval (autograd through the schedule's ᾱ(t)), and ≈ β_i."""
    sched = make()
    vp = VPSDE(sched)
    t = torch.cat([torch.tensor([-0.5, 0.25, 998.9]), torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999 - 1])
    t = t.to(torch.float64).requires_grad_(True)
    (dlog,) = torch.autograd.grad(sched.log_alpha_bar(t).sum(), t)
    torch.testing.assert_close(vp.beta(t.detach()), -dlog, rtol=1e-10, atol=0)
    # At an integer i, β belongs to the interval (i-1, i] below it (sampling runs downwards).
    i = torch.arange(0, sched.T, dtype=torch.float64)
    torch.testing.assert_close(vp.beta(i), -torch.log1p(-sched.betas), rtol=1e-14, atol=0)
    # ≈ β_i where β_i is small (-log(1-β) = β + β²/2 + …); not near the cosine schedule's end, where β_i → 0.999.
    small = sched.betas < 0.1
    assert bool(((vp.beta(i) - sched.betas).abs() <= sched.betas**2)[small].all())


def test_marginal_prob_is_eq4_at_integer_t(sched, vp):
    """marginal_prob(x0, t) = (sqrt(ᾱ_t) x0, sqrt(1-ᾱ_t)) with ᾱ_t = alphas_cumprod[t], exactly, for t = 0..T-1."""
    x0 = randn(6, 3, seed=1)
    t = torch.tensor([0, 1, 17, 500, 998, 999], dtype=torch.float64)
    mean, std = vp.marginal_prob(x0, t)
    a = sched.alphas_cumprod[t.long()]
    torch.testing.assert_close(mean, a.sqrt()[:, None] * x0, rtol=1e-15, atol=0)
    torch.testing.assert_close(std, (1 - a).sqrt(), rtol=1e-15, atol=0)
    noise = randn(6, 3, seed=2)
    torch.testing.assert_close(mean + std[:, None] * noise, q_sample(x0, a, noise), rtol=1e-14, atol=1e-15)
    # t = -1 is clean data.
    mean, std = vp.marginal_prob(x0, -1.0)
    assert torch.equal(mean, x0) and std.item() == 0.0


def test_marginal_prob_solves_the_moment_equations(sched, vp):
    """The SDE's mean and variance obey dm/dt = -½β m and dv/dt = -β v + g²: sde() and marginal_prob() agree."""
    x0 = randn(5, 2, seed=3)
    t = torch.tensor([-0.7, 3.3, 250.5, 640.01, 998.2], dtype=torch.float64, requires_grad=True)
    mean, std = vp.marginal_prob(x0, t)
    dmean = torch.stack([torch.autograd.grad(mean[:, j].sum(), t, retain_graph=True)[0] for j in range(2)], 1)
    (dvar,) = torch.autograd.grad((std**2).sum(), t)
    drift, g = vp.sde(mean.detach(), t.detach())
    torch.testing.assert_close(dmean, drift, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dvar, -vp.beta(t.detach()) * std.detach() ** 2 + g**2, rtol=1e-10, atol=1e-14)


def test_probability_flow_in_t_is_eq14_in_sigma(sched, vp, ring):
    """dx̄/dσ = (dx̄/dt)/(dσ/dt) of the (t, x) probability-flow ODE equals Eq 14's ε_θ(x̄/sqrt(σ²+1), t(σ)).

    dσ/dt and d(ᾱ^{-½})/dt come from autograd through the schedule, not from VPSDE.beta.
    """
    model = ring.eps_model(sched)
    f_t = vp.probability_flow_ode(model)
    f_sigma = probability_flow(model, sched)
    gen = torch.Generator().manual_seed(4)
    for t_val in [0.4, 12.7, 333.3, 871.5, 998.6]:
        t = torch.tensor(t_val, dtype=torch.float64, requires_grad=True)
        (dsigma_dt,) = torch.autograd.grad(sched.sigma(t), t)
        (dinvsqrt_dt,) = torch.autograd.grad(sched.alpha_bar(t) ** -0.5, t)
        alpha = sched.alpha_bar(t_val)
        x = torch.randn(16, 2, generator=gen, dtype=torch.float64) * 1.5
        dx_dt = f_t(torch.tensor(t_val, dtype=torch.float64), x)
        dxbar_dt = dx_dt / alpha.sqrt() + x * dinvsqrt_dt  # x̄ = x ᾱ^{-½}
        torch.testing.assert_close(dxbar_dt / dsigma_dt, f_sigma(sched.sigma(t_val), x / alpha.sqrt()), rtol=1e-10, atol=1e-12)
    assert f_t.nfe == 5


def test_reverse_drift_and_diffusion(sched, vp, ring):
    """reverse(): f - g² ∇log p with diffusion g; probability_flow=True: f - ½ g² ∇log p with 0; the λ-family between."""
    model = ring.eps_model(sched)
    x = randn(8, 2, seed=5)
    t = torch.full((8,), 123.4, dtype=torch.float64)
    f, g = vp.sde(x, t)
    score = ring.score(x, sched.alpha_bar(t))
    torch.testing.assert_close(vp.score(model, x, t), score, rtol=1e-12, atol=1e-12)
    for rsde, factor, lam in [(vp.reverse(model), 1.0, 1.0), (vp.reverse(model, probability_flow=True), 0.5, 0.0),
                              (vp.reverse_family(model, 0.5), 0.625, 0.5)]:
        drift, diffusion = rsde(x, t)
        torch.testing.assert_close(drift, f - factor * (g**2)[:, None] * score, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(diffusion, lam * g, rtol=0, atol=0)


def test_prior(vp):
    z = vp.prior_sampling((4000, 2), generator=torch.Generator().manual_seed(6))
    assert z.dtype == torch.float64 and abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    torch.testing.assert_close(vp.prior_logp(z[:3]), -0.5 * (z[:3] ** 2).sum(1) - math.log(2 * math.pi))


# --- the samplers --------------------------------------------------------------------------


def test_first_step_is_euler_maruyama_on_the_reverse_family(sched, vp, ring):
    """One step of sample_sde = x - drift·h + diffusion·sqrt(h) z with h = Δs/β(τ_S) (EM in the clock s = -log ᾱ)."""
    model = ring.eps_model(sched)
    tau = sched.timesteps(10, "trailing")
    x = randn(32, 2, seed=7)
    lam = 0.7
    x1 = sample_sde(model, x, sched, tau, lam=lam, generator=torch.Generator().manual_seed(8), return_trajectory=True)[1]
    t, t_prev = tau[-1], tau[-2]
    h = (sched.log_alpha_bar(t_prev) - sched.log_alpha_bar(t)) / vp.beta(t)
    drift, diffusion = vp.reverse_family(model, lam)(x, t)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.testing.assert_close(x1, x - drift * h + diffusion * h.sqrt() * z, rtol=1e-12, atol=1e-12)


def test_lambda_zero_is_the_probability_flow_ode(sched):
    """λ = 0: deterministic given x_T (no noise drawn), and within O(1/S) of DDIM (η = 0) and of the exact flow."""
    gm = gaussian()
    model = gm.eps_model(sched)
    x_T = exact_x_T(sched, 256, seed=9)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = g1.get_state()
    tau = sched.timesteps(20, "trailing")
    a = sample_sde(model, x_T, sched, tau, lam=0.0, generator=g1)
    assert torch.equal(a, sample_sde(model, x_T, sched, tau, lam=0.0, generator=g2))
    assert torch.equal(g1.get_state(), state)
    # Exact solution of the probability-flow ODE for Gaussian data (each x_t is Gaussian, the map affine):
    # x_0 = μ + s (x_T - sqrt(ᾱ_T) μ) / sqrt(ᾱ_T s² + 1 - ᾱ_T).
    alpha_T = sched.alpha_bar(float(sched.T - 1))
    x0_exact = MU + STD * (x_T - alpha_T.sqrt() * MU) / (alpha_T * STD**2 + 1 - alpha_T).sqrt()
    to_ddim, to_exact = [], []
    for S in (10, 40, 160):
        tau = sched.timesteps(S, "trailing")
        em = sample_sde(model, x_T, sched, tau, lam=0.0)
        to_ddim.append((em - sample(model, x_T, sched, tau, eta=0.0)).abs().max().item())
        to_exact.append((em - x0_exact).abs().max().item())
    for errs in (to_ddim, to_exact):  # first order: 4× the steps, about ¼ the gap
        assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3, errs
    assert to_exact[-1] < 0.05


def moments_error(x):
    """(max |mean - μ|, max |std - s|) over the two coordinates."""
    return (x.mean(0) - MU).abs().max().item(), (x.std(0) - STD).abs().max().item()


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_ddim_eta_and_reverse_sde_lambda_converge_to_the_same_distribution(sched, lam):
    """DDIM with η and Euler–Maruyama on the λ = η family, on N(μ, s²I) data with exact ε: as S grows
    (10, 50, 250) both samples' mean and std approach (μ, s) and the two samplers' moments approach each other.
    η = λ = 1 is DDPM's ancestral sampler against the reverse SDE. MC standard error of the std: ~0.0015.
    """
    gm = gaussian()
    model = gm.eps_model(sched)
    x_T = exact_x_T(sched, 20000, seed=10)
    std_err, gap = {"ddim": [], "sde": []}, []
    for S in (10, 50, 250):
        tau = sched.timesteps(S, "trailing")
        a = sample(model, x_T, sched, tau, eta=lam, generator=torch.Generator().manual_seed(11))
        b = sample_sde(model, x_T, sched, tau, lam=lam, generator=torch.Generator().manual_seed(12))
        for name, x in (("ddim", a), ("sde", b)):
            mean_err, s_err = moments_error(x)
            assert mean_err < (0.1 if S == 10 else 0.02), (name, S, mean_err)
            std_err[name].append(s_err)
        gap.append((a.std(0) - b.std(0)).abs().max().item())
    for errs in (*std_err.values(), gap):
        assert errs[0] > errs[1] > errs[2], errs
    assert std_err["ddim"][0] > 0.05 and std_err["sde"][0] > 0.05  # S = 10 is visibly off ...
    assert std_err["ddim"][2] < 0.02 and std_err["sde"][2] < 0.02  # ... S = 250 within a few % of s
    assert gap[2] < gap[0] / 5, gap  # 25× the steps: 1/S would give 1/25, the MC error floor is ~0.002


def test_mixture_energy_distance(sched, ring):
    """On the 8-Gaussian ring, reverse SDE (λ = 1), λ = ½ and DDPM (η = 1) at S = 250 are as close to the data
    as a second data sample is (unbiased energy distance), and clearly closer than at S = 10.
    """
    model = ring.eps_model(sched)
    n = 1500
    data = ring.sample(n, generator=torch.Generator().manual_seed(13))
    x_T = randn(n, 2, seed=14)
    far = energy_distance(sample_sde(model, x_T, sched, sched.timesteps(10, "trailing"), generator=torch.Generator().manual_seed(15)), data, unbiased=True)
    tau = sched.timesteps(250, "trailing")
    near = {
        "sde": sample_sde(model, x_T, sched, tau, lam=1.0, generator=torch.Generator().manual_seed(15)),
        "half": sample_sde(model, x_T, sched, tau, lam=0.5, generator=torch.Generator().manual_seed(16)),
        "ddpm": sample(model, x_T, sched, tau, eta=1.0, generator=torch.Generator().manual_seed(17)),
    }
    for name, x in near.items():
        d = energy_distance(x, data, unbiased=True)
        assert d < 3e-3, (name, d)  # two data samples of this size: 0 ± ~1e-3
        assert far > 8e-3 and far > 3 * d, (name, far, d)
        # Closed-form moments of the ring: mean 0, covariance (r²/2 + std²) I = 0.51 I (MC s.e. ~0.01).
        assert x.mean(0).abs().max() < 0.05 and (x.var(0) - 0.51).abs().max() < 0.05, name


def test_trajectory_and_dtype(sched, ring):
    model = ring.eps_model(sched)
    tau = sched.timesteps(5, "uniform")
    traj = sample_sde(model, randn(4, 2, seed=18).float(), sched, tau, return_trajectory=True, generator=torch.Generator().manual_seed(0))
    assert traj.shape == (6, 4, 2) and traj.dtype == torch.float32 and bool(torch.isfinite(traj).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": True}, "lam"),
        ({"method": "ddim"}, "method must be one of"),
        ({"timesteps": [10, 5, 20]}, "monotone"),
        ({"timesteps": [0, 1000]}, "timesteps"),
    ],
)
def test_bad_input(sched, ring, kwargs, match):
    args = {"timesteps": [0, 10, 20], **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_sde(ring.eps_model(sched), randn(2, 2), sched, **args)


def test_bad_times(sched, vp, ring):
    with pytest.raises(ValueError, match="t must"):
        vp.beta(1000.0)
    with pytest.raises(ValueError, match="t must"):
        vp.beta(float("nan"))
    with pytest.raises(ValueError, match="t must be >= 0"):
        vp.score(ring.eps_model(sched), randn(2, 2), -0.5)
    with pytest.raises(ValueError, match="x_T"):
        sample_sde(ring.eps_model(sched), torch.zeros(3), sched, [0, 10])


# --- the torchsde route ------------------------------------------------------------------------

MU3 = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
STD3 = 0.5


@pytest.fixture
def torchsde():
    return pytest.importorskip("torchsde")


def gaussian3():
    return GaussianMixture(MU3[None], torch.tensor([STD3]))


def exact_x_T3(sched, n, seed=0, t=None):
    """x at timestep t (default T-1) from the exact marginal of the 3-D Gaussian data."""
    alpha = sched.alpha_bar(float(sched.T - 1 if t is None else t))
    return alpha.sqrt() * MU3 + (alpha * STD3**2 + 1 - alpha).sqrt() * randn(n, 3, seed=seed)


def tree(torchsde, sched, tau, n, d, seed):
    """A Brownian tree on [log ᾱ(τ_S), 0], built here so that the test can read its increments."""
    return torchsde.BrownianInterval(t0=sched.log_alpha_bar(tau[-1]).item() - 1e-6, t1=0.0, size=(n, d), dtype=torch.float64,
                                     entropy=seed, tol=1e-8, halfway_tree=True, levy_area_approximation="space-time")


def counting(model):
    def counted(x, t):
        counted.calls += 1
        return model(x, t)

    counted.calls = 0
    return counted


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_torchsde_euler_is_our_euler_maruyama_step_by_step(sched, torchsde, lam):
    """method="euler": every step is sample_sde's x ← a x + b ε + c z, with c z = λ ΔW from the Brownian motion
    (ΔW over Δs = log ᾱ(τ_{i-1}) - log ᾱ(τ_i)); as many model evaluations as Euler–Maruyama (S)."""
    model = counting(gaussian3().eps_model(sched))
    tau = sched.timesteps(20, "trailing")
    x_T = exact_x_T3(sched, 64, seed=20)
    bm = tree(torchsde, sched, tau, 64, 3, seed=21)
    traj = sample_sde(model, x_T, sched, tau, lam=lam, method="euler", bm=bm, return_trajectory=True)
    assert traj.shape == (21, 64, 3) and model.calls == 20
    a, b, c, _ = euler_maruyama_coefficients(sched, tau, lam)
    u = [0.0, *sched.log_alpha_bar(tau).tolist()]  # log ᾱ(τ_i), τ_0 := -1
    x = x_T
    for i in range(len(tau) - 1, -1, -1):
        eps = model(x, torch.full((64,), tau[i].item(), dtype=torch.float64))
        x = a[i] * x + b[i] * eps + lam * bm(u[i + 1], u[i])
        torch.testing.assert_close(traj[len(tau) - i], x, rtol=1e-12, atol=1e-12)
    if lam == 0:  # the probability-flow ODE: sample_sde's Euler steps, whatever the noise
        torch.testing.assert_close(traj[-1], sample_sde(model, x_T, sched, tau, lam=0.0), rtol=1e-12, atol=1e-12)
        other = sample_sde(model, x_T, sched, tau, lam=0.0, method="euler", generator=torch.Generator().manual_seed(22))
        assert torch.equal(other, traj[-1])


def test_torchsde_object_is_the_reverse_family_in_log_alpha_bar(sched, vp, torchsde):
    """VPSDE.torchsde: in u = log ᾱ(t), du = -β dt, so f = -drift/β(t) and g = diffusion/sqrt(β(t)) = λ, at
    times between integers; torchsde.sdeint takes the object as it is (here "srk" on the grid's times)."""
    gm = gaussian3()
    model = gm.eps_model(sched)
    sde = vp.torchsde(model, 0.6)
    assert (sde.sde_type, sde.noise_type) == ("ito", "diagonal")
    x = randn(16, 3, seed=23)
    for t in [0.4, 57.25, 480.5, 998.9]:
        u = sched.log_alpha_bar(t)
        drift, diffusion = vp.reverse_family(model, 0.6)(x, t)
        torch.testing.assert_close(sde.f(u, x), -drift / vp.beta(t), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sde.g(u, x), (diffusion / vp.beta(t).sqrt()).expand_as(x), rtol=1e-12, atol=0)
    tau = sched.timesteps(5, "trailing")
    ts = sde.times(tau)
    assert bool((ts[1:] > ts[:-1]).all()) and ts[0] == sched.log_alpha_bar(tau[-1])
    ys = torchsde.sdeint(sde, exact_x_T3(sched, 16, seed=24), ts, bm=tree(torchsde, sched, tau, 16, 3, seed=25), method="srk", dt=0.5)
    assert ys.shape == (5, 16, 3) and bool(torch.isfinite(ys).all())


def paired_z(a, b):
    """(mean, variance) differences of paired samples a_i, b_i per coordinate, in standard errors of the pairs."""
    n = a.shape[0]
    d = a - b
    q = (a - a.mean(0)) ** 2 - (b - b.mean(0)) ** 2
    return d.mean(0) / (d.std(0) / n**0.5), q.mean(0) / (q.std(0) / n**0.5)


def exact_z(x):
    """(mean - μ, variance - s²) per coordinate in standard errors of the sample (computed, not assumed Gaussian)."""
    n = x.shape[0]
    c = (x - x.mean(0)) ** 2
    return (x.mean(0) - MU3) / (x.std(0) / n**0.5), (x.var(0) - STD3**2) / (c.std(0) / n**0.5)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_torchsde_agrees_in_distribution(sched, torchsde, lam):
    """On N(μ, s²I) data in 3-D with its exact ε and x_T from the exact marginal, n = 4000 from one x_T:
    (a) torchsde's Euler and sample_sde on the same coarse grid (S = 20) agree in mean and variance within
    4 standard errors of the paired differences, although both variances are visibly off s² there;
    (b) torchsde's "srk" on that grid matches the data law, mean and variance within 4 standard errors.
    """
    model = gaussian3().eps_model(sched)
    tau = sched.timesteps(20, "trailing")
    x_T = exact_x_T3(sched, 4000, seed=26)
    ours = sample_sde(model, x_T, sched, tau, lam=lam, generator=torch.Generator().manual_seed(27))
    theirs = sample_sde(model, x_T, sched, tau, lam=lam, method="euler", generator=torch.Generator().manual_seed(28))
    for z in paired_z(theirs, ours):
        assert z.abs().max() < 4, z
    for x in (ours, theirs):  # the grid is coarse enough for Euler–Maruyama's bias to show
        assert exact_z(x)[1].min() > 4
    srk = sample_sde(model, x_T, sched, tau, lam=lam, method="srk", generator=torch.Generator().manual_seed(29))
    for z in exact_z(srk):
        assert z.abs().max() < 4, z


def test_torchsde_lambda_zero_is_the_probability_flow_ode(sched, torchsde):
    """λ = 0: deterministic (no noise enters, whatever the seed), and with "srk" (a Runge–Kutta method when
    g = 0) within 1e-3 of the exact flow on 20 steps, where Euler (= sample_sde) is 100× further off."""
    model = gaussian3().eps_model(sched)
    tau = sched.timesteps(20, "logsnr")
    x_T = exact_x_T3(sched, 256, seed=30)
    alpha_T = sched.alpha_bar(float(sched.T - 1))
    x0_exact = MU3 + STD3 * (x_T - alpha_T.sqrt() * MU3) / (alpha_T * STD3**2 + 1 - alpha_T).sqrt()
    a = sample_sde(model, x_T, sched, tau, lam=0.0, method="srk", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_sde(model, x_T, sched, tau, lam=0.0, method="srk", generator=torch.Generator().manual_seed(2)))
    err = (a - x0_exact).abs().max().item()
    err_euler = (sample_sde(model, x_T, sched, tau, lam=0.0) - x0_exact).abs().max().item()
    assert err < 1e-3 and err < err_euler / 100, (err, err_euler)


# The last stretch, t = 300 → data (log ᾱ from -0.93 to 0), where the drift is stiffest: short in u, so cheap to refine.
LOW = [0, 100, 200, 300]


def test_torchsde_seed_fixes_the_brownian_path_at_any_resolution(sched, torchsde):
    """The same generator seed gives the same sample, another seed another one; and since the default noise is
    a Brownian tree, the seed fixes the path itself: refining dt on one seed converges to one x_0
    (Euler at dt = 0.1, 0.02 against "srk" at 0.02), which a fresh path per resolution would not."""
    model = gaussian3().eps_model(sched)
    x_T = exact_x_T3(sched, 64, seed=31, t=LOW[-1])

    def run(seed, **kwargs):
        return sample_sde(model, x_T, sched, LOW, generator=torch.Generator().manual_seed(seed), **{"method": "euler", **kwargs})

    a = run(32)
    assert torch.equal(a, run(32)) and (a - run(33)).abs().max() > 0.5
    ref = run(32, method="srk", dt=0.02)
    errs = [(x - ref).abs().max().item() for x in (a, run(32, dt=0.1), run(32, dt=0.02))]
    assert errs[0] > 2 * errs[1] > 4 * errs[2] and errs[2] < 0.05, errs


def run_low(sched, method, model=None):
    """16 samples of the 3-D Gaussian from t = 300 at dt = 0.02: 48 steps (26, 16 and 6 over LOW's intervals)."""
    x_T = exact_x_T3(sched, 16, seed=34, t=LOW[-1])
    model = model or gaussian3().eps_model(sched)
    return sample_sde(model, x_T, sched, LOW, method=method, dt=0.02, generator=torch.Generator().manual_seed(35))


@pytest.fixture(scope="module")
def srk_low(sched):
    pytest.importorskip("torchsde")
    return run_low(sched, "srk")


EVALS_PER_STEP = {"euler": 1, "milstein": 1, "srk": 4, "midpoint": 2, "heun": 2, "euler_heun": 1, "reversible_heun": 1}


@pytest.mark.parametrize("method", sorted(TORCHSDE_METHODS))
def test_torchsde_methods(sched, torchsde, srk_low, method):
    """Every listed method runs on the family (Itô or Stratonovich: the same SDE, since the noise is additive)
    and lands near "srk" on the same Brownian path; model evaluations are as TORCHSDE_METHODS says (f's memo
    absorbs torchsde's repeats), plus one for the last step. With g independent of x, Milstein and Euler–Heun
    are Euler."""
    model = counting(gaussian3().eps_model(sched))
    x = run_low(sched, method, model)
    assert (x - srk_low).abs().max() < 0.05
    # reversible Heun starts each interval with torchsde's shape check, an evaluation at y its steps do not reuse
    assert model.calls == EVALS_PER_STEP[method] * 48 + 1 + (3 if method == "reversible_heun" else 0)
    if method in ("milstein", "euler_heun"):
        torch.testing.assert_close(x, run_low(sched, "euler"), rtol=1e-12, atol=1e-12)


def test_torchsde_trajectory_dtype_and_image_shape(sched, torchsde):
    """x_T of any shape [B, …] (torchsde's state is [B, d]: reshaped for the model) and float32 stay as given."""
    seen = []

    def model(x, t):
        seen.append((x.shape, t.dtype))
        return 0.1 * x

    x_T = randn(4, 1, 2, 3, seed=36).float()
    traj = sample_sde(model, x_T, sched, [0, 10, 20], method="srk", return_trajectory=True, generator=torch.Generator().manual_seed(0))
    assert traj.shape == (4, 4, 1, 2, 3) and traj.dtype == torch.float32 and bool(torch.isfinite(traj).all())
    assert torch.equal(traj[0], x_T) and set(seen) == {((4, 1, 2, 3), torch.float32)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"method": "log_ode"}, "method"),
        ({"method": "euler_maruyama", "dt": 0.1}, "dt and bm apply to torchsde's methods"),
        ({"dt": 0.0}, "dt"),
        ({"dt": float("inf")}, "dt"),
        ({"dt": True}, "dt"),
    ],
)
def test_torchsde_bad_input(sched, ring, kwargs, match):
    args = {"timesteps": [0, 10, 20], **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_sde(ring.eps_model(sched), randn(2, 2), sched, **args)
    with pytest.raises(ValueError, match="sde_type"):
        VPSDE(sched).torchsde(ring.eps_model(sched), sde_type="stratonovic")
    with pytest.raises(ValueError, match="lam"):
        VPSDE(sched).torchsde(ring.eps_model(sched), lam=-1.0)


def test_torchsde_missing_says_what_to_install(sched, ring, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)
    with pytest.raises(ImportError, match="pip install torchsde"):
        sample_sde(ring.eps_model(sched), randn(2, 2), sched, [0, 10, 20], method="srk")
