"""Theorem 1: J_σ - L_γ is one constant C for every ε-model, with the exact γ (and not the printed one)."""
import math

import pytest
import torch

from ddim_edu.mixture import GaussianMixture
from ddim_edu.theorem1 import (
    constant_C,
    gamma_exact,
    gamma_printed,
    gaussian_expectation,
    j_sigma_gaussian,
    j_sigma_samples,
    l_gamma_gaussian,
    l_gamma_samples,
    sigmas_for_eta,
)

MU = torch.tensor([0.7, -0.3], dtype=torch.float64)
STD = 0.4


@pytest.fixture(scope="module")
def sigma_1(sched):
    return sched.betas[0].sqrt().item()


def affine_models(sched):
    """ε-models affine in x: for Gaussian data every term of J_σ and L_γ is then a quadratic."""
    exact = GaussianMixture(MU[None], torch.tensor([STD])).eps_model(sched)
    return {
        "zero": lambda x, t: torch.zeros_like(x),
        "exact": exact,
        "miscalibrated": lambda x, t: 0.8 * exact(x, t) + 0.1 - 0.05 * x,
    }


def test_gaussian_expectation_is_exact_for_quadratics():
    A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 0.7]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    q = lambda w: (w @ A * w).sum(1) + w @ b + 3.0
    assert gaussian_expectation(q, 3).item() == pytest.approx(A.trace().item() + 3.0, rel=1e-14)


def test_exact_gamma_reduces_to_ddpm_weight_for_eta_one(sched, sigma_1):
    """For η = 1, γ_t = β_t² / (2σ_t² (1-β_t)(1-ᾱ_t)) for t ≥ 2 (NOTES.md)."""
    sig = sigmas_for_eta(sched, 1.0, sigma_1)
    beta, abar = sched.betas, sched.alphas_cumprod
    expected = beta**2 / (2 * sig**2 * (1 - beta) * (1 - abar))
    torch.testing.assert_close(gamma_exact(sched, sig)[1:], expected[1:], rtol=1e-9, atol=0)
    assert gamma_exact(sched, sig)[0].item() == pytest.approx(((1 - abar[0]) / (2 * sigma_1**2 * abar[0])).item())


def test_printed_gamma_is_not_a_rescaling_of_the_exact_one(sched, sigma_1):
    ratio = gamma_exact(sched, sigmas_for_eta(sched, 1.0, sigma_1)) / gamma_printed(sched, sigmas_for_eta(sched, 1.0, sigma_1), d=1)
    assert ratio[1].item() == pytest.approx(6.5e-5, rel=0.05)  # t = 2
    assert ratio[-1].item() == pytest.approx(1.65e-8, rel=0.05)  # t = T
    assert ratio[1:].max() / ratio[1:].min() > 1e3


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_theorem1_in_closed_form_on_gaussian_data(sched, sigma_1, eta):
    sig = sigmas_for_eta(sched, eta, sigma_1)
    g_exact, g_printed = gamma_exact(sched, sig), gamma_printed(sched, sig, d=2)
    C = constant_C(sched, sig, 2, (MU**2).sum() + 2 * STD**2)
    gaps, printed_gaps, js = [], [], []
    for model in affine_models(sched).values():
        J = j_sigma_gaussian(model, MU, STD, sched, eta, sigma_1)
        js.append(J.item())
        gaps.append((J - l_gamma_gaussian(model, MU, STD, sched, g_exact)).item())
        printed_gaps.append((J - l_gamma_gaussian(model, MU, STD, sched, g_printed)).item())
    assert max(js) - min(js) > 5  # the models really differ in J_σ ...
    for gap in gaps:  # ... but J_σ - L_γ is the constant C to rounding
        assert gap == pytest.approx(C.item(), rel=1e-10, abs=1e-9)
    assert max(printed_gaps) - min(printed_gaps) > 1e3  # the printed γ gives no constant difference


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_theorem1_by_monte_carlo_on_a_mixture(sched, sigma_1, eta):
    """Sampled J_σ (on q_σ trajectories) minus sampled L_γ (independent draws) is C within MC error."""
    data = GaussianMixture.ring(K=8, radius=1.0, std=0.05)
    exact = data.eps_model(sched)
    models = {
        "zero": lambda x, t: torch.zeros_like(x),
        "exact": exact,
        "perturbed": lambda x, t: exact(x, t) + 0.3 * torch.sin(3 * x),
    }
    sig = sigmas_for_eta(sched, eta, sigma_1)
    g_exact, g_printed = gamma_exact(sched, sig), gamma_printed(sched, sig, d=2)
    C = constant_C(sched, sig, 2, data.second_moment()).item()
    gen = torch.Generator().manual_seed(0)
    n = 400
    printed = []
    for name, model in models.items():
        J = j_sigma_samples(model, data.sample(n, generator=gen), sched, eta, sigma_1, generator=gen)
        L = l_gamma_samples(model, data.sample(n, generator=gen), sched, g_exact, generator=gen)
        se = math.sqrt(J.var().item() / n + L.var().item() / n)
        assert abs(J.mean().item() - L.mean().item() - C) < 4 * se, name
        Lp = l_gamma_samples(model, data.sample(n, generator=gen), sched, g_printed, generator=gen)
        printed.append((J.mean() - Lp.mean()).item())
    assert max(printed) - min(printed) > 1e3


def test_monte_carlo_agrees_with_closed_form(sched, sigma_1):
    data = GaussianMixture(MU[None], torch.tensor([STD]))
    model = affine_models(sched)["miscalibrated"]
    gen = torch.Generator().manual_seed(1)
    n = 400
    J = j_sigma_samples(model, data.sample(n, generator=gen), sched, 1.0, sigma_1, generator=gen)
    assert abs(J.mean() - j_sigma_gaussian(model, MU, STD, sched, 1.0, sigma_1)) < 4 * J.std() / math.sqrt(n)
    g = gamma_exact(sched, sigmas_for_eta(sched, 1.0, sigma_1))
    L = l_gamma_samples(model, data.sample(n, generator=gen), sched, g, generator=gen)
    assert abs(L.mean() - l_gamma_gaussian(model, MU, STD, sched, g)) < 4 * L.std() / math.sqrt(n)


def test_sigma_zero_is_rejected(sched, sigma_1):
    with pytest.raises(ValueError, match="sigma_1 must be > 0"):
        sigmas_for_eta(sched, 1.0, 0.0)
    with pytest.raises(ValueError, match="eta must be > 0"):
        sigmas_for_eta(sched, 0.0, sigma_1)
    sig = sigmas_for_eta(sched, 1.0, sigma_1)
    sig[0] = 0.0
    with pytest.raises(ValueError, match=r"σ_t > 0.*t = \[1\]"):
        gamma_exact(sched, sig)
    with pytest.raises(ValueError, match="sigmas must have shape"):
        gamma_printed(sched, sig[:10], d=2)
    with pytest.raises(ValueError, match="gamma must have shape"):
        l_gamma_samples(lambda x, t: x, torch.zeros(3, 2, dtype=torch.float64), sched, torch.ones(5))


def test_theorem1_for_untrained_and_trained_networks(sched, sigma_1):
    """The same constant C for two real networks (random and trained with L_1) and the exact ε."""
    from ddim_edu.toy.nets import MLPEps
    from ddim_edu.training import TrainConfig, train_eps_model

    data = GaussianMixture.ring(K=8, radius=1.0, std=0.05)
    torch.manual_seed(0)
    untrained = MLPEps(dim=2, hidden=64, n_blocks=2).double()
    torch.nn.init.normal_(untrained.out[1].weight, std=0.5)  # the output layer starts at zero otherwise
    trained = MLPEps(dim=2, hidden=64, n_blocks=2).double()
    train_eps_model(trained, data.sample(20000, generator=torch.Generator().manual_seed(1)), sched,
                    TrainConfig.toy(steps=300, batch_size=256), progress=False)
    models = {"untrained": untrained.eval(), "trained": trained.eval(), "exact": data.eps_model(sched)}
    eta = 1.0
    sig = sigmas_for_eta(sched, eta, sigma_1)
    g = gamma_exact(sched, sig)
    C = constant_C(sched, sig, 2, data.second_moment()).item()
    gen = torch.Generator().manual_seed(2)
    n = 400
    js = {}
    for name, model in models.items():
        J = j_sigma_samples(model, data.sample(n, generator=gen), sched, eta, sigma_1, generator=gen)
        L = l_gamma_samples(model, data.sample(n, generator=gen), sched, g, generator=gen)
        se = math.sqrt(J.var().item() / n + L.var().item() / n)
        assert abs(J.mean().item() - L.mean().item() - C) < 4 * se, (name, J.mean() - L.mean(), C, se)
        js[name] = J.mean().item()
    assert js["untrained"] > js["trained"] > js["exact"]  # training lowers J_σ towards the exact ε
