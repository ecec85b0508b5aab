import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ddim_edu.toy import datasets as toy2d
from ddim_edu.toy.datasets import DATASETS, load_frozen
from ddim_edu.utils.package_data import package_file

ROOT = Path(__file__).resolve().parents[1]


def _load_make_script():
    path = ROOT / "toy_data" / "make_toy_data.py"
    spec = importlib.util.spec_from_file_location("make_toy_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shape_dtype_scale_and_reproducibility(name):
    fn = DATASETS[name]
    x = fn(5000, generator=torch.Generator().manual_seed(3))
    assert x.shape == (5000, 2) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all())
    # "roughly standardised": everything within [-2.5, 2.5], mean near 0, spread of order 1
    assert x.abs().max() < 2.5
    assert x.mean(0).abs().max() < 0.3
    assert bool(((x.std(0) > 0.4) & (x.std(0) < 1.5)).all())
    same = fn(5000, generator=torch.Generator().manual_seed(3))
    other = fn(5000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(x, same)
    assert not torch.equal(x, other)
    assert fn(1).shape == (1, 2)


def test_eight_gaussians_modes():
    x = toy2d.eight_gaussians(8000, generator=torch.Generator().manual_seed(0)).double()
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    mu = 1.5 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    k = torch.cdist(x, mu).argmin(1)
    counts = torch.bincount(k, minlength=8).double()
    # equal weights: each count is Binomial(8000, 1/8), std ≈ 30
    assert (counts - 1000).abs().max() < 150
    resid = x - mu[k]
    assert abs(resid.std().item() - 0.1) < 0.005
    assert resid.mean(0).abs().max() < 0.01


def test_checkerboard_only_dark_cells_and_uniform():
    x = toy2d.checkerboard(16000, generator=torch.Generator().manual_seed(0)).double()
    cell = torch.floor(x + 2).long()  # column j, row i in 0..3
    j, i = cell[:, 0], cell[:, 1]
    assert bool(((i + j) % 2 == 0).all())
    counts = torch.bincount(4 * i + j, minlength=16).double()
    dark = counts[counts > 0]
    assert len(dark) == 8 and (dark - 2000).abs().max() < 200
    # uniform within a cell: fractional parts have mean 1/2 and variance 1/12
    frac = x + 2 - cell
    assert (frac.mean(0) - 0.5).abs().max() < 0.01
    assert (frac.var(0) - 1 / 12).abs().max() < 0.005


def test_two_moons_and_spirals_classes_balanced():
    g = torch.Generator().manual_seed(0)
    moons = toy2d.two_moons(10000, generator=g).double() / 1.2 + torch.tensor([0.5, 0.25], dtype=torch.float64)
    # upper moon points lie near the unit circle around 0, lower ones near the unit circle around (1, 0.5)
    d_upper = (moons.norm(dim=1) - 1).abs()
    d_lower = ((moons - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 1).abs()
    upper = d_upper < d_lower
    assert abs(upper.double().mean().item() - 0.5) < 0.03
    assert torch.minimum(d_upper, d_lower).mean() < 0.06
    spir = toy2d.spirals(10000, generator=g).double()
    # the two arms are point reflections of each other, so the cloud is centred at 0
    assert spir.mean(0).abs().max() < 0.05
    # t = 3π sqrt(u) makes the radius 3π sqrt(u)/5 (plus noise): E r² = (3π/5)² / 2
    assert abs((spir.pow(2).sum(1)).mean().item() - (3 * math.pi / 5) ** 2 / 2) < 0.05


def test_swiss_roll_lies_on_the_roll():
    x = toy2d.swiss_roll(5000, generator=torch.Generator().manual_seed(0)).double() * 6 + 1.5
    r = x.norm(dim=1)
    assert r.min() > 1.5 * math.pi - 1.5 and r.max() < 4.5 * math.pi + 1.5


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True, None])
def test_bad_n_raises(bad):
    for fn in DATASETS.values():
        with pytest.raises(ValueError, match="n"):
            fn(bad)


def test_bad_generator_raises():
    with pytest.raises(ValueError, match="generator"):
        toy2d.swiss_roll(10, generator=0)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_frozen_files_match_generators(name):
    script = _load_make_script()
    frozen = load_frozen(name)
    assert frozen.shape == (script.N, 2) and frozen.dtype == torch.float32
    expected = DATASETS[name](script.N, generator=torch.Generator().manual_seed(script.SEED))
    # the files hold 6 decimals: equal up to rounding
    torch.testing.assert_close(frozen, expected, atol=1e-5, rtol=0)
    text = package_file(f"{name}.csv").read_text()
    assert text.startswith("x,y\n")


def test_frozen_files_are_small():
    total = sum(len(package_file(f"{name}.csv").read_bytes()) for name in DATASETS)
    assert total < 300_000


def test_load_frozen_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="name must be one of"):
        load_frozen("dino")
    monkeypatch.setattr(toy2d, "package_file", lambda name: tmp_path / name)
    with pytest.raises(FileNotFoundError, match="make_toy_data.py"):
        load_frozen("spirals")
