"""The digits UNet that ships with the package (``load_unet("digits")``): it loads by name and through the command
line, and its DDIM samples are digits, judged without a classifier by the distance to the nearest training digit."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddim_edu import cli
from ddim_edu.evaluation.metrics import nearest_neighbour_distances
from ddim_edu.image.data import load_digits
from ddim_edu.image.pretrained import NAMED_MODELS, load_unet, read_unet_config
from ddim_edu.image.unet import UNet, UNetConfig
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample
from ddim_edu.utils.package_data import package_file

WEIGHTS, CONFIG = (package_file(name) for name in NAMED_MODELS["digits"])


@pytest.fixture(scope="module")
def model():
    return load_unet("digits")


def test_digits_model_loads_by_name_from_the_package_data(model):
    assert WEIGHTS.name.endswith(".safetensors") and WEIGHTS.stat().st_size < 5_000_000
    record = json.loads(CONFIG.read_text())
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == record["sha256"]
    assert isinstance(model, UNet) and not model.training
    assert model.config == read_unet_config(CONFIG) == UNetConfig(**record["unet_config"])
    assert (model.config.in_channels, model.config.image_size) == (1, 8)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert record["train_config"]["hflip"] is False and record["steps"] == record["train_config"]["steps"]
    with torch.no_grad():
        eps = model(torch.zeros(2, 1, 8, 8), torch.tensor([10.0, 900.0]))
    assert eps.shape == (2, 1, 8, 8) and bool(torch.isfinite(eps).all())


def test_unknown_names_list_the_shipped_models():
    with pytest.raises(FileNotFoundError, match=r"ships with the package \(those are: digits\)"):
        load_unet("digitz")
    with pytest.raises(ValueError, match="has its own"):
        load_unet("digits", config=read_unet_config(CONFIG))


def test_sample_command_writes_grey_digits(tmp_path):
    out = tmp_path / "digits"
    args = ["sample", "--model", "digits", "--method", "ddim", "--steps", "10", "--eta", "0", "--num-images", "16",
            "--remove-shards", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "ddim_edu", *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and (out / "grid.png").is_file() and not (out / "shards").exists()
    with np.load(out / "samples.npz") as npz:
        images = npz["images"]
    assert images.dtype == np.uint8 and images.shape == (16, 8, 8, 1)
    assert images.min() < 32 and images.max() > 223  # dark background, bright strokes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "model digits" and manifest["method"] == "ddim" and manifest["eta"] == 0.0
    assert manifest["num_images"] == 16 and manifest["unet_config"] == json.loads(CONFIG.read_text())["unet_config"]
    assert len(manifest["timesteps"]) == 10
    # a rerun finds its finished samples (grey, the shards removed) and only redraws the grid
    (out / "grid.png").unlink()
    assert cli.main(args) == 0
    assert (out / "grid.png").is_file()
    with np.load(out / "samples.npz") as npz:
        assert np.array_equal(npz["images"], images)


@pytest.fixture(scope="module")
def distances(model):
    """Mean distance to the nearest training digit of 200 DDIM samples (S = 20, η = 0), of the held-out digits and of
    Gaussian noise clipped to [-1, 1]; the 10 % quantiles of the first two."""
    schedule = linear_schedule()
    x_T = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = sample(model, x_T, schedule, schedule.timesteps(20), method="ddim", eta=0.0).clamp(-1, 1)
    noise = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    train, heldout = load_digits("train")[0], load_digits("heldout")[0]
    d = {name: nearest_neighbour_distances(x, train) for name, x in
         (("samples", x0), ("heldout", heldout), ("noise", noise))}
    return {**{k: v.mean().item() for k, v in d.items()},
            "samples_q10": d["samples"].quantile(0.1).item(), "heldout_q10": d["heldout"].quantile(0.1).item()}


def test_samples_are_as_close_to_the_training_digits_as_heldout_digits_are(distances):
    # measured: samples 2.40, held-out digits 2.09 (ratio 1.15), clipped noise 7.6 (3.7 times the held-out distance)
    ratio = distances["samples"] / distances["heldout"]
    assert 0.85 < ratio < 1.3, distances
    assert distances["noise"] > 3 * distances["heldout"], distances


def test_samples_are_not_copies_of_training_digits(distances):
    # A model that memorised its 1,442 training digits would draw near-copies: distances near 0, far below
    # held-out digits'. Measured: mean 2.40 for the samples, 2.09 for held-out digits; 10 % quantile 1.77 and 1.54.
    assert distances["samples"] > 0.85 * distances["heldout"], distances
    assert distances["samples_q10"] > 0.8 * distances["heldout_q10"], distances
