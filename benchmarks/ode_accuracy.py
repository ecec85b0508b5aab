"""Accuracy per model evaluation: RMSE of x_0 against a tight Eq 14 reference, ours vs diffusers.

Two Gaussian mixtures with exact ε under DDPM's linear schedule (T = 1000). 4096 seeded draws
x_T ~ N(0, I) are fed in at the largest timestep of a grid and carried to σ = 0. The reference
solves Eq 14, ``dx̄/dσ = ε(x̄/sqrt(1+σ²), ᾱ = 1/(1+σ²))``, with torchdiffeq's dopri5 at
rtol = atol = 1e-10 in float64 from σ(999) to σ = 0, using the mixture's ε as the vector field
(defined down to σ = 0, unlike the model contract). Metric: the RMSE of x_0 to the reference.

Every method of ``METHODS`` and ``"ddim"`` runs on every grid at the largest S whose NFE is at
most each target; each ODE method runs again with ``final_step="extrapolate"`` (the row ``<method>+x0``)
and ``final_step="gaussian"`` (the row ``<method>+gauss``). diffusers' DDIM, DPM-Solver++ and UniPC schedulers run in their stock
configurations and, "given free choice of grid", on integer-rounded versions of the same grids.

    python benchmarks/ode_accuracy.py   # writes docs/ode_accuracy.{md,png}, benchmarks/results/ode_accuracy.csv
"""
from __future__ import annotations

import argparse
import csv
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

from ddim_edu.mixture import GaussianMixture
from ddim_edu.model import CountingModel
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import METHODS, sample

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (5, 10, 20, 50, 100)  # NFE targets
T_MINS = (0, 3, 10, 25)  # smallest timestep of the fractional grids
FRACTIONAL = ("linear", "karras", "logsnr")
GRIDS = ("leading", "trailing", *(f"{s}@{t}" for s in FRACTIONAL for t in T_MINS))
RTOL = ATOL = 1e-10  # the reference's tolerances
EXTRAPOLATED = "+x0"  # suffix of a row whose last step is final_step="extrapolate"
GAUSSIAN = "+gauss"  # suffix of a row whose last step is final_step="gaussian"
OURS = ("ddim", *METHODS, *(m + suffix for suffix in (EXTRAPOLATED, GAUSSIAN) for m in METHODS))


def problems() -> dict[str, tuple[str, GaussianMixture]]:
    """Problem A is fixed by the spec; B is a lopsided mixture, so that nothing is tuned to A."""
    b = GaussianMixture(
        means=[[1.5, 0.5], [-0.5, 2.0], [0.8, -1.2], [2.5, 1.8], [-1.0, -0.3]],
        stds=[[0.05, 0.2], [0.3, 0.08], [0.1, 0.1], [0.02, 0.15], [0.25, 0.04]],
        weights=[0.35, 0.1, 0.25, 0.2, 0.1],
    )
    return {
        "A": ("8 Gaussians on the unit circle, std 0.05", GaussianMixture.ring(8, 1.0, 0.05)),
        "B": ("5 Gaussians, weights 0.35/0.25/0.2/0.1/0.1, stds 0.02 to 0.3 per axis, mean (0.82, 0.40)", b),
    }


def grid(schedule, name: str, S: int):
    """Timesteps τ_1 < … < τ_S of a grid: ``"leading"``, ``"trailing"`` or ``"<spacing>@<t_min>"`` (all exactly S)."""
    spacing, _, t_min = name.partition("@")
    return schedule.timesteps(S, spacing, t_min=float(t_min)) if t_min else schedule.timesteps(S, spacing)


def split(name: str) -> tuple[str, str]:
    """A row of ours, ``"unipc+x0"`` say, as (method, final_step)."""
    for suffix, final_step in ((EXTRAPOLATED, "extrapolate"), (GAUSSIAN, "gaussian")):
        if name.endswith(suffix):
            return name[: -len(suffix)], final_step
    return name, "euler"


def sample_row(model, x_T, schedule, timesteps, row: str):
    """x_0 of one row of ours: ``sample`` with the row's method and, for an ODE method, its final step."""
    name, final_step = split(row)
    return sample(model, x_T, schedule, timesteps, method=name, **({} if name == "ddim" else {"final_step": final_step}))


def expected_nfe(method: str, S: int) -> int:
    """NFE on S timesteps: S for ``"ddim"``, ``Method.nfe(S)`` for an ODE method (the last step costs 1)."""
    return S if method == "ddim" else METHODS[split(method)[0]].nfe(S)


def steps_for(method: str, target: int) -> int:
    """The largest S (at least 2, for the fractional grids) with NFE ≤ target."""
    return target if method == "ddim" else METHODS[split(method)[0]].steps_for(target, minimum=2)


def rmse(x, ref) -> float:
    """sqrt of the mean over points and coordinates of the squared error (per-point norms: × sqrt(d))."""
    return ((x - ref) ** 2).mean().sqrt().item()


FAR = 0.25  # a point is "far off" when its x_0 misses the reference's by more than this (Euclidean)


def record(rows, x0, x0_ref, **fields):
    far = ((x0 - x0_ref).norm(dim=1) > FAR).double().mean().item()
    rows.append({**fields, "rmse": rmse(x0, x0_ref), "far": far})


# --- the reference and the last-step floors ------------------------------------------------------


def reference(mixture, schedule, x_T, rtol=RTOL, atol=ATOL):
    """x̄ along Eq 14 by dopri5 at σ(999), σ(t_min) for each t_min, and σ = 0 (where x̄ = x_0).

    Returns ({σ: x̄}, number of field evaluations). ``step_t`` makes the solver land on the
    requested levels instead of interpolating to them.
    """
    from torchdiffeq import odeint

    f = mixture.probability_flow()
    sigma_max = schedule.sigma(float(schedule.T - 1)).item()
    levels = [sigma_max, *(schedule.sigma(float(t)).item() for t in sorted(T_MINS, reverse=True)), 0.0]
    span = torch.tensor(levels, dtype=torch.float64)
    out = odeint(f, x_T * math.sqrt(1 + sigma_max**2), span, rtol=rtol, atol=atol, method="dopri5",
                 options={"step_t": span})
    return dict(zip(levels, out)), f.nfe


def floors(mixture, schedule, states, x0_ref) -> dict[int, float]:
    """RMSE left by an exact solve to σ(t_min) followed by the Euler (= DDIM) step to σ = 0 that every method takes."""
    return {t_min: rmse(x0_prediction(mixture, states, schedule.sigma(float(t_min)).item()), x0_ref) for t_min in T_MINS}


def x0_prediction(mixture, states, sigma):
    """D = x̄ - σ ε at an exactly solved state: the Euler step from σ to 0."""
    x_bar = states[sigma]
    return x_bar - sigma * mixture.eps(x_bar / math.sqrt(1 + sigma**2), 1 / (1 + sigma**2))


def extrapolated_last_step(mixture, schedule, states, x0_ref, t1=0, t2=3) -> float:
    """RMSE of a last step that extrapolates D to σ = 0 in σ² from exact states at τ_1 = t1 and τ_2 = t2.

    Along Eq 14, dD/dσ = -σ dε/dσ, so D = x_0 + O(σ²): extrapolating in σ² through (σ_1², D_1),
    (σ_2², D_2) costs no evaluation beyond the ones a multistep method already has.
    """
    s1, s2 = (schedule.sigma(float(t)).item() for t in (t1, t2))
    d1, d2 = x0_prediction(mixture, states, s1), x0_prediction(mixture, states, s2)
    return rmse(d1 - s1**2 * (d2 - d1) / (s2**2 - s1**2), x0_ref)


# --- ours ----------------------------------------------------------------------------------------


def run_ours(model, x_T, schedule, method, grid_name, target, make=None):
    """One row of ours at the largest S within ``target``, on ``grid(schedule, grid_name, S)`` or ``make(S)``."""
    S = steps_for(method, target)
    counted = CountingModel(model)
    x0 = sample_row(counted, x_T, schedule, grid(schedule, grid_name, S) if make is None else make(S), method)
    if counted.nfe != expected_nfe(method, S):
        raise RuntimeError(f"{method} on {grid_name}, S={S}: {counted.nfe} model calls, expected {expected_nfe(method, S)}")
    return x0, S, counted.nfe


# --- diffusers -----------------------------------------------------------------------------------

PEERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
PEER_LABELS = {"DDIMScheduler": "DDIM", "DPMSolverMultistepScheduler": "DPM-Solver++(2M)",
               "UniPCMultistepScheduler": "UniPC (bh2, order 2)"}


def make_peer(name: str, schedule, *, S: int | None = None, timesteps: list[int] | None = None,
              spacing: str | None = None, float64: bool = True, clip_sample: bool = False, corrector: bool = True):
    """A diffusers scheduler in its stock configuration (linear β 1e-4..0.02, T = 1000), set up for one run.

    ``float64``: ᾱ from our float64 schedule before ``set_timesteps``, and the noise levels it stores
    in float32 recomputed in float64 for the same timesteps. ``timesteps`` (descending ints) are
    custom timesteps: DPM-Solver++ takes them in ``set_timesteps``; UniPC has no such argument, so
    its ``timesteps`` and ``sigmas`` are set as ``set_timesteps`` would set them. DDIM cannot take
    them (its step derives the previous timestep from a fixed stride T // S); it takes ``spacing``.
    DDIM's stock ``clip_sample=True`` (clamping the x_0 prediction to [-1, 1], an image prior) is
    switched off unless ``clip_sample``: it is no part of the ODE and clips points of the ring.
    ``corrector=False`` disables UniPC's corrector at every step.
    """
    import diffusers

    extra = {"clip_sample": clip_sample} if name == "DDIMScheduler" else {}
    if not corrector:
        extra["disable_corrector"] = list(range(schedule.T))
    if spacing is not None:
        extra["timestep_spacing"] = spacing
    sched = getattr(diffusers, name)(**extra)
    if float64:
        sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    if timesteps is None:
        sched.set_timesteps(S)
    elif name == "DPMSolverMultistepScheduler":
        sched.set_timesteps(timesteps=timesteps)
    elif name == "UniPCMultistepScheduler":
        sched.set_timesteps(len(timesteps))  # resets the multistep state
        sched.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        sigmas = schedule.sigma(sched.timesteps.double())
        sched.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()
    else:
        raise ValueError(f"{name} takes no custom timesteps")
    if float64 and name != "DDIMScheduler":
        sched.sigmas = torch.cat([schedule.sigma(sched.timesteps.double()), torch.zeros(1, dtype=torch.float64)])
    return sched


def run_peer(sched, model, x_T):
    """x_T fed in at the scheduler's first timestep, one model call per timestep."""
    counted = CountingModel(model)
    x = x_T.clone()
    for t in sched.timesteps:
        eps = counted(x, torch.full((x.shape[0],), float(t), dtype=x.dtype))
        x = sched.step(eps, t, x).prev_sample
    return x, len(sched.timesteps), counted.nfe


def integer_grid(schedule, name: str, target: int, make=None) -> list[int]:
    """The integer-rounded grid (duplicates dropped) with the most timesteps ≤ target, descending.

    ``make(S)``, if given, makes the grid of S timesteps instead of ``grid(schedule, name, S)``."""
    best = None
    for S in range(2, min(3 * target, schedule.T) + 1):
        tau = torch.unique((grid(schedule, name, S) if make is None else make(S)).round())
        if len(tau) <= target:
            best = tau
    return best.flip(0).long().tolist()


# --- the benchmark -------------------------------------------------------------------------------


def run_problem(key, mixture, schedule, x_T, peers_available, int_grids):
    rows = []
    start = time.perf_counter()
    states, ref_nfe = reference(mixture, schedule, x_T)
    x0_ref = states[0.0]
    loose, _ = reference(mixture, schedule, x_T, rtol=1e-8, atol=1e-8)
    info = {"ref_nfe": ref_nfe, "ref_seconds": time.perf_counter() - start, "ref_vs_1e-8": rmse(loose[0.0], x0_ref),
            "floors": floors(mixture, schedule, states, x0_ref),
            "extrapolated": extrapolated_last_step(mixture, schedule, states, x0_ref)}
    print(f"[{key}] reference: {ref_nfe} evaluations, {info['ref_seconds']:.1f} s; RMSE to a 1e-8 solve "
          f"{info['ref_vs_1e-8']:.1e}; last-step floors " + ", ".join(f"t={t}: {v:.2e}" for t, v in info["floors"].items()))
    model = mixture.eps_model(schedule)

    start = time.perf_counter()
    for method in OURS:
        for target in TARGETS:
            for g in GRIDS:
                x0, S, nfe = run_ours(model, x_T, schedule, method, g, target)
                record(rows, x0, x0_ref, problem=key, kind="ours", method=method, grid=g, target=target, S=S, nfe=nfe)
    info["ours_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    for name in PEERS if peers_available else ():
        for target in TARGETS:
            stock = make_peer(name, schedule, S=target)
            spacing = stock.config.timestep_spacing
            options = [("stock", spacing, stock), ("grid", spacing, make_peer(name, schedule, S=target))]
            if name == "DDIMScheduler":
                options.append(("grid", "trailing", make_peer(name, schedule, S=target, spacing="trailing")))
            else:
                options += [("grid", g, make_peer(name, schedule, timesteps=int_grids[g, target])) for g in GRIDS]
            for kind, g, sched in options:
                x0, S, nfe = run_peer(sched, model, x_T)
                record(rows, x0, x0_ref, problem=key, kind=kind, method=name, grid=g, target=target, S=S, nfe=nfe)
        for target in (10, 20):  # variants of the stock runs, for the notes
            stock = make_peer(name, schedule, S=target)
            spacing = stock.config.timestep_spacing
            variants = [("stock float32", spacing, make_peer(name, schedule, S=target, float64=False))]
            if name == "DDIMScheduler":
                variants.append(("clip_sample on", spacing, make_peer(name, schedule, S=target, clip_sample=True)))
            if name == "UniPCMultistepScheduler":  # on its best grid, without the corrector
                g = best(rows, key, "grid", name, target)["grid"]
                grid_args = {"timesteps": int_grids[g, target]} if g in GRIDS else {"S": target}
                variants.append(("corrector off", g, make_peer(name, schedule, corrector=False, **grid_args)))
            for label, g, sched in variants:
                x0, S, nfe = run_peer(sched, model, x_T)
                record(rows, x0, x0_ref, problem=key, kind=f"variant: {label}", method=name, grid=g, target=target,
                       S=S, nfe=nfe)
    for target in (10, 20) if peers_available else ():  # ours on exactly the timesteps of the best peer on our grids
        top = min((best(rows, key, "grid", p, target) for p in PEERS), key=lambda r: r["rmse"])
        timesteps = (int_grids[top["grid"], target] if top["grid"] in GRIDS else
                     make_peer(top["method"], schedule, S=target, spacing=top["grid"]).timesteps.tolist())
        for method in OURS:
            if expected_nfe(method, len(timesteps)) <= target:
                x0 = sample_row(model, x_T, schedule, sorted(timesteps), method)
                record(rows, x0, x0_ref, problem=key, kind=f"same timesteps as {top['method']}", method=method,
                       grid=top["grid"], target=target, S=len(timesteps), nfe=expected_nfe(method, len(timesteps)))
    info["peers_seconds"] = time.perf_counter() - start
    print(f"[{key}] ours {info['ours_seconds']:.1f} s, diffusers {info['peers_seconds']:.1f} s")
    return rows, info


def best(rows, problem, kind, method, target):
    cands = [r for r in rows if r["problem"] == problem and r["kind"] == kind and r["method"] == method
             and r["target"] == target]
    return min(cands, key=lambda r: r["rmse"]) if cands else None


def find(rows, **fields):
    return next(r for r in rows if all(r[k] == v for k, v in fields.items()))


def cell(r, show_grid=True) -> str:
    if r is None:
        return "–"
    detail = f"{r['nfe']}" + (f" · {r['grid']}" if show_grid else "")
    return f"{r['rmse']:.2e} <sub>{detail}</sub>"


def row_labels(peers_available):
    ours = [("ours", m, f"**{m}** (ours)") for m in OURS]
    stock = [("stock", p, f"{PEER_LABELS[p]}, diffusers stock") for p in PEERS] if peers_available else []
    free = [("grid", p, f"{PEER_LABELS[p]}, diffusers best grid") for p in PEERS] if peers_available else []
    return ours + stock + free


def summary(rows, problem, target, peers_available):
    """(ours best, best stock peer, best peer on our grids) at one NFE target."""
    def pick(kind, names):
        return min((best(rows, problem, kind, m, target) for m in names), key=lambda r: r["rmse"])

    ours = pick("ours", OURS)
    return (ours, pick("stock", PEERS), pick("grid", PEERS)) if peers_available else (ours, None, None)


def verdict_lines(rows, problem, peers_available):
    def who(r):
        return f"{PEER_LABELS.get(r['method'], r['method'])} on {r['grid']}: {r['rmse']:.2e} (NFE {r['nfe']}, {r['far']:.1%} far off)"

    lines = []
    for target in (10, 20):
        ours, stock, free = summary(rows, problem, target, peers_available)
        text = f"- **NFE ≤ {target}**: ours best {who(ours)}"
        if stock is not None:
            r1, r2 = ours["rmse"] / stock["rmse"], ours["rmse"] / free["rmse"]
            text += (f"; best stock peer {who(stock)}, ratio **{r1:.2f}** (target ≤ 0.5: {'met' if r1 <= 0.5 else 'not met'}); "
                     f"best peer on our grids {who(free)}, ratio **{r2:.2f}** (target ≤ 1: {'met' if r2 <= 1 else 'not met'}).")
        lines.append(text)
    return lines


def notes(rows, infos, peers_available):
    """Checks that explain the peers' numbers: precision, clipping, UniPC's corrector, the last step."""
    lines = ["## Notes", ""]
    lines.append(
        "- Metric: RMSE over points *and* coordinates, as specified; the RMS of the per-point error norm is "
        "sqrt(2) times larger in 2-D. \"far off\" is the share of points whose x_0 misses the reference's by "
        f"more than {FAR}. On Problem B most far-off points of the better runs end on another component than "
        "the reference's (a checked property, not computed here), and at NFE ≤ 10 these few points carry most "
        "of the RMSE.")
    lines.append(
        "- The last step, from σ(τ_1) to 0, is Euler for our rows without `+x0` or `+gauss` and for the diffusers peers "
        "(`final_sigmas_type=\"zero\"` takes a first-order step), so the floors above bound all of them "
        "(up to cancellation with earlier errors, which is why a few cells sit slightly below the floor). The "
        "`+x0` rows end with `final_step=\"extrapolate\"`: Eq 14's field is odd in σ, so the x_0 prediction "
        "D = x̄ - σε is even in σ, D = x_0 + cσ² + O(σ⁴), and the line through the last two (σ², D) removes c "
        "at no extra evaluation. From exact states at t = 3 and t = 0 it leaves "
        + ", ".join(f"{infos[k]['extrapolated']:.1e} (Problem {k}, Euler floor {infos[k]['floors'][0]:.1e})" for k in infos)
        + ". The `+gauss` rows end with `final_step=\"gaussian\"` (`solvers.gaussian_x0`): the last two evaluations "
        "fix, coordinate by coordinate, the one Gaussian N(m, a) that has both (D - aε/σ = m at each), and x_0 "
        "follows its exact path from x̄ at σ(τ_1); where no Gaussian fits, the Euler step.")
    if not peers_available:
        return lines + [""]
    for key in infos:
        parts = []
        for name in PEERS:
            for target in (10, 20):
                stock = find(rows, problem=key, kind="stock", method=name, target=target)
                f32 = find(rows, problem=key, kind="variant: stock float32", method=name, target=target)
                parts.append(f"{PEER_LABELS[name]} NFE {target}: {f32['rmse']:.4e} vs {stock['rmse']:.4e}")
        lines.append(f"- Precision, Problem {key}: diffusers' own float32 ᾱ and noise levels vs ours in float64 "
                     "(stock grids): " + "; ".join(parts) + ". DPMSolverMultistepScheduler.step also casts the "
                     "state to float32 internally, whatever we pass; none of this shows at these error levels.")
    for key in infos:
        parts = []
        for target in (10, 20):
            clip = find(rows, problem=key, kind="variant: clip_sample on", method="DDIMScheduler", target=target)
            stock = find(rows, problem=key, kind="stock", method="DDIMScheduler", target=target)
            parts.append(f"NFE {target}: {clip['rmse']:.2e} with, {stock['rmse']:.2e} without")
        lines.append(f"- DDIMScheduler's stock `clip_sample=True` (x_0 prediction clamped to [-1, 1]), Problem {key}: "
                     + "; ".join(parts) + ". The tables use it switched off.")
    for key in infos:
        parts = []
        for target in (10, 20):
            off = find(rows, problem=key, kind="variant: corrector off", method="UniPCMultistepScheduler", target=target)
            on = best(rows, key, "grid", "UniPCMultistepScheduler", target)
            dpm = next((r for r in rows if r["problem"] == key and r["kind"] == "grid" and r["target"] == target
                        and r["method"] == "DPMSolverMultistepScheduler" and r["grid"] == off["grid"]), None)
            parts.append(f"NFE {target} on {off['grid']}: {on['rmse']:.2e} with the corrector, {off['rmse']:.2e} without"
                         + (f" (DPM-Solver++(2M) on the same grid: {dpm['rmse']:.2e})" if dpm else ""))
        lines.append(f"- UniPC's corrector, Problem {key}: " + "; ".join(parts) + ".")
    for key in infos:
        parts = []
        for target in (10, 20):
            top = min((best(rows, key, "grid", p, target) for p in PEERS), key=lambda r: r["rmse"])
            same = [r for r in rows if r["problem"] == key and r["kind"] == f"same timesteps as {top['method']}"
                    and r["target"] == target]
            parts.append(f"NFE {target}, {PEER_LABELS[top['method']]} on {top['grid']} {top['rmse']:.2e} vs ours "
                         + ", ".join(f"{r['method']} {r['rmse']:.2e}" for r in same))
        lines.append(f"- The same integer timesteps as the best peer on our grids (ours: methods with NFE(S) = S), "
                     f"Problem {key}: " + "; ".join(parts) + ".")
    return lines + [""]


USED = [f"ddim_edu/{m}.py" for m in ("solvers", "ode", "sampling", "schedules", "mixture")]  # what this benchmark runs


def library_version() -> str:
    """The commit the library was run at, flagged when the modules this benchmark runs have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *USED], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "ddim_edu (commit unknown)"
    return f"ddim_edu at {head}" + (" with local changes" if dirty else "")


def markdown(rows, infos, peers_available, kdiff_note, seconds, n_points):
    versions = f"{library_version()}, torch {torch.__version__}"
    if peers_available:
        import diffusers

        versions += f", diffusers {diffusers.__version__}"
    head = "| | " + " | ".join(f"NFE ≤ {t}" for t in TARGETS) + " |"
    rule = "|---" * (len(TARGETS) + 1) + "|"
    lines = [
        "# Accuracy per model evaluation: Eq 14 solvers vs diffusers",
        "",
        ("Written by `benchmarks/ode_accuracy.py` (all runs: `benchmarks/results/ode_accuracy.csv`; figure: "
        "`docs/ode_accuracy.png`). DDPM linear schedule (T = 1000), exact mixture ε, "
        f"{n_points} seeded points x_T ~ N(0, I) in float64, fed in at the largest timestep of each grid. "
        "Metric: RMSE of x_0 to a dopri5 solve of Eq 14 at rtol = atol = 1e-10 from σ(999) to σ = 0, "
        "with the mixture's ε as the field. Each cell: RMSE <sub>actual NFE · grid</sub>, for the grid that is "
        "best for that row at the largest S with NFE ≤ the target. Grids: `leading` (0, ⌊T/S⌋, …: starts below 999), "
        "`trailing` (…, 999), and `linear`/`karras`/`logsnr` from t_min to 999, written `logsnr@10` for "
        "t_min = 10 (t_min ∈ {0, 3, 10, 25}); diffusers runs take their integer-rounded versions (duplicates "
        "dropped). NFE: S for ddim, `Method.nfe(S)` for an ODE method, S for the diffusers schedulers."),
        "",
        f"{versions}, {torch.get_num_threads()} thread, {platform.machine()} CPU; whole run {seconds:.0f} s.",
        "",
        ("Peers, in diffusers' stock configurations (linear β 1e-4..0.02, T = 1000, ε prediction): "
        "`DDIMScheduler` (timestep_spacing `leading`: 0, T/S, …, so it starts at T − T/S; `clip_sample` "
        "switched off, see notes), `DPMSolverMultistepScheduler` (dpmsolver++, order 2, spacing `linspace`: "
        "round(linspace(0, 999, S+1)) without its 0, so it starts at 999; last step to σ = 0 first order) and "
        "`UniPCMultistepScheduler` (bh2, order 2, corrector on, spacing `linspace`). They run on float64 states, "
        "with ᾱ set from our float64 schedule before `set_timesteps` and the noise levels it stores in float32 "
        "recomputed in float64 for the same timesteps. \"Best grid\": DPM-Solver++ takes our integer-rounded "
        "grids through `set_timesteps(timesteps=…)`; UniPC has no such argument, so its `timesteps` and `sigmas` "
        "are set as `set_timesteps` would set them; DDIMScheduler cannot take custom timesteps (its step assumes "
        "the stride T // S), so its best is over `leading`/`trailing` (our ddim row is the same update on any grid). "
        f"{kdiff_note}"),
        "",
    ]
    for key, (desc, _) in problems().items():
        info = infos[key]
        lines += [
            f"## Problem {key}: {desc}",
            "",
            f"Reference: {info['ref_nfe']} field evaluations; it differs from a 1e-8 solve by {info['ref_vs_1e-8']:.1e} "
            "RMSE. Floor from the last step alone (exact to σ(t_min), then the Euler step to σ = 0 that every method "
            "without `+x0` or `+gauss` takes): " + ", ".join(f"t_min = {t}: {v:.2e}" for t, v in info["floors"].items()) + ".",
            "",
            "Best grid per row:",
            "",
            head,
            rule,
        ]
        for kind, method, label in row_labels(peers_available):
            lines.append(f"| {label} | " + " | ".join(cell(best(rows, key, kind, method, t)) for t in TARGETS) + " |")
        lines += ["", "Ours on the stock integer grids:", "", head, rule]
        for method in ("ddim", *METHODS):
            for g in ("leading", "trailing"):
                cells = [cell(find(rows, problem=key, kind="ours", method=method, grid=g, target=t), show_grid=False)
                         for t in TARGETS]
                lines.append(f"| {method} · {g} | " + " | ".join(cells) + " |")
        lines += ["", "Against the targets (ours ≤ ½ the best stock peer; ours ≤ the best peer given the same grids):", ""]
        lines += verdict_lines(rows, key, peers_available)
        lines.append("")
    return lines + notes(rows, infos, peers_available)


PLOTTED_EXTRAPOLATED = ("euler", "unipc", "pc_sigma")  # the figure shows these +x0 rows; the tables show all


def plot(rows, infos, peers_available, path):
    """RMSE vs NFE, one panel per problem: ours at each method's best grid (solid), diffusers dashed/dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(infos)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 5.6), squeeze=False)
    palette = plt.get_cmap("tab20").colors
    palette = palette[::2] + palette[1::2]
    for ax, key in zip(axes[0], keys):
        drawn = {}  # identical curves (ddim and euler are the same update) share one line
        for method in ("ddim", *METHODS, *(m + EXTRAPOLATED for m in PLOTTED_EXTRAPOLATED)):
            pts = [best(rows, key, "ours", method, t) for t in TARGETS]
            curve = tuple((p["nfe"], round(p["rmse"], 12)) for p in pts)
            drawn.setdefault(curve, []).append(method)
        for i, (curve, methods) in enumerate(drawn.items()):
            ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", color=palette[i % len(palette)], lw=1.5,
                    label=" = ".join(methods) + " (ours)")
        for name, marker in zip(PEERS if peers_available else (), ("s", "D", "^")):
            for kind, style, colour, tag in (("stock", ":", "0.55", "stock"), ("grid", "--", "black", "best grid")):
                pts = [best(rows, key, kind, name, t) for t in TARGETS]
                ax.plot([p["nfe"] for p in pts], [p["rmse"] for p in pts], style, marker=marker, color=colour,
                        mfc="none", lw=1.2, label=f"diffusers {PEER_LABELS[name]}, {tag}")
        ax.axhline(infos[key]["floors"][0], color="tab:red", lw=0.8, ls="-.", alpha=0.6,
                   label="last-step floor from t = 0")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel("RMSE of x_0 to the reference solution")
        ax.set_title(f"Problem {key}: " + ("8-Gaussian ring, std 0.05" if key == "A" else "5 anisotropic Gaussians, unequal weights"),
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.suptitle("Eq 14 solvers, accuracy per model evaluation: ours at each method's best grid vs diffusers")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family-points", type=int, default=256, help="x_T per member of the family (default 256)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    start = time.perf_counter()

    try:
        import diffusers  # noqa: F401

        peers_available = True
    except ImportError:
        peers_available = False
        print("diffusers is not installed: reporting ours only")
    try:
        import k_diffusion  # noqa: F401

        kdiff_note = "k-diffusion is importable but not compared here."
    except ImportError as err:
        kdiff_note = (f"k-diffusion: skipped, not installed ({err}); it is not installed beside this torch build "
                      "because its dependencies pull torchvision.")
    print(kdiff_note)

    schedule = linear_schedule()
    x_T = torch.randn(args.points, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    int_grids = {(g, t): integer_grid(schedule, g, t) for g in GRIDS for t in TARGETS}
    rows, infos = [], {}
    for key, (_, mixture) in problems().items():
        problem_rows, infos[key] = run_problem(key, mixture, schedule, x_T, peers_available, int_grids)
        rows += problem_rows
    from ode_family import plot as plot_family, run as run_family, section  # the family benchmark, reported first

    family_rows, family_infos, family_seconds = run_family(schedule, args.family_points, peers_available)
    seconds = time.perf_counter() - start

    csv_path = ROOT / "benchmarks" / "results" / "ode_accuracy.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["problem", "kind", "method", "grid", "target", "S", "nfe", "rmse", "far"])
        writer.writeheader()
        writer.writerows({**r, "rmse": f"{r['rmse']:.6e}", "far": f"{r['far']:.5f}"} for r in rows)
    lines = markdown(rows, infos, peers_available, kdiff_note, seconds, args.points)
    first_problem = next(i for i, line in enumerate(lines) if line.startswith("## Problem"))
    lines[first_problem:first_problem] = section(family_rows, family_infos, peers_available, family_seconds,
                                                 args.family_points)
    family_csv = csv_path.with_name("ode_family.csv")
    with open(family_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(family_rows[0]))
        writer.writeheader()
        writer.writerows(family_rows)
    md_path = ROOT / "docs" / "ode_accuracy.md"
    md_path.write_text("\n".join(lines) + "\n")
    plot(rows, infos, peers_available, ROOT / "docs" / "ode_accuracy.png")
    plot_family(family_rows, peers_available, ROOT / "docs" / "ode_family.png")
    print("\n".join(lines))
    print(f"\nwrote {md_path}, {md_path.with_suffix('.png')} and {csv_path} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
