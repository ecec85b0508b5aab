"""The non-Markovian forward process q_σ: Lemma 1 exactly and by sampling, Eq 16, Bayes' step."""
import math

import pytest
import torch

from ddim_edu.forward import (
    q_sample,
    q_sigma_forward_step,
    q_sigma_marginal_moments,
    q_sigma_reverse_mean,
    sample_q_sigma_joint,
    sigma_eta,
    sigma_hat,
)

ETAS = (0.0, 0.2, 0.5, 1.0)


def gauss_logpdf(x, mean, var):
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * torch.as_tensor(var, dtype=x.dtype))).sum(-1)


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("spacing, S", [("uniform", 1000), ("uniform", 10), ("quad", 50), ("trailing", 20)])
def test_lemma1_exact_moment_propagation(sched, eta, spacing, S):
    tau = sched.timesteps(S, spacing)
    m, v = q_sigma_marginal_moments(sched, tau, eta)
    alpha = sched.alpha_bar(tau)
    torch.testing.assert_close(m, alpha.sqrt(), rtol=0, atol=1e-12)
    torch.testing.assert_close(v, 1 - alpha, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_lemma1_by_sampling(sched, eta):
    n = 20000
    tau = sched.timesteps(20, "trailing")
    x0 = torch.tensor([[1.5], [-0.5]], dtype=torch.float64).repeat_interleave(n, 0)  # two fixed x_0
    xs = sample_q_sigma_joint(x0, sched, tau, eta, generator=torch.Generator().manual_seed(1))
    alpha = sched.alpha_bar(tau)
    for j, x0_value in enumerate((1.5, -0.5)):
        block = xs[:, j * n : (j + 1) * n, 0]  # [S, n]
        mean_err = (block.mean(1) - alpha.sqrt() * x0_value) / torch.sqrt((1 - alpha) / n)
        var_err = (block.var(1) - (1 - alpha)) / ((1 - alpha) * math.sqrt(2 / n))
        assert mean_err.abs().max() < 4.5 and var_err.abs().max() < 4.5


def test_joint_changes_with_eta_although_marginals_do_not(sched):
    """Cov(x_{τ_i}, x_{τ_{i-1}} | x_0) = k (1-α_{τ_i}) depends on η: the joint is not fixed by Lemma 1."""
    tau = sched.timesteps(10, "trailing")
    x0 = torch.zeros(40000, 1, dtype=torch.float64)
    cors = []
    for eta in (0.0, 1.0):
        xs = sample_q_sigma_joint(x0, sched, tau, eta, generator=torch.Generator().manual_seed(2))
        cors.append(torch.corrcoef(xs[-2:, :, 0])[0, 1].item())
    a, ap = sched.alpha_bar(tau[-1]), sched.alpha_bar(tau[-2])
    for eta, c in zip((0.0, 1.0), cors):
        s = sigma_eta(a, ap, eta)
        k = torch.sqrt(1 - ap - s**2) / torch.sqrt(1 - a)
        assert c == pytest.approx((k * (1 - a) / torch.sqrt((1 - a) * (1 - ap))).item(), abs=0.02)
    assert cors[0] > cors[1] + 0.1


def test_sigma_eta_special_cases(sched):
    a = sched.alphas_cumprod[1:]
    ap = sched.alphas_cumprod[:-1]
    beta = sched.betas[1:]
    # η = 1: DDPM's posterior variance β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t.
    torch.testing.assert_close(sigma_eta(a, ap, 1.0) ** 2, (1 - ap) / (1 - a) * beta, rtol=1e-12, atol=0)
    assert bool((sigma_eta(a, ap, 0.0) == 0).all())
    torch.testing.assert_close(sigma_eta(a, ap, 0.3), 0.3 * sigma_eta(a, ap, 1.0), rtol=1e-14, atol=0)
    # σ̂ on the full sequence is DDPM's other choice, sqrt(β_t), and exceeds σ(1).
    torch.testing.assert_close(sigma_hat(a, ap), beta.sqrt(), rtol=1e-9, atol=0)
    assert bool((sigma_hat(a, ap) > sigma_eta(a, ap, 1.0)).all())
    with pytest.raises(ValueError, match="eta"):
        sigma_eta(a, ap, -0.1)


def test_bayes_forward_step_is_bayes_rule(sched):
    """log q(x_t|x_{t-1},x_0) = log q(x_{t-1}|x_t,x_0) + log q(x_t|x_0) - log q(x_{t-1}|x_0) pointwise."""
    g = torch.Generator().manual_seed(3)
    a, ap = sched.alphas_cumprod[600], sched.alphas_cumprod[550]
    for eta in (0.1, 0.4, 1.0):  # η = 0 makes the reverse kernel a point mass: no density
        s = sigma_eta(a, ap, eta)
        x0, xt, xp = (torch.randn(64, 3, generator=g, dtype=torch.float64) for _ in range(3))
        mean, var = q_sigma_forward_step(xp, x0, a, ap, s)
        lhs = gauss_logpdf(xt, mean, var)
        rhs = (
            gauss_logpdf(xp, q_sigma_reverse_mean(xt, x0, a, ap, s), s**2)
            + gauss_logpdf(xt, a.sqrt() * x0, 1 - a)
            - gauss_logpdf(xp, ap.sqrt() * x0, 1 - ap)
        )
        torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_forward_step_depends_on_x0_except_for_ddpm(sched):
    a, ap = sched.alphas_cumprod[300], sched.alphas_cumprod[299]
    xp = torch.randn(5, 2, dtype=torch.float64)
    x0a, x0b = torch.zeros(5, 2, dtype=torch.float64), torch.ones(5, 2, dtype=torch.float64)
    # η = 1: the Markovian DDPM step N(sqrt(1-β) x_{t-1}, β), whatever x_0 is.
    mean_a, var = q_sigma_forward_step(xp, x0a, a, ap, sigma_eta(a, ap, 1.0))
    mean_b, _ = q_sigma_forward_step(xp, x0b, a, ap, sigma_eta(a, ap, 1.0))
    torch.testing.assert_close(mean_a, mean_b)
    torch.testing.assert_close(mean_a, torch.sqrt(a / ap) * xp)
    assert var.item() == pytest.approx((1 - a / ap).item(), rel=1e-9)
    # η = 0.5: the mean moves with x_0.
    mean_a, _ = q_sigma_forward_step(xp, x0a, a, ap, sigma_eta(a, ap, 0.5))
    mean_b, _ = q_sigma_forward_step(xp, x0b, a, ap, sigma_eta(a, ap, 0.5))
    assert (mean_a - mean_b).abs().min() > 1e-3


def test_q_sample_is_eq4():
    x0 = torch.randn(7, 3, dtype=torch.float64)
    eps = torch.randn(7, 3, dtype=torch.float64)
    alpha = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(q_sample(x0, alpha, eps), alpha.sqrt()[:, None] * x0 + (1 - alpha).sqrt()[:, None] * eps)


def test_sigma_too_large_is_rejected(sched):
    a, ap = sched.alphas_cumprod[1], sched.alphas_cumprod[0]
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma is too large"):
        q_sigma_reverse_mean(x, x, a, ap, sigma_hat(a, ap))  # σ̂ at t = 2 makes Eq 7 imaginary
