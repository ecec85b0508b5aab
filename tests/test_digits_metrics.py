"""Distances between sets of digits in a digits classifier's features: the Fréchet distance against the closed
form between Gaussians, KID's unbiasedness and its definition, the shipped classifier, and the floor between
two sets of real digits against a set whose strokes are destroyed."""
import math

import numpy as np
import pytest
import torch

from ddim_edu.evaluation import digits as dm
from ddim_edu.evaluation.fid import feature_statistics, frechet_distance
from ddim_edu.image.data import float_to_pixels, load_digits


@pytest.fixture(scope="module")
def classifier():
    return dm.load_digits_classifier()


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.2 * np.eye(d)


def psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# --- the Fréchet distance -----------------------------------------------------------------------------------


def test_frechet_distance_of_gaussian_features_matches_the_closed_form_within_sampling_error():
    """d² = ‖μ1-μ2‖² + tr(Σ1 + Σ2 - 2(Σ1^½ Σ2 Σ1^½)^½); the estimate from R independent pairs of n samples each
    lies within 4 standard errors of their mean, plus the O(1/n) bias, of it."""
    rng = np.random.default_rng(0)
    d, n, R = 3, 4000, 30
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)  # they do not commute
    r1 = psd_sqrt(s1)
    exact = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1)))
    estimates = []
    for _ in range(R):
        x = rng.multivariate_normal(mu1, s1, size=n)
        y = rng.multivariate_normal(mu2, s2, size=n)
        estimates.append(frechet_distance(*feature_statistics(x), *feature_statistics(y)))
    estimates = np.array(estimates)
    standard_error = estimates.std(ddof=1) / math.sqrt(R)
    bias = (np.trace(s1) + np.trace(s2)) / n  # that of ‖m1 - m2‖²; the trace term's is of the same order
    assert abs(estimates.mean() - exact) < 4 * standard_error + 2 * bias, (estimates.mean(), exact, standard_error, bias)
    assert standard_error < 0.02 * exact  # the check is sharp: a 2 % error would fail it


def test_frechet_digits_distance_is_the_frechet_distance_of_the_classifier_features(classifier):
    images, _ = load_digits("heldout")
    x, y = images[:150], images[150:]
    fx, fy = dm.digits_features(x, classifier), dm.digits_features(y, classifier)
    assert fx.shape == (150, classifier.config.features) and fx.dtype == np.float64
    expected = frechet_distance(*feature_statistics(fx), *feature_statistics(fy))
    assert dm.frechet_digits_distance(x, y, classifier) == pytest.approx(expected, rel=1e-12)
    assert dm.frechet_digits_distance(x, y) == pytest.approx(expected, rel=1e-12)  # the shipped classifier by default
    both = dm.digits_distances(x, y, model=classifier)
    assert both.frechet == pytest.approx(expected, rel=1e-12) and (both.n_x, both.n_y) == (150, 205)


def test_features_take_the_samplers_uint8_layouts(classifier):
    images, _ = load_digits("heldout")
    pixels = float_to_pixels(images)  # [N, 1, 8, 8]
    hwc = pixels.permute(0, 2, 3, 1).numpy()  # [N, 8, 8, 1], as samples.npz holds them
    reference = dm.digits_features(pixels, classifier)
    np.testing.assert_array_equal(dm.digits_features(hwc, classifier), reference)
    np.testing.assert_array_equal(dm.digits_features(pixels[:, 0], classifier), reference)
    # 17 grey levels of the data survive the round trip to pixels to within 1/255
    np.testing.assert_allclose(dm.digits_features(images, classifier), reference, atol=0.05)
    np.testing.assert_array_equal(dm.digits_features(images.double().numpy(), classifier),
                                  dm.digits_features(images, classifier))


def test_frechet_bootstrap_standard_error_matches_the_spread_over_independent_draws():
    """The std of the bootstrap replicates from one pair of sets estimates the std of the distance over fresh pairs
    (here within 30 %, for Gaussian features with a known distance)."""
    rng = np.random.default_rng(5)
    d, n = 3, 400
    draw = lambda: (rng.standard_normal((n, d)), rng.standard_normal((n, d)) * 1.2 + 0.3)  # noqa: E731
    fresh = np.std([frechet_distance(*feature_statistics(a), *feature_statistics(b)) for a, b in
                    (draw() for _ in range(300))], ddof=1)
    boot = dm.frechet_bootstrap(*draw(), replicates=300, generator=torch.Generator().manual_seed(1))
    assert boot.shape == (300,) and np.isfinite(boot).all()
    assert 0.7 < boot.std(ddof=1) / fresh < 1.3, (boot.std(ddof=1), fresh)


def test_frechet_bootstrap_replicates_are_paired_by_the_seed():
    """Identically seeded generators and equal set sizes resample the same rows: the same sets give the same
    replicates, and so do both sets moved by one constant (the distance is translation invariant), replicate by
    replicate."""
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((60, 4))
    a = dm.frechet_bootstrap(x, y, replicates=20, generator=torch.Generator().manual_seed(3))
    b = dm.frechet_bootstrap(x, y, replicates=20, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(a, b)
    moved = dm.frechet_bootstrap(x + 0.5, y + 0.5, replicates=20, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(moved, a, rtol=1e-8)
    assert a.std(ddof=1) > 0.1 * a.mean()  # the replicates do differ from one another
    assert not np.array_equal(a, dm.frechet_bootstrap(x, y, replicates=20, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="replicates"):
        dm.frechet_bootstrap(x, y, replicates=1)


def test_distances_bootstrap_leaves_the_values_unchanged_and_adds_the_standard_error(classifier):
    x, y = dm.disjoint_digits(120, seed=2)
    plain = dm.digits_distances(x, y, model=classifier)
    with_se = dm.digits_distances(x, y, model=classifier, bootstrap=30)
    assert math.isnan(plain.frechet_standard_error)
    assert (with_se.frechet, with_se.kernel, with_se.kernel_standard_error) == (plain.frechet, plain.kernel,
                                                                              plain.kernel_standard_error)
    # the same as the std of frechet_bootstrap's replicates, drawn after KID's subsets from one generator
    g = torch.Generator().manual_seed(0)
    fx, fy = dm.digits_features(x, classifier), dm.digits_features(y, classifier)
    dm.kernel_distance(fx, fy, subsets=100, subset_size=100, generator=g)
    np.testing.assert_allclose(with_se.frechet_standard_error,
                               dm.frechet_bootstrap(fx, fy, replicates=30, generator=g).std(ddof=1), rtol=1e-10)
    assert with_se.frechet_standard_error > 0
    floor = dm.digits_floor(120, seed=2, model=classifier)
    assert floor == dm.digits_distances(x, y, model=classifier, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="bootstrap"):
        dm.digits_distances(x, y, model=classifier, bootstrap=1)


def test_disjoint_digits_are_disjoint_and_nested_in_n():
    a, b = dm.disjoint_digits(300, seed=1)
    assert a.shape == b.shape == (300, 1, 8, 8)
    flat = lambda t: {tuple(r) for r in t.flatten(1).tolist()}  # noqa: E731
    images, _ = load_digits("all")
    duplicates = len(images) - len(flat(images))  # scans that occur twice in the data set
    assert len(flat(a) & flat(b)) <= duplicates
    small, _ = dm.disjoint_digits(100, seed=1)
    assert torch.equal(small, a[:100])
    with pytest.raises(ValueError, match="n must be at most 898"):
        dm.disjoint_digits(899)


# --- the kernel distance (KID) --------------------------------------------------------------------------------


def cubic(a, b):
    return (a @ b / len(a) + 1) ** 3


def mmd2_unbiased_double_loop(x, y):
    n, m = len(x), len(y)
    xx = sum(cubic(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(cubic(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(cubic(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def mmd2_biased(x, y):
    """The V-statistic: the within-set means keep the diagonal k(x_i, x_i)."""
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def test_kernel_distance_equals_the_double_loop_unbiased_mmd2():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.3
    exact = mmd2_unbiased_double_loop(x, y)
    # subsets as large as the sets: every subset is the whole set, in another order
    kid = dm.kernel_distance(x, y, subsets=3, subset_size=6)
    assert kid.value == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert kid.standard_error == pytest.approx(0, abs=1e-12)
    value, se = dm.kernel_distance(torch.from_numpy(x).float(), y, subsets=1, subset_size=6)
    assert value == pytest.approx(exact, rel=1e-6) and math.isnan(se)


def test_kernel_distance_subset_average_estimates_the_full_set_u_statistic():
    """Given the sets, subsets are independent draws whose mean is the full-set U-statistic (of sets of other sizes
    too): the average lies within 4 of the returned standard errors of it."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((8, 2)), rng.standard_normal((11, 2)) * 1.3
    exact = mmd2_unbiased_double_loop(x, y)
    kid = dm.kernel_distance(x, y, subsets=4000, subset_size=4, generator=torch.Generator().manual_seed(0))
    assert abs(kid.value - exact) < 4 * kid.standard_error, (kid, exact)
    assert kid.standard_error < 0.5 * abs(exact)  # the check has power


def test_kernel_distance_is_unbiased_and_the_v_statistic_is_not():
    """Over many independent pairs of samples of one distribution the unbiased estimate averages to 0 within 4
    standard errors of that average; the V-statistic averages far above 0."""
    rng = np.random.default_rng(3)
    pairs, m, d = 1500, 10, 4
    unbiased, biased = [], []
    for _ in range(pairs):
        x, y = rng.standard_normal((m, d)), rng.standard_normal((m, d))
        unbiased.append(dm.kernel_distance(x, y, subsets=1, subset_size=m).value)
        biased.append(mmd2_biased(x, y))
    unbiased, biased = np.array(unbiased), np.array(biased)
    se_u, se_b = unbiased.std(ddof=1) / math.sqrt(pairs), biased.std(ddof=1) / math.sqrt(pairs)
    assert abs(unbiased.mean()) < 4 * se_u, (unbiased.mean(), se_u)
    assert biased.mean() > 20 * se_b, (biased.mean(), se_b)


def test_kernel_distance_of_different_distributions_is_clearly_positive():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((400, 5)), rng.standard_normal((300, 5)) + 0.5
    kid = dm.kernel_distance(x, y, subsets=50, subset_size=100)
    assert kid.value > 20 * kid.standard_error > 0
    same = dm.kernel_distance(x[:200], x[200:], subsets=50, subset_size=100)
    assert kid.value > 10 * abs(same.value)


# --- the shipped classifier and the floor -------------------------------------------------------------------


def test_shipped_classifier_loads_in_eval_mode_and_reaches_97_percent(classifier):
    assert not classifier.training
    accuracy = dm.digits_accuracy(classifier, "heldout")
    assert accuracy >= 0.97, accuracy


def test_classifier_round_trips_through_safetensors_and_says_how_to_rebuild(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = dm.DigitsClassifier(dm.DigitsClassifierConfig(channels=(8, 8), features=16)).eval()
    path = dm.save_digits_classifier(model, tmp_path / "c.safetensors", seed=0)
    loaded = dm.load_digits_classifier(path)
    x = load_digits("heldout")[0][:5]
    assert loaded.config == model.config and not loaded.training
    torch.testing.assert_close(loaded.features(x), model.features(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="make_digits_classifier.py"):
        dm.load_digits_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a digits classifier"):
        dm.load_digits_classifier(tmp_path / "bad.safetensors")


def test_floor_between_real_digits_is_an_order_of_magnitude_below_digits_with_shuffled_pixels(classifier):
    """Shuffling each image's 64 pixels keeps its ink (the grey-level histogram) and destroys its strokes."""
    n = 300
    floor = dm.digits_floor(n, model=classifier)
    images, _ = load_digits("all")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(7))
    real, other = images[order[:n]], images[order[n:2 * n]]
    g = torch.Generator().manual_seed(8)
    perms = torch.stack([torch.randperm(64, generator=g) for _ in range(n)])
    shuffled = torch.gather(other.flatten(1), 1, perms).view_as(other)
    contrast = dm.digits_distances(real, shuffled, model=classifier)
    assert (floor.n_x, floor.n_y) == (n, n)
    assert contrast.frechet > 10 * floor.frechet > 0, (floor, contrast)
    assert contrast.kernel > 10 * (abs(floor.kernel) + floor.kernel_standard_error), (floor, contrast)
    assert contrast.kernel > 20 * contrast.kernel_standard_error


# --- input checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(features_x=np.zeros(5)), "features_x"),
    (dict(features_y=np.zeros((1, 3))), "features_y"),
    (dict(features_y=np.zeros((10, 4))), "same dimension"),
    (dict(features_x=np.full((10, 3), np.nan)), "features_x must be finite"),
    (dict(subsets=0), "subsets"),
    (dict(subset_size=1), "subset_size"),
    (dict(subset_size=11), "subset_size must be at most"),
    (dict(generator=0), "generator"),
])
def test_kernel_distance_rejects_bad_input(kwargs, match):
    args = dict(features_x=np.ones((10, 3)), features_y=np.ones((12, 3)), subsets=2, subset_size=5) | kwargs
    x, y = args.pop("features_x"), args.pop("features_y")
    with pytest.raises(ValueError, match=match):
        dm.kernel_distance(x, y, **args)


@pytest.mark.parametrize("images, match", [
    (torch.zeros(4, 3, 8, 8), r"images must be .*got shape \(4, 3, 8, 8\)"),
    (torch.zeros(4, 8, 8, 1), r"images must be .*got shape \(4, 8, 8, 1\)"),  # float layout is [N, 1, 8, 8]
    (torch.zeros(0, 1, 8, 8), "N >= 1"),
    (torch.zeros(4, 1, 8, 8, dtype=torch.int64), "dtype"),
    (torch.full((4, 1, 8, 8), 16.0), r"images must lie in \[-1, 1\]"),
    (torch.full((4, 1, 8, 8), float("nan")), "images must be finite"),
    ([[0.0]], "images must be a numpy array or a torch tensor"),
])
def test_digits_features_reject_bad_images(classifier, images, match):
    with pytest.raises(ValueError, match=match):
        dm.digits_features(images, classifier)


def test_distances_and_floor_name_the_bad_argument(classifier):
    good = load_digits("heldout")[0][:10]
    with pytest.raises(ValueError, match="y must be"):
        dm.frechet_digits_distance(good, torch.zeros(10, 1, 7, 7), classifier)
    with pytest.raises(ValueError, match="x needs at least 2 images"):
        dm.digits_distances(good[:1], good, model=classifier)
    with pytest.raises(ValueError, match="n must be at most 898"):
        dm.digits_floor(899, model=classifier)
    with pytest.raises(ValueError, match="n must be an int"):
        dm.digits_floor(1, model=classifier)


def test_paired_difference_is_the_spread_of_the_replicates_differences():
    rng = np.random.default_rng(7)
    common = rng.normal(10, 3, 200)  # what both replicate arrays share (the reference set's draw)
    own = rng.normal(0, 0.5, 200)
    d, se = dm.paired_difference(4.0, common + own, 3.0, common)
    assert d == 1.0 and se == pytest.approx(own.std(ddof=1), rel=1e-12)
    assert se < 0.2 * common.std(ddof=1)  # far below either distance's own spread
    assert dm.paired_difference(2.0, common + 1.5, 1.0, common)[1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="paired arrays"):
        dm.paired_difference(1.0, common, 1.0, common[:10])
