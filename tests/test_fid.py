"""FID: the Fréchet distance and feature statistics against closed forms, the cached CIFAR-10 reference
statistics, the missing-backend messages, and equality with torch-fidelity where it imports."""
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ddim_edu.evaluation import fid as fid_module
from ddim_edu import cli
from ddim_edu.image import generate

ROOT = Path(__file__).resolve().parent.parent


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
    assert fid_module.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a shared eigenbasis: still commuting, not diagonal
    assert fid_module.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-9)
    assert fid_module.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_non_commuting_matches_symmetric_form():
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    got = fid_module.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(fd_symmetric(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(fid_module.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric in its arguments


def test_frechet_distance_near_singular_covariances():
    """Fewer samples than dimensions (as with few images and 2048 features): rank-deficient Σ, still finite and right."""
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((6, 20)), rng.standard_normal((7, 20)) + 0.5
    (mu1, s1), (mu2, s2) = fid_module.feature_statistics(f1), fid_module.feature_statistics(f2)
    got = fid_module.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(fd_symmetric(mu1, s1, mu2, s2), rel=1e-4, abs=1e-4)
    assert fid_module.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-3)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one D"):
        fid_module.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        fid_module.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_feature_statistics_equal_numpy_and_streaming():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((101, 5)) * 3 + 100  # a large offset: the streamed sums must not cancel
    mu, sigma = fid_module.feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-12)
    moments = fid_module.FeatureMoments()
    for start in range(0, 101, 30):
        moments.update(f[start:start + 30])
    mu_s, sigma_s = moments.statistics()
    np.testing.assert_allclose(mu_s, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_s, sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        fid_module.feature_statistics(f[:1])


def pixel_features(name="pixel-means"):
    """A stand-in extractor: per-channel means and stds of the pixels (6 features)."""
    def fn(images):
        x = images.astype(np.float64) / 255
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
    return fid_module.Features(name, fn)


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
    mu, sigma = fid_module.cifar10_statistics(features, stats, cifar10=tmp_path, records_per_file=None, batch_size=7, progress=False)
    expected = fid_module.feature_statistics(features.fn(train))
    np.testing.assert_allclose(mu, expected[0], rtol=1e-10)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-8, atol=1e-14)
    assert stats.is_file()

    monkeypatch.setattr(fid_module, "load_cifar10", lambda *a, **k: pytest.fail("the cache must be used"))
    mu2, sigma2 = fid_module.cifar10_statistics(features, stats, progress=False)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with pytest.raises(ValueError, match="not 'other'"):
        fid_module.cifar10_statistics(pixel_features("other"), stats)

    # FID of the training images themselves against their statistics is ~0; of other images it is not
    assert fid_module.fid(train, (mu, sigma), features, progress=False) == pytest.approx(0, abs=1e-8)
    dark = (train // 4).astype(np.uint8)
    assert fid_module.fid(dark, (mu, sigma), features, progress=False) == pytest.approx(
        fid_module.frechet_distance(*fid_module.feature_statistics(features.fn(dark)), mu, sigma), rel=1e-8)


def test_cifar10_statistics_missing_data_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DDIM_EDU_CIFAR10", raising=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-binary"):
        fid_module.cifar10_statistics(pixel_features(), tmp_path / "stats.npz", cifar10=None)


def write_samples(path, n=4, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    np.savez(path, images=images)
    return images


def test_fid_command_says_what_to_install(tmp_path, monkeypatch, capsys, no_torch_fidelity):
    """Everything missing is said at once: here the FID backend and, with no cached statistics, CIFAR-10."""
    samples = tmp_path / "s.npz"
    write_samples(samples)
    monkeypatch.delenv("DDIM_EDU_CIFAR10", raising=False)
    assert cli.main(["fid", str(samples), "--stats", str(tmp_path / "st.npz")]) == 1
    err = capsys.readouterr().err
    assert "8×8 images; CIFAR-10's are 32×32" in err  # write_samples makes 8×8 images
    assert "(1) the FID features need torch-fidelity" in err and "(2) the CIFAR-10 training set is needed once" in err
    pin = f'"torchvision=={fid_module.paired_torchvision()}.*"'
    assert f"pip install torch-fidelity {pin}" in err and "--index-url https://download.pytorch.org/whl/cpu" in err
    monkeypatch.setitem(sys.modules, "torchvision", None)  # torchvision missing: said first
    assert cli.main(["fid", str(samples), "--stats", str(tmp_path / "st.npz")]) == 1
    assert "needs torchvision; torchvision is not installed" in capsys.readouterr().err


def test_paired_torchvision_releases():
    """torchvision 0.(minor + 15) is made for torch 2.minor (the pairs on PyPI, e.g. 2.9.1/0.24.1, 2.14.1/0.29.1)."""
    assert [fid_module.paired_torchvision(v) for v in ("2.0.1", "2.9.1", "2.13.0+cpu", "2.14.1")] == ["0.15", "0.24", "0.28", "0.29"]


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
    assert fid_module.INCEPTION_WEIGHTS_URL in err and str(weights) in err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert fid_module.default_inception_weights() == tmp_path / "torch_home" / "hub" / "checkpoints" / fid_module.INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]


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
        pytest.skip(f"torch-fidelity cannot be imported here ({type(e).__name__}): {fid_module.fid_install_hint()}")
    weights = random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    train = write_cifar_folder(tmp_path / "cifar-10-batches-bin", per_file=4)  # 20 training images
    rng = np.random.default_rng(5)
    samples = (train[:12] // 2 + rng.integers(0, 128, size=train[:12].shape)).astype(np.uint8)

    features = fid_module.inception_features(weights, "cpu")
    reference = fid_module.cifar10_statistics(features, tmp_path / "stats.npz", cifar10=tmp_path, records_per_file=None,
                                       batch_size=8, progress=False)
    ours = fid_module.fid(samples, reference, features, batch_size=5, progress=False)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(samples), input2=UInt8Images(train), fid=True, cuda=False, cache=False, save_cpu_ram=True,
        feature_extractor_weights_path=str(weights), batch_size=8, verbose=False,
    )["frechet_inception_distance"]
    assert ours > 1  # the random network separates the two sets: a layout or channel-order slip would show
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_load_images_checks_layout(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))  # the layout of other tools: its only array
    assert generate.load_images(tmp_path / "a.npz").shape == (3, 8, 8, 3)
    np.savez(tmp_path / "b.npz", images=np.zeros((3, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        generate.load_images(tmp_path / "b.npz")
    torch.save({f"w{i}": torch.zeros(1) for i in range(8)}, tmp_path / "ckpt.pt")  # a zip, as an .npz is
    with pytest.raises(ValueError, match=r"holds the arrays .*, … \(\d+ in all\); expected an \.npz of uint8"):
        generate.load_images(tmp_path / "ckpt.pt")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not an \.npz file \(ValueError\)") as info:
        generate.load_images(tmp_path / "c.json")
    assert "allow_pickle" not in str(info.value)
    np.save(tmp_path / "d.npy", np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="single .npy array"):
        generate.load_images(tmp_path / "d.npy")


