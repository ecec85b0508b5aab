"""The benchmark family of exact mixtures: what each member is, reproducibility, and the tight reference."""
import math

import pytest
import torch

from ddim_edu.evaluation.mixture_family import KINDS, family, random_mixture, reference_x0


def test_members_are_the_kinds_they_claim():
    """Every kind drawn: its dimension and number of modes, widths inside its range (per axis when
    anisotropic, equal across axes otherwise), equal weights exactly when not unequal, and means at unit RMS."""
    members = family(0)
    assert list(members) == list(KINDS)
    for name, m in members.items():
        kind = KINDS[name]
        assert m.means.shape == (kind.K, kind.d)
        assert m.means.pow(2).mean().sqrt().item() == pytest.approx(1.0)
        assert bool((m.stds >= kind.std_lo * (1 - 1e-12)).all() and (m.stds <= kind.std_hi * (1 + 1e-12)).all())
        per_axis = bool((m.stds != m.stds[:, :1]).any())
        assert per_axis == (kind.anisotropic and kind.d > 1), name
        equal = bool(torch.allclose(m.weights, torch.full_like(m.weights, 1 / kind.K)))
        assert equal == (kind.unequal == 0), name
        if kind.ring:
            assert torch.allclose(m.means.norm(dim=1), m.means.norm(dim=1)[0].expand(kind.K))


def test_family_is_reproducible_and_seeds_differ():
    a, b, c = family(0), family(0), family(1)
    for name in KINDS:
        assert torch.equal(a[name].means, b[name].means) and torch.equal(a[name].stds, b[name].stds)
        assert not torch.equal(a[name].means, c[name].means)


def test_reference_solves_eq14_to_the_closed_form_for_one_gaussian(sched):
    """For one Gaussian N(μ, s² I), Eq 14's exact solution from x̄ at σ is x_0 = μ + (x̄ - μ) s / sqrt(s² + σ²);
    the reference starts at σ = σ(T-1), x̄ = x_T sqrt(1 + σ²)."""
    from ddim_edu.evaluation.mixture_family import Kind

    m = random_mixture(Kind(3, 1, 0.05, 0.05), torch.Generator().manual_seed(4))
    sigma = sched.sigma(float(sched.T - 1)).item()
    x_T = torch.randn(32, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_bar = x_T * math.sqrt(1 + sigma**2)
    x0, nfe = reference_x0(m, sched, x_T)
    s, mu = m.stds[0, 0].item(), m.means[0]
    torch.testing.assert_close(x0, mu + (x_bar - mu) * s / math.sqrt(s**2 + sigma**2), rtol=0, atol=1e-7)
    assert nfe > 10


def test_ring_needs_two_dimensions():
    from ddim_edu.evaluation.mixture_family import Kind

    with pytest.raises(ValueError, match="a ring is 2-D"):
        random_mixture(Kind(3, 4, 0.1, 0.1, ring=True), torch.Generator())


def test_point_errors_counts_the_points_on_another_mode_and_their_share():
    """Two modes at ±1: of five points, one ends on the other mode (a miss of 2), the others miss by 0.1 to 0.4;
    the median miss is 0.3, and the switched point carries 4/(4 + 0.3) of the squared error."""
    from ddim_edu.evaluation.mixture_family import point_errors

    means = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0], [-1.0], [1.0], [1.0], [-1.0]], dtype=torch.float64)
    x = ref + torch.tensor([[0.1], [2.0], [-0.2], [0.3], [-0.4]], dtype=torch.float64)
    out = point_errors(x, ref, means)
    assert out["switched"] == 1 and out["median"] == pytest.approx(0.3)
    assert out["switched_share"] == pytest.approx(4 / (4 + 0.01 + 0.04 + 0.09 + 0.16))
