"""ddim_edu.paper: one cell of Table 1 is the η-family sampler (Eq 12, Eq 16) or the σ̂ sampler on τ, nothing else."""
import pytest
import torch

from ddim_edu.mixture import GaussianMixture
from ddim_edu.paper import SIGMA_HAT, TABLE1_FID, table1_row_label, table1_sample
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample

SCHED = linear_schedule()
MODEL = GaussianMixture.ring(K=8, radius=1.0, std=0.05).eps_model(SCHED)  # exact ε, no training


def x_T(n=16):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spacing", ["uniform", "quad"])
@pytest.mark.parametrize("S", [10, 20])
def test_sigma_hat_row_is_the_sigma_hat_sampler(spacing, S):
    tau = SCHED.timesteps(S, spacing)
    expected = sample(MODEL, x_T(), SCHED, tau, method="sigma_hat", generator=gen())
    assert torch.equal(table1_sample(MODEL, x_T(), SCHED, S, SIGMA_HAT, spacing, generator=gen()), expected)


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.5, 1.0, 1])
def test_eta_rows_are_ddim_with_that_eta(eta):
    tau = SCHED.timesteps(10, "quad")
    expected = sample(MODEL, x_T(), SCHED, tau, method="ddim", eta=float(eta), generator=gen())
    assert torch.equal(table1_sample(MODEL, x_T(), SCHED, 10, eta, "quad", generator=gen()), expected)


def test_default_spacing_is_uniform_and_eta_zero_is_deterministic():
    uniform = sample(MODEL, x_T(), SCHED, SCHED.timesteps(20, "uniform"), method="ddim")
    assert torch.equal(table1_sample(MODEL, x_T(), SCHED, 20, 0.0), uniform)
    assert torch.equal(table1_sample(MODEL, x_T(), SCHED, 20, 0.0, generator=gen(5)), uniform)


def test_stochastic_rows_depend_on_the_generator():
    for row in (1.0, SIGMA_HAT):
        a = table1_sample(MODEL, x_T(), SCHED, 10, row, generator=gen(1))
        b = table1_sample(MODEL, x_T(), SCHED, 10, row, generator=gen(2))
        assert not torch.equal(a, b), row


@pytest.mark.parametrize("row", ["0.5", "sigma", True, None, -0.5])
def test_bad_rows_are_refused(row):
    with pytest.raises(ValueError):
        table1_sample(MODEL, x_T(), SCHED, 10, row)


def test_every_row_of_the_paper_table_samples_and_has_a_label():
    for row in TABLE1_FID:
        x0 = table1_sample(MODEL, x_T(4), SCHED, 10, row, generator=gen())
        assert x0.shape == (4, 2) and bool(torch.isfinite(x0).all())
        assert table1_row_label(row) == ("σ̂" if row == SIGMA_HAT else f"η = {row:g}")
