"""The exercise graders: a right answer, written independently of the library from the paper's equations,
passes; each usual mistake fails with the hint aimed at it; errors and unfinished answers are reported."""
import math

import pytest
import torch

from ddim_edu import exercises as ex


def col(a, x):
    a = torch.as_tensor(a, dtype=torch.float64)
    return a[:, None] if a.ndim == 1 else a


# --- right answers, from the equations ---------------------------------------------------------------------


def q_sample(x0, alpha, noise):
    return col(alpha, x0).sqrt() * x0 + (1 - col(alpha, x0)).sqrt() * noise


def reverse_mean(x_t, x0, alpha, alpha_prev, sigma):
    return (math.sqrt(alpha_prev) * x0
            + math.sqrt(1 - alpha_prev - sigma**2) * (x_t - math.sqrt(alpha) * x0) / math.sqrt(1 - alpha))


def sigma_eta(alpha, alpha_prev, eta):
    return eta * ((1 - alpha_prev) / (1 - alpha)).sqrt() * (1 - alpha / alpha_prev).sqrt()


def c_t(alpha, alpha_prev, sigma):
    return alpha_prev.sqrt() - (1 - alpha_prev - sigma**2).sqrt() * alpha.sqrt() / (1 - alpha).sqrt()


def ddpm_weight(beta, alpha, sigma):
    return beta**2 / (2 * sigma**2 * (1 - beta) * (1 - alpha))


def eq12_step(x_t, eps, alpha, alpha_prev, sigma, z):
    f = (x_t - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
    return math.sqrt(alpha_prev) * f + math.sqrt(1 - alpha_prev - sigma**2) * eps + sigma * z


def single_point_eps(x, alpha, x0):
    return (x - col(alpha, x).sqrt() * x0) / (1 - col(alpha, x)).sqrt()


def heun(eps, x_bar, s, s_next):
    d = eps(x_bar, s)
    x_pred = x_bar + (s_next - s) * d
    return x_bar + (s_next - s) * (d + eps(x_pred, s_next)) / 2


def gaussian_last_step(d_1, eps_1, s_1, d_2, eps_2, s_2, x_bar_1):
    a = (d_1 - d_2) / (eps_1 / s_1 - eps_2 / s_2)
    mu = d_1 - a * eps_1 / s_1
    return mu + (x_bar_1 - mu) * torch.sqrt(a / (a + s_1**2))


def without_sigma(d_1, eps_1, s_1, d_2, eps_2, x_bar_1):  # the Gaussian last step with ε where ε/σ belongs
    a = (d_1 - d_2) / (eps_1 - eps_2)
    mu = d_1 - a * eps_1
    return mu + (x_bar_1 - mu) * torch.sqrt(a / (a + s_1**2))


RIGHT = [(ex.check_q_sample, q_sample), (ex.check_reverse_mean, reverse_mean), (ex.check_sigma_eta, sigma_eta),
         (ex.check_c_t, c_t), (ex.check_ddpm_weight, ddpm_weight), (ex.check_eq12_step, eq12_step),
         (ex.check_single_point_eps, single_point_eps), (ex.check_heun_sigma, heun),
         (ex.check_gaussian_last_step, gaussian_last_step)]


@pytest.mark.parametrize("check, answer", RIGHT, ids=lambda v: getattr(v, "__name__", ""))
def test_a_right_answer_is_told_right(check, answer):
    verdict = check(answer)
    assert verdict and verdict.right, verdict
    assert str(verdict).startswith("✔") and "≤ 1e-10" in str(verdict)


# --- the usual mistakes ------------------------------------------------------------------------------------


MISTAKES = [
    (ex.check_q_sample, lambda x0, a, n: col(a, x0) * x0 + (1 - col(a, x0)) * n, "square roots"),
    (ex.check_reverse_mean, lambda x_t, x0, a, ap, s: math.sqrt(ap) * x0
     + math.sqrt(1 - ap - s) * (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a), "σ_t enters squared"),
    (ex.check_sigma_eta, lambda a, ap, eta: eta * ((1 - ap) / (1 - a) * (1 - a)).sqrt(), "not sqrt(1 − α_t)"),
    (ex.check_c_t, lambda a, ap, s: ap.sqrt(), "x_0 appears twice"),
    (ex.check_ddpm_weight, lambda b, a, s: 1 / (2 * s**2 * a), "as the appendix prints it"),
    (ex.check_eq12_step, lambda x, e, a, ap, s, z: eq12_step(x, e, a, ap, s, 0 * z), "noise term is missing"),
    (ex.check_heun_sigma, lambda eps, x, s, sn: x + (sn - s) * eps(x, s), "that is Euler's step"),
    (ex.check_gaussian_last_step, lambda d1, e1, s1, d2, e2, s2, x1: d1, "that is the Euler step"),
    (ex.check_gaussian_last_step, lambda d1, e1, s1, d2, e2, s2, x1: without_sigma(d1, e1, s1, d2, e2, x1),
     "ε enters divided by its own σ"),
]


@pytest.mark.parametrize("check, answer, hint", MISTAKES, ids=lambda v: getattr(v, "__name__", ""))
def test_a_usual_mistake_gets_its_hint(check, answer, hint):
    verdict = check(answer)
    assert not verdict and str(verdict).startswith("✘")
    assert hint in verdict.hint, verdict


def test_a_wrong_answer_without_a_known_mistake_gets_the_general_hint():
    verdict = ex.check_sigma_eta(lambda a, ap, eta: 1.01 * sigma_eta(a, ap, eta))
    assert not verdict and "max relative difference to the library 1.0e-02 > 1e-10" in str(verdict)
    assert "η · sqrt((1 − α_{t−1})/(1 − α_t))" in verdict.hint


def test_unfinished_failing_and_misshaped_answers_are_reported_not_raised():
    def unfinished(*args):
        raise NotImplementedError

    assert "still raises NotImplementedError" in str(ex.check_eq12_step(unfinished))
    assert "raised ZeroDivisionError" in str(ex.check_eq12_step(lambda *a: 1 / 0))
    shape = ex.check_q_sample(lambda x0, a, n: (x0 + n).sum(1))
    assert "shape (16,), expected (16, 2)" in str(shape)
    assert "NaN" in str(ex.check_sigma_eta(lambda a, ap, eta: a * math.nan))


def test_the_single_point_checker_runs_ddim_and_measures_the_line():
    """A right ε puts DDIM's whole η = 0 trajectory on the line (a fact of Eq 12, here measured); an ε that is
    right only up to a factor fails the first comparison."""
    verdict = ex.check_single_point_eps(single_point_eps)
    assert "leave the line" in verdict.measured
    assert not ex.check_single_point_eps(lambda x, a, x0: 0.5 * single_point_eps(x, a, x0))


# --- notebook 02: Theorem 1's constant C ---------------------------------------------------------------


def constant_C(alpha_T, sigma_1, d, second_moment):
    """E KL(N(sqrt(α_T) x_0, (1 − α_T) I) ‖ N(0, I)) + (d/2) log(2π σ_1²), from the Gaussian KL's formula."""
    v = 1 - alpha_T
    prior_kl = 0.5 * (d * v + alpha_T * second_moment - d - d * math.log(v))
    return prior_kl + 0.5 * d * math.log(2 * math.pi) + d * math.log(sigma_1)


def test_the_constant_C_right_answer_is_told_right():
    verdict = ex.check_constant_C(constant_C)
    assert verdict and str(verdict).startswith("✔") and "≤ 1e-10" in str(verdict)
    assert "check_constant_C" in ex.__all__


@pytest.mark.parametrize("answer, hint", [
    (lambda a, s, d, m2: constant_C(a, s, d, m2) - 0.5 * d * math.log(2 * math.pi * s**2), "belongs to C"),
    (lambda a, s, d, m2: constant_C(a, s, d, m2) - 0.5 * d * math.log(s), "not (d/2)·log(2π σ_1)"),
    (lambda a, s, d, m2: constant_C(a, s, 1, m2) + 0.5 * (d - 1) * math.log(2 * math.pi * s**2), "each of the d"),
    (lambda a, s, d, m2: constant_C(a, s, d, m2) - 0.5 * a * m2, "contributes α_T·E‖x_0‖²/2"),
    (lambda a, s, d, m2: constant_C(a, s, d, m2) + d * math.log(1 - a), "enters with a minus sign"),
], ids=["no decoder term", "log sigma", "no d in the KL", "no mean term", "log sign"])
def test_the_constant_C_usual_mistakes_get_their_hints(answer, hint):
    verdict = ex.check_constant_C(answer)
    assert not verdict and hint in verdict.hint, verdict


# --- notebooks 04 and 05: α from σ, Euler in t, the score, the λ-family's step, the likelihood's scaling --------


def alpha_from_sigma(s):
    return 1 / (1 + s**2)


def euler_t_step(eps, x_bar, t, t_next, sigma, beta):
    s = sigma(t)
    return x_bar + (t_next - t) * beta(t) * (1 + s**2) / (2 * s) * eps(x_bar, s)


def score_from_eps(eps, alpha):
    return -eps / torch.sqrt(1 - col(alpha, eps))


def em_step(x, eps, alpha, alpha_prev, lam, z):
    ds = math.log(alpha_prev / alpha)
    return (1 + ds / 2) * x - (1 + lam**2) * ds / (2 * math.sqrt(1 - alpha)) * eps + lam * math.sqrt(ds) * z


def log_density_scaling(logp_bar, alpha, d):
    return logp_bar - d / 2 * math.log(alpha)


@pytest.mark.parametrize("check, answer", [
    (ex.check_alpha_from_sigma, alpha_from_sigma), (ex.check_euler_t_step, euler_t_step),
    (ex.check_score_from_eps, score_from_eps), (ex.check_em_step, em_step),
    (ex.check_log_density_scaling, log_density_scaling)], ids=lambda v: getattr(v, "__name__", ""))
def test_notebook_04_05_right_answers_are_told_right(check, answer):
    verdict = check(answer)
    assert verdict and str(verdict).startswith("✔") and "≤ 1e-10" in str(verdict), verdict
    assert check.__name__ in ex.__all__


@pytest.mark.parametrize("check, answer, hint", [
    (ex.check_alpha_from_sigma, lambda s: 1 / (1 + s), "not σ"),
    (ex.check_alpha_from_sigma, lambda s: 1 / (1 + s**2).sqrt(), "that is sqrt(α)"),
    (ex.check_alpha_from_sigma, lambda s: s**2 / (1 + s**2), "that is 1 − α"),
    (ex.check_euler_t_step, lambda eps, x, t, tn, sigma, beta: x + (sigma(tn) - sigma(t)) * eps(x, sigma(t)),
     "that is Euler's step in σ"),
    (ex.check_euler_t_step, lambda eps, x, t, tn, sigma, beta: x + (tn - t) * eps(x, sigma(t)), "needs the chain rule"),
    (ex.check_euler_t_step, lambda eps, x, t, tn, sigma, beta: x + (tn - t) * beta(t) / (2 * sigma(t)) * eps(x, sigma(t)),
     "(1 + σ²) is missing"),
    (ex.check_euler_t_step, lambda eps, x, t, tn, sigma, beta: x + (tn - t) * beta(t) * (1 + sigma(t) ** 2) / sigma(t)
     * eps(x, sigma(t)), "the ½ is missing"),
    (ex.check_score_from_eps, lambda eps, a: -score_from_eps(eps, a), "against the noise"),
    (ex.check_score_from_eps, lambda eps, a: -eps / (1 - col(a, eps)), "divides ε by its std"),
    (ex.check_score_from_eps, lambda eps, a: -eps * (1 - col(a, eps)).sqrt(), "not multiplied"),
    (ex.check_em_step, lambda x, e, a, ap, lam, z: em_step(x, e, a, ap, lam, z) + lam * (math.log(ap / a)
     - math.sqrt(math.log(ap / a))) * z, "std sqrt(Δs)"),
    (ex.check_em_step, lambda x, e, a, ap, lam, z: em_step(x, e, a, ap, lam, z) - (lam - lam**2) * math.log(ap / a)
     / (2 * math.sqrt(1 - a)) * e, "(1 + λ²)/2, not (1 + λ)/2"),
    (ex.check_em_step, lambda x, e, a, ap, lam, z: em_step(x, e, a, ap, lam, z) - math.log(ap / a) * x, "time runs backwards"),
    (ex.check_log_density_scaling, lambda lp, a, d: lp + d / 2 * math.log(a), "not +"),
    (ex.check_log_density_scaling, lambda lp, a, d: lp - d * math.log(a), "not d·log α"),
    (ex.check_log_density_scaling, lambda lp, a, d: lp - 0.5 * math.log(a), "not ½·log α"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_notebook_04_05_usual_mistakes_get_their_hints(check, answer, hint):
    verdict = check(answer)
    assert not verdict and hint in verdict.hint, verdict


# --- notebook 03: the α pairs of a sub-sequence τ ----------------------------------------------------------


def step_alphas(alphas_cumprod, tau):
    """α_{τ_i} and α_{τ_{i−1}} for i = 1..n, α_{τ_0} = α_0 = 1, written from the definition entry by entry."""
    tau = tau.tolist()
    alpha = [float(alphas_cumprod[t]) for t in tau]
    alpha_prev = [1.0] + [float(alphas_cumprod[t]) for t in tau[:-1]]
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(alpha_prev, dtype=torch.float64)


def previous_index_alphas(offset):
    """The usual shortcut: the previous index from τ_i alone (τ_i − offset(T, n)), α_0 = 1 below index 0."""
    def answer(alphas_cumprod, tau):
        prev = [t - offset(len(alphas_cumprod), len(tau)) for t in tau.tolist()]
        return (alphas_cumprod[tau], torch.tensor([float(alphas_cumprod[p]) if p >= 0 else 1.0 for p in prev],
                                                  dtype=torch.float64))
    return answer


def test_the_step_alphas_right_answer_is_told_right():
    verdict = ex.check_step_alphas(step_alphas)
    assert verdict and str(verdict).startswith("✔") and "≤ 1e-10" in str(verdict), verdict
    assert "check_step_alphas" in ex.__all__


@pytest.mark.parametrize("answer, hint", [
    (lambda ac, tau: (ac[tau], torch.cat([ac[:1], ac[tau][:-1]])), "not on alphas_cumprod[0]"),
    (previous_index_alphas(lambda T, n: T // n), "not τ_i − T // S"),
    (previous_index_alphas(lambda T, n: 1), "not the index τ_i − 1"),
], ids=["alpha_1 at the end", "t - T // S", "t - 1"])
def test_the_step_alphas_usual_mistakes_get_their_hints(answer, hint):
    verdict = ex.check_step_alphas(answer)
    assert not verdict and hint in verdict.hint, verdict


def test_the_step_alphas_checker_reports_swapped_and_unfinished_answers():
    swapped = ex.check_step_alphas(lambda ac, tau: step_alphas(ac, tau)[::-1])
    assert not swapped and "previous entry of τ" in swapped.hint
    def unfinished(alphas_cumprod, tau):
        raise NotImplementedError

    assert "NotImplementedError" in str(ex.check_step_alphas(unfinished))


# --- notebooks 06 and 07: encoding, slerp, the Fréchet distance, σ̂ ------------------------------------------

import numpy as np  # noqa: E402  (this section's own imports)
from scipy import linalg  # noqa: E402

from ddim_edu.solvers import encode, sample  # noqa: E402


def first_step(eps, x0, s_1):
    """x̄_1 = x_0 + σ_1 ε(x̄_1, σ_1) by plain iteration from x_0."""
    x_bar = x0
    for _ in range(200):
        x_bar, previous = x0 + s_1 * eps(x_bar, s_1), x_bar
        if torch.equal(x_bar, previous):
            break
    return x_bar


def euler_round_trip(model, x0, schedule, tau_enc, tau_dec):
    """DDIM inversion and DDIM decoding written out in (σ, x̄): the first step by iteration, then Euler upwards with ε
    at the lower end of each step; down again by Euler with ε at the upper end, the last step to σ = 0."""
    def eps(x_bar, t):
        s = float(schedule.sigma(t))
        return model(x_bar / math.sqrt(1 + s**2), torch.full((x_bar.shape[0],), float(t), dtype=torch.float64))

    up = [float(t) for t in tau_enc]
    s = [float(schedule.sigma(t)) for t in up]
    x_bar = x0
    for _ in range(500):
        x_bar, previous = x0 + s[0] * eps(x_bar, up[0]), x_bar
        if (x_bar - previous).abs().max() < 1e-15:
            break
    for k in range(1, len(up)):
        x_bar = x_bar + (s[k] - s[k - 1]) * eps(x_bar, up[k - 1])
    x_T = x_bar / math.sqrt(1 + s[-1] ** 2)
    down = [float(t) for t in reversed(tau_dec)]
    s = [float(schedule.sigma(t)) for t in down] + [0.0]
    x_bar = x_T * math.sqrt(1 + s[0] ** 2)
    for k, t in enumerate(down):
        x_bar = x_bar + (s[k + 1] - s[k]) * eps(x_bar, t)
    return x_bar


def slerp(x0, x1, w):
    cos = (x0 * x1).sum(1, keepdim=True) / (x0.norm(dim=1, keepdim=True) * x1.norm(dim=1, keepdim=True))
    theta = torch.arccos(cos)
    return (torch.sin((1 - w) * theta) * x0 + torch.sin(w * theta) * x1) / torch.sin(theta)


def frechet(mu1, sigma1, mu2, sigma2):
    """tr((Σ1Σ2)^{1/2}) as the sum of the square roots of the eigenvalues of Σ1Σ2 (real and ≥ 0: Σ1Σ2 is similar to
    Σ1^{1/2}Σ2Σ1^{1/2})."""
    root_trace = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * root_trace)


def step_gain(v, s_a, s_b):
    return (v + s_a * s_b) / (v + s_b**2)


def sigma_hat(alpha, alpha_prev):
    return torch.sqrt(1 - alpha / alpha_prev)


@pytest.mark.parametrize("check, answer", [
    (ex.check_encode_first_step, first_step), (ex.check_encode_decode, euler_round_trip), (ex.check_slerp, slerp),
    (ex.check_step_gain, step_gain), (ex.check_frechet_distance, frechet), (ex.check_sigma_hat, sigma_hat)],
    ids=lambda v: getattr(v, "__name__", ""))
def test_notebook_06_07_right_answers_are_told_right(check, answer):
    verdict = check(answer)
    assert verdict and str(verdict).startswith("✔") and "≤ 1e-10" in str(verdict), verdict
    assert check.__name__ in ex.__all__


def test_the_encoding_checkers_report_what_they_measured():
    """The first step's verdict measures how far the sampler's last step lands from x_0; the grids' verdict measures
    the round trip of both pairings and says for each whether the other grid adds or removes error; the step gain's
    verdict says that every gain is at least ρ."""
    assert "would miss by" in ex.check_encode_first_step(first_step).measured
    measured = ex.check_encode_decode(euler_round_trip).measured
    assert "S = 10 latents on the S = 50 grid" in measured and "S = 50 latents on the S = 10 grid" in measured
    assert measured.count(" error (") == 2
    assert "every g ≥ ρ = σ_a/σ_b: True" in ex.check_step_gain(step_gain).measured


def grids(pick):
    """A round trip with the library's encode and sample on the grids that ``pick(tau_enc, tau_dec)`` returns."""
    def answer(model, x0, schedule, tau_enc, tau_dec):
        enc, dec = pick(tau_enc, tau_dec)
        return sample(model, encode(model, x0, schedule, enc), schedule, dec)
    return answer


def frechet_with(cross, mean=lambda d: d @ d):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2) − tr(cross(Σ1, Σ2)), with a (wrong) cross term or mean term."""
    return lambda m1, s1, m2, s2: mean(m1 - m2) + np.trace(s1 + s2 - cross(s1, s2))


def sqrtm(a):
    return linalg.sqrtm(a).real


@pytest.mark.parametrize("check, answer, hint", [
    (ex.check_encode_first_step, lambda eps, x0, s: x0 + s * eps(x0, s), "one explicit step"),
    (ex.check_encode_first_step, lambda eps, x0, s: first_step(eps, x0, s) / math.sqrt(1 + s**2), "return x̄_1 itself"),
    (ex.check_encode_first_step, lambda eps, x0, s: first_step(lambda x, s_: -eps(x, s_), x0, s), "with a plus"),
    (ex.check_encode_decode, grids(lambda e, d: (e, e)), "decode on tau_dec"),
    (ex.check_encode_decode, grids(lambda e, d: (d, d)), "encode on tau_enc"),
    (ex.check_encode_decode, grids(lambda e, d: (d, e)), "swapped"),
    (ex.check_encode_decode, lambda m, x0, sch, te, td: encode(m, x0, sch, te), "that is the latent"),
    (ex.check_step_gain, lambda v, s_a, s_b: s_a / s_b, "the limit of data at one point"),
    (ex.check_step_gain, lambda v, s_a, s_b: (v + s_a * s_b) / (v + s_a**2), "at the level it starts from"),
    (ex.check_step_gain, lambda v, s_a, s_b: 1 + (s_b - s_a) * s_b / (v + s_b**2), "the step goes down"),
    (ex.check_slerp, lambda a, b, w: (1 - w) * a + w * b, "linear interpolation"),
    (ex.check_slerp, lambda a, b, w: slerp(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True), w),
     "normalise only to compute the angle"),
    (ex.check_slerp, lambda a, b, w: slerp(a, b, 1 - w), "w = 0 must give x0"),
    (ex.check_slerp, lambda a, b, w: slerp(a.reshape(1, -1), b.reshape(1, -1), w).reshape(a.shape), "one angle over the whole batch"),
    (ex.check_frechet_distance, frechet_with(lambda s1, s2: 2 * s1 @ s2), "not Σ1Σ2 itself"),
    (ex.check_frechet_distance, frechet_with(lambda s1, s2: 2 * np.sqrt(s1 @ s2)), "root of each entry"),
    (ex.check_frechet_distance, frechet_with(lambda s1, s2: 2 * sqrtm(s1) @ sqrtm(s2)), "only when Σ1 and Σ2 commute"),
    (ex.check_frechet_distance, frechet_with(lambda s1, s2: sqrtm(s1 @ s2)), "the factor 2 is missing"),
    (ex.check_frechet_distance, frechet_with(lambda s1, s2: 2 * sqrtm(s1 @ s2), mean=lambda d: math.sqrt(d @ d)),
     "the means enter squared"),
    (ex.check_frechet_distance, lambda *a: math.sqrt(frechet(*a)), "no square root of the whole"),
    (ex.check_sigma_hat, lambda a, ap: sigma_eta(a, ap, 1.0), "that is σ_{τ_i}(η = 1) of Eq 16"),
    (ex.check_sigma_hat, lambda a, ap: 1 - a / ap, "that is the variance"),
    (ex.check_sigma_hat, lambda a, ap: (1 - a).sqrt(), "that is sqrt(1 − α_{τ_i})"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_notebook_06_07_usual_mistakes_get_their_hints(check, answer, hint):
    verdict = check(answer)
    assert not verdict and hint in verdict.hint, verdict


def test_the_sigma_hat_checker_points_at_the_inverted_ratio():
    verdict = ex.check_sigma_hat(lambda a, ap: torch.sqrt(1 - ap / a))
    assert not verdict and "NaN" in verdict.measured and "the ratio is below 1" in verdict.hint
