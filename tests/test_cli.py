"""The command line (``python -m ddim_edu sample|fid``): FID glue against closed forms, and sampling end to end
on a tiny random UNet (outputs, determinism across batch sizes, resume, refusals); the Table 1 benchmark's smoke run."""
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ddim_edu import cli
from ddim_edu.data import float_to_pixels
from ddim_edu.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAMES,
    diffusers_config,
    to_diffusers_state_dict,
)
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample
from ddim_edu.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                  norm_groups=8, dropout=0.0)


# --- Fréchet distance and statistics -------------------------------------------------------------


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def psd_sqrt(a):
    """Symmetric square root through the eigendecomposition (negative rounding clamped)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fd_symmetric(mu1, s1, mu2, s2):
    """W2² between Gaussians in its symmetric form: tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½)."""
    r = psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r @ s2 @ r)))


def test_frechet_distance_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert cli.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a shared eigenbasis: still commuting, not diagonal
    assert cli.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-9)
    assert cli.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_non_commuting_matches_symmetric_form():
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    got = cli.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(fd_symmetric(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(cli.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric in its arguments


def test_frechet_distance_near_singular_covariances():
    """Fewer samples than dimensions (as with few images and 2048 features): rank-deficient Σ, still finite and right."""
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((6, 20)), rng.standard_normal((7, 20)) + 0.5
    (mu1, s1), (mu2, s2) = cli.feature_statistics(f1), cli.feature_statistics(f2)
    got = cli.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(fd_symmetric(mu1, s1, mu2, s2), rel=1e-4, abs=1e-4)
    assert cli.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-3)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one D"):
        cli.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        cli.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_feature_statistics_equal_numpy_and_streaming():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((101, 5)) * 3 + 100  # a large offset: the streamed sums must not cancel
    mu, sigma = cli.feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-12)
    moments = cli.FeatureMoments()
    for start in range(0, 101, 30):
        moments.update(f[start:start + 30])
    mu_s, sigma_s = moments.statistics()
    np.testing.assert_allclose(mu_s, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_s, sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        cli.feature_statistics(f[:1])


def pixel_features(name="pixel-means"):
    """A stand-in extractor: per-channel means and stds of the pixels (6 features)."""
    def fn(images):
        x = images.astype(np.float64) / 255
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
    return cli.Features(name, fn)


def write_cifar_folder(folder, per_file=4):
    """The official binary layout: per record a label byte and the R, G, B planes; returns all train images [N, 32, 32, 3]."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    train = []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, size=(per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(per_file, 1), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, images.reshape(per_file, -1)], axis=1).tobytes())
        if name != "test_batch.bin":
            train.append(images.transpose(0, 2, 3, 1))
    return np.concatenate(train)


def test_cifar10_statistics_are_computed_once_and_cached(tmp_path, monkeypatch):
    train = write_cifar_folder(tmp_path / "cifar-10-batches-bin")
    features, stats = pixel_features(), tmp_path / "stats.npz"
    mu, sigma = cli.cifar10_statistics(features, stats, cifar10=tmp_path, records_per_file=None, batch_size=7, progress=False)
    expected = cli.feature_statistics(features.fn(train))
    np.testing.assert_allclose(mu, expected[0], rtol=1e-10)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-8, atol=1e-14)
    assert stats.is_file()

    monkeypatch.setattr(cli, "load_cifar10", lambda *a, **k: pytest.fail("the cache must be used"))
    mu2, sigma2 = cli.cifar10_statistics(features, stats, progress=False)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with pytest.raises(cli.CommandError, match="not 'other'"):
        cli.cifar10_statistics(pixel_features("other"), stats)

    # FID of the training images themselves against their statistics is ~0; of other images it is not
    assert cli.fid(train, (mu, sigma), features, progress=False) == pytest.approx(0, abs=1e-8)
    dark = (train // 4).astype(np.uint8)
    assert cli.fid(dark, (mu, sigma), features, progress=False) == pytest.approx(
        cli.frechet_distance(*cli.feature_statistics(features.fn(dark)), mu, sigma), rel=1e-8)


def test_cifar10_statistics_missing_data_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DDIM_EDU_CIFAR10", raising=False)
    with pytest.raises(cli.CommandError, match="cifar-10-binary"):
        cli.cifar10_statistics(pixel_features(), tmp_path / "stats.npz", cifar10=None)


def write_samples(path, n=4, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    np.savez(path, images=images)
    return images


def hide_torch_fidelity(monkeypatch):
    """As if torch-fidelity were not installed: importing it, or the submodule we use, raises ImportError
    (a submodule already imported stays in sys.modules and would be found without its package)."""
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)


def test_fid_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    """Everything missing is said at once: here the FID backend and, with no cached statistics, CIFAR-10."""
    samples = tmp_path / "s.npz"
    write_samples(samples)
    hide_torch_fidelity(monkeypatch)
    monkeypatch.delenv("DDIM_EDU_CIFAR10", raising=False)
    assert cli.main(["fid", str(samples), "--stats", str(tmp_path / "st.npz")]) == 1
    err = capsys.readouterr().err
    assert "8×8 images; CIFAR-10's are 32×32" in err  # write_samples makes 8×8 images
    assert "(1) the FID features need torch-fidelity" in err and "(2) the CIFAR-10 training set is needed once" in err
    pin = f'"torchvision=={cli.paired_torchvision()}.*"'
    assert f"pip install torch-fidelity {pin}" in err and "--index-url https://download.pytorch.org/whl/cpu" in err
    monkeypatch.setitem(sys.modules, "torchvision", None)  # torchvision missing: said first
    assert cli.main(["fid", str(samples), "--stats", str(tmp_path / "st.npz")]) == 1
    assert "needs torchvision; torchvision is not installed" in capsys.readouterr().err


def test_paired_torchvision_releases():
    """torchvision 0.(minor + 15) is made for torch 2.minor (the pairs on PyPI, e.g. 2.9.1/0.24.1, 2.14.1/0.29.1)."""
    assert [cli.paired_torchvision(v) for v in ("2.0.1", "2.9.1", "2.13.0+cpu", "2.14.1")] == ["0.15", "0.24", "0.28", "0.29"]


def test_fid_command_says_which_weights_to_fetch(tmp_path, monkeypatch, capsys):
    """With torch-fidelity importable but no weights file, the error gives the URL and the path; nothing is downloaded."""
    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = lambda *a, **k: pytest.fail("must not be built without weights")
    package.feature_extractor_inceptionv3 = module
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    samples = tmp_path / "s.npz"
    write_samples(samples)
    weights = tmp_path / "hub" / "inception.pth"
    assert cli.main(["fid", str(samples), "--inception-weights", str(weights)]) == 1
    err = capsys.readouterr().err
    assert cli.INCEPTION_WEIGHTS_URL in err and str(weights) in err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert cli.default_inception_weights() == tmp_path / "torch_home" / "hub" / "checkpoints" / cli.INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]


def random_inception_weights(path, monkeypatch):
    """A state dict for torch-fidelity's Inception-v3 with random He-initialised convolutions (features of order 1).

    The real weights cannot be fetched offline; the glue only needs a network of the same layout.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:  # build the network without its download and weight loading
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for conv in net.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


class UInt8Images(torch.utils.data.Dataset):
    """uint8 images [N, H, W, 3] served as torch-fidelity's inputs are: uint8 tensors [3, H, W]."""

    def __init__(self, images):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_fid_equals_torch_fidelity_on_the_same_images(tmp_path, monkeypatch):
    """Our FID route (features in batches, streamed moments, the CIFAR-10 reader, sqrtm) against torch-fidelity's own
    ``calculate_metrics`` on the same images and weights. Runs where torch-fidelity imports (the ``fid`` extra with a
    torchvision built for the installed torch); about a minute on 2 CPU cores."""
    try:
        import torch_fidelity
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"torch-fidelity cannot be imported here ({type(e).__name__}): {cli.fid_install_hint()}")
    weights = random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    train = write_cifar_folder(tmp_path / "cifar-10-batches-bin", per_file=4)  # 20 training images
    rng = np.random.default_rng(5)
    samples = (train[:12] // 2 + rng.integers(0, 128, size=train[:12].shape)).astype(np.uint8)

    features = cli.inception_features(weights, "cpu")
    reference = cli.cifar10_statistics(features, tmp_path / "stats.npz", cifar10=tmp_path, records_per_file=None,
                                       batch_size=8, progress=False)
    ours = cli.fid(samples, reference, features, batch_size=5, progress=False)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(samples), input2=UInt8Images(train), fid=True, cuda=False, cache=False, save_cpu_ram=True,
        feature_extractor_weights_path=str(weights), batch_size=8, verbose=False,
    )["frechet_inception_distance"]
    assert ours > 1  # the random network separates the two sets: a layout or channel-order slip would show
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_load_images_checks_layout(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))  # the layout of other tools: its only array
    assert cli.load_images(tmp_path / "a.npz").shape == (3, 8, 8, 3)
    np.savez(tmp_path / "b.npz", images=np.zeros((3, 3, 8, 8), np.uint8))
    with pytest.raises(cli.CommandError, match=r"\[N, H, W, 3\]"):
        cli.load_images(tmp_path / "b.npz")
    torch.save({f"w{i}": torch.zeros(1) for i in range(8)}, tmp_path / "ckpt.pt")  # a zip, as an .npz is
    with pytest.raises(cli.CommandError, match=r"holds the arrays .*, … \(\d+ in all\); expected an \.npz of uint8"):
        cli.load_images(tmp_path / "ckpt.pt")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(cli.CommandError, match=r"is not an \.npz file \(ValueError\)") as info:
        cli.load_images(tmp_path / "c.json")
    assert "allow_pickle" not in str(info.value)
    np.save(tmp_path / "d.npy", np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(cli.CommandError, match="single .npy array"):
        cli.load_images(tmp_path / "d.npy")


# --- sample ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny UNet saved in the diffusers layout; returns (folder, model)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = UNet(TINY).eval()
    folder = tmp_path_factory.mktemp("tiny_unet")
    (folder / CONFIG_NAME).write_text(json.dumps(diffusers_config(TINY)))
    save_file({k: v.contiguous() for k, v in to_diffusers_state_dict(model.state_dict()).items()}, str(folder / WEIGHTS_NAMES[0]))
    return folder, model


def run_sample(model_dir, out, *extra, batch=2, n=6, steps=5, seed=0):
    args = ["sample", "--model", str(model_dir), "--steps", str(steps), "--num-images", str(n), "--batch-size", str(batch),
            "--seed", str(seed), "--device", "cpu", "--grid", "4", "--quiet", "--out", str(out), *extra]
    return cli.main(args)


def images_of(out):
    with np.load(Path(out) / "samples.npz") as npz:
        return npz["images"]


def test_sample_writes_images_and_grid_and_is_batch_size_independent(tiny_model, tmp_path):
    folder, _ = tiny_model
    assert run_sample(folder, tmp_path / "b2", batch=2) == 0
    assert run_sample(folder, tmp_path / "b4", batch=4) == 0  # batches of 4 and 2
    images = images_of(tmp_path / "b2")
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, images_of(tmp_path / "b4"))
    import matplotlib.image
    grid = matplotlib.image.imread(tmp_path / "b2" / "grid.png")
    assert grid.shape[:2] == (2 * 10 + 2, 2 * 10 + 2)  # 4 images of 8×8 in a 2×2 grid with 2-pixel borders
    assert sorted(p.name for p in (tmp_path / "b2" / "shards").iterdir()) == [f"batch_0000{k}.npz" for k in range(3)]
    manifest = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert manifest["method"] == "ddim" and manifest["timesteps"] == [0.0, 200.0, 400.0, 600.0, 800.0]
    # x_T of image i depends on (seed, i) only; another seed gives other images
    np.testing.assert_array_equal(torch.cat([cli.initial_noise(0, 0, 2, (3, 8, 8)), cli.initial_noise(0, 2, 6, (3, 8, 8))]),
                                  cli.initial_noise(0, 0, 6, (3, 8, 8)))
    assert run_sample(folder, tmp_path / "seed1", seed=1) == 0
    assert not np.array_equal(images_of(tmp_path / "seed1"), images)


def test_sample_resumes_from_shards(tiny_model, tmp_path):
    folder, _ = tiny_model
    out = tmp_path / "run"
    assert run_sample(folder, out) == 0
    reference = images_of(out)
    shards = sorted((out / "shards").iterdir())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    shards[1].unlink()
    assert run_sample(folder, out) == 0
    np.testing.assert_array_equal(images_of(out), reference)
    for p in (shards[0], shards[2]):  # untouched
        assert (p.stat().st_mtime_ns, p.read_bytes()) == before[p.name]
    with np.load(shards[1]) as npz:
        np.testing.assert_array_equal(npz["images"], reference[2:4])


def test_sample_interrupted_loses_only_the_batch_in_progress(tiny_model, tmp_path, monkeypatch, capsys):
    folder, _ = tiny_model
    assert run_sample(folder, tmp_path / "whole") == 0
    real, calls = cli.sample_batch, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "sample_batch", interrupt_second)
    out = tmp_path / "interrupted"
    assert run_sample(folder, out) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [p.name for p in (out / "shards").iterdir()] == ["batch_00000.npz"]  # no temporary files left
    assert not (out / "samples.npz").exists()
    monkeypatch.setattr(cli, "sample_batch", real)
    assert run_sample(folder, out) == 0
    np.testing.assert_array_equal(images_of(out), images_of(tmp_path / "whole"))


def test_sample_refuses_other_arguments_in_the_same_folder(tiny_model, tmp_path, capsys):
    folder, _ = tiny_model
    out = tmp_path / "run"
    assert run_sample(folder, out, "--method", "sigma_hat") == 0
    assert run_sample(folder, out, "--method", "sigma_hat", seed=1) == 1
    err = capsys.readouterr().err
    assert "seed: stored 0, given 1" in err and "another --out" in err
    assert run_sample(folder, out, "--method", "sigma_hat", batch=3) == 1
    assert "batch_size: stored 2, given 3" in capsys.readouterr().err
    # a stochastic method is reproducible for a seed (and a batch size)
    assert run_sample(folder, tmp_path / "again", "--method", "sigma_hat") == 0
    np.testing.assert_array_equal(images_of(out), images_of(tmp_path / "again"))


def test_sample_unknown_method_lists_the_valid_ones(tiny_model, tmp_path, capsys):
    folder, _ = tiny_model
    with pytest.raises(SystemExit) as exit_info:
        run_sample(folder, tmp_path / "x", "--method", "dpm++")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'dpm++'" in err
    assert all(name in err for name in cli.ALL_METHODS)
    with pytest.raises(SystemExit):
        run_sample(folder, tmp_path / "x", "--method", "heun", "--eta", "0.5")
    assert "applies to method 'ddim' only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_from_a_trainer_checkpoint_uses_the_ema_weights(tiny_model, tmp_path, capsys):
    """--checkpoint reads the "ema" state dict (weights_only), or "model" with --weights model; the same weights
    give the same images as a folder or file holding them."""
    folder, model = tiny_model
    noise = UNet(TINY).state_dict()  # other weights as the "model" entry: only the EMA must be used
    torch.save({"format": "ddim_edu.image_training/1", "step": 1, "model": noise, "ema": model.state_dict(),
                "ema_n_averaged": torch.tensor(1), "optimizer": {}, "scheduler": {}, "rng": {}, "losses": torch.zeros(1),
                "config": {}}, tmp_path / "ck.pt")  # the other entries do not matter for sampling
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(cli.asdict(TINY)))
    assert run_sample(folder, tmp_path / "folder", "--method", "dpmpp_2m") == 0
    args = ["sample", "--checkpoint", str(tmp_path / "ck.pt"), "--config", str(config), "--method", "dpmpp_2m", "--steps", "5",
            "--num-images", "6", "--batch-size", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "ck")]
    assert cli.main(args) == 0
    np.testing.assert_array_equal(images_of(tmp_path / "ck"), images_of(tmp_path / "folder"))
    # --weights model: the trained weights instead, the same images as a folder holding them
    torch.save(noise, tmp_path / "noise.pt")
    assert cli.main(["sample", "--model", str(tmp_path / "noise.pt"), "--config", str(config), *args[5:-1],
                     str(tmp_path / "noise_folder")]) == 0
    assert cli.main([*args[:-1], str(tmp_path / "ck_model"), "--weights", "model"]) == 0
    np.testing.assert_array_equal(images_of(tmp_path / "ck_model"), images_of(tmp_path / "noise_folder"))
    assert not np.array_equal(images_of(tmp_path / "ck_model"), images_of(tmp_path / "ck"))
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", str(folder), "--weights", "model", "--out", str(tmp_path / "m")])
    assert "--weights applies to --checkpoint only" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m")]) == 1
    assert cli.main(["sample", "--model", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m")]) == 1  # the wrong flag
    assert "training checkpoint" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_python_m_ddim_edu_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "ddim_edu", "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "sample" in result.stdout and "fid" in result.stdout


# --- the Table 1 benchmark ----------------------------------------------------------------------------


def load_benchmark():
    spec = importlib.util.spec_from_file_location("cifar10_table1", ROOT / "benchmarks" / "cifar10_table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table1_smoke_runs_the_whole_grid(tmp_path):
    bench = load_benchmark()
    out = bench.main(["--smoke", "--quiet", "--num-images", "3", "--batch-size", "3", "--work-dir", str(tmp_path / "w"),
                      "--out", str(tmp_path / "table1.md")])
    text = out.read_text()
    assert "| η = 0 | " in text and "| σ̂ | " in text
    assert "(13.36)" in text and "(367.43)" in text  # the paper's numbers beside ours
    assert "3 per cell" in text and "seed 0" in text and "quadratic" in text
    assert len(list((tmp_path / "w").glob("*_S*/fid.json"))) == 25


def test_table1_fails_clearly_without_weights_or_fid_backend(tiny_model, tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", str(tmp_path / "no_such_model"), "--work-dir", str(tmp_path / "w")])
    assert exit_info.value.code == 1
    assert "cannot load the pretrained model" in capsys.readouterr().err
    hide_torch_fidelity(monkeypatch)
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_model[0]), "--work-dir", str(tmp_path / "w")])
    assert "pip install torch-fidelity" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing sampled


@pytest.mark.parametrize("args,message", [
    (["--num-images", "0"], "--num-images must be at least 2"),
    (["--batch-size", "0"], "--batch-size and --fid-batch-size must be at least 1"),
    (["--etas", "0", "-0.5"], "eta"),
    (["--steps", "10", "1001"], "1001"),
    (["--device", "nonsense"], "--device 'nonsense' cannot be used here"),
])
def test_table1_checks_its_arguments_before_any_work(tmp_path, capsys, args, message):
    """Zero is not read as 'the default', and bad η, S or device stop the run before the model or data are touched."""
    bench = load_benchmark()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", str(tmp_path / "no_such_model"), "--work-dir", str(tmp_path / "w"), *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and "cannot load the pretrained model" not in err
    assert not (tmp_path / "w").exists()


def test_sample_final_step(tiny_model, tmp_path, capsys):
    """--final-step extrapolate: recorded in the manifest, equal to sample(..., final_step="extrapolate"),
    other than Euler's last step; refused for an Eq 12 sampler before anything is written."""
    folder, model = tiny_model
    grid_args = ("--method", "pc_sigma", "--spacing", "linear", "--t-min", "300")  # σ(τ_1) ≈ 1.2: a large last step
    out = tmp_path / "pc"
    assert run_sample(folder, out, *grid_args, "--final-step", "extrapolate", n=2) == 0
    assert json.loads((out / "manifest.json").read_text())["final_step"] == "extrapolate"
    sched = linear_schedule()
    x_T = cli.initial_noise(0, 0, 2, (3, 8, 8))
    expected = sample(model, x_T, sched, sched.timesteps(5, "linear", t_min=300.0), "pc_sigma", final_step="extrapolate")
    np.testing.assert_array_equal(images_of(out), float_to_pixels(expected).permute(0, 2, 3, 1).numpy())
    assert run_sample(folder, tmp_path / "euler", *grid_args, n=2) == 0
    assert not np.array_equal(images_of(out), images_of(tmp_path / "euler"))
    with pytest.raises(SystemExit):
        run_sample(folder, tmp_path / "x", "--method", "ddim", "--final-step", "extrapolate")
    assert "applies to the ODE methods" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_errors_name_the_subcommand_and_unusable_devices(tiny_model, tmp_path, capsys):
    folder, _ = tiny_model
    with pytest.raises(SystemExit):
        run_sample(folder, tmp_path / "x", "--method", "heun", "--eta", "0.5")
    assert "python -m ddim_edu sample: error:" in capsys.readouterr().err  # the subcommand's usage, not the top level's
    for flag, value, message in (("--num-images", "0", "must be at least 1, got 0"), ("--seed", "-1", "must be at least 0, got -1"),
                                 ("--batch-size", "two", "expected an integer, got 'two'")):
        with pytest.raises(SystemExit):
            run_sample(folder, tmp_path / "x", flag, value)
        assert f"argument {flag}: {message}" in capsys.readouterr().err  # named by its flag
    for device in ("foo", "cuda:99" if torch.cuda.is_available() else "cuda"):
        args = ["sample", "--model", str(folder), "--steps", "2", "--num-images", "2", "--device", device, "--quiet",
                "--out", str(tmp_path / device.replace(":", "_"))]
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert f"--device {device!r} cannot be used here" in err and "--device cpu" in err
        assert not (tmp_path / device.replace(":", "_")).exists()  # refused before the folder is made


def test_sample_failed_before_any_batch_does_not_block_the_corrected_rerun(tiny_model, tmp_path, capsys):
    """A run that fails after writing its manifest but before any batch (here: extrapolation with one timestep)
    leaves nothing to protect, so the corrected command is not refused as 'other arguments'."""
    folder, _ = tiny_model
    out = tmp_path / "run"
    assert run_sample(folder, out, "--method", "euler", "--final-step", "extrapolate", steps=1) == 1
    assert "at least 2 timesteps" in capsys.readouterr().err
    assert (out / "manifest.json").is_file() and not (out / "shards").exists()
    assert run_sample(folder, out, "--method", "euler", "--final-step", "extrapolate", steps=2) == 0
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2
    assert run_sample(folder, out, "--method", "euler", steps=3) == 1  # with samples made, other arguments are refused
    assert "steps: stored 2, given 3" in capsys.readouterr().err


def test_sample_rerun_after_removing_shards_writes_the_requested_grid(tiny_model, tmp_path):
    import matplotlib.image

    folder, _ = tiny_model
    out = tmp_path / "run"
    assert cli.main(["sample", "--model", str(folder), "--steps", "2", "--num-images", "4", "--batch-size", "2",
                     "--grid", "0", "--remove-shards", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    assert not (out / "grid.png").exists()
    assert cli.main(["sample", "--model", str(folder), "--steps", "2", "--num-images", "4", "--batch-size", "2",
                     "--grid", "4", "--remove-shards", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    assert matplotlib.image.imread(out / "grid.png").shape[:2] == (22, 22)  # 4 images of 8×8 in a 2×2 grid


def test_sample_sigterm_is_ctrl_c(tiny_model, tmp_path, monkeypatch, capsys):
    """SIGTERM (a job scheduler stopping the run) ends like Ctrl-C: exit 130 with the resume hint; the handler is restored."""
    import os
    import signal

    folder, _ = tiny_model
    real, calls = cli.sample_batch, []

    def terminate_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "sample_batch", terminate_second)
    assert run_sample(folder, tmp_path / "run") == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert [p.name for p in (tmp_path / "run" / "shards").iterdir()] == ["batch_00000.npz"]


def test_sample_adaptive_solver_tolerances(tiny_model, tmp_path, capsys):
    """--rtol/--atol reach the adaptive solver (the images equal sample(..., rtol, atol)) and are recorded in the
    manifest; they are refused for other methods and must be positive."""
    folder, model = tiny_model
    out = tmp_path / "dopri"
    assert run_sample(folder, out, "--method", "dopri5", "--rtol", "1e-3", "--atol", "1e-4", n=2) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["rtol"], manifest["atol"]) == (1e-3, 1e-4)
    sched = linear_schedule()
    x_T = cli.initial_noise(0, 0, 2, (3, 8, 8))
    expected = sample(model, x_T, sched, sched.timesteps(5), "dopri5", rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(images_of(out), float_to_pixels(expected).permute(0, 2, 3, 1).numpy())
    assert run_sample(folder, tmp_path / "default", "--method", "dopri5", n=2) == 0  # the solver's defaults, recorded
    assert json.loads((tmp_path / "default" / "manifest.json").read_text())["rtol"] == 1e-5
    for bad, message in ((["--method", "ddim", "--rtol", "1e-3"], "applies to the adaptive solvers"),
                         (["--method", "dopri5", "--atol", "0"], "atol must be a finite number > 0")):
        with pytest.raises(SystemExit):
            run_sample(folder, tmp_path / "x", *bad)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert run_sample(folder, tmp_path / "ddim", n=2) == 0
    assert "rtol" not in json.loads((tmp_path / "ddim" / "manifest.json").read_text())  # older folders still resume
