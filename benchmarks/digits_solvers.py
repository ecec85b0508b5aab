"""Eq 14 solvers on a real network: accuracy per model evaluation and distance to the data, on the digits model.

The setting of ``benchmarks/ode_accuracy.py`` with the shipped digits UNet (``load_unet("digits")``,
float32) in place of a mixture's exact ε. n seeded draws x_T ~ N(0, I) are fed in at t = 999 (every
grid here ends there) and carried to x_0 by:

- ours: ``euler`` (= DDIM), ``heun``, ``dpmpp_2m``, ``dpmpp_3m``, ``unipc``, ``pc_sigma``, each with the
  Euler last step and with ``final_step="extrapolate"`` (rows ``<method>+x0``), at the largest S whose
  NFE is at most each target, on every grid of ``GRIDS``; a row's cell is its best grid;
- diffusers' DPM-Solver++(2M) and UniPC (bh2, order 2), in their stock configurations and on the
  integer-rounded versions of the same grids, driven exactly as ``ode_accuracy.py`` drives them
  (``make_peer``/``run_peer``, which call our UNet at the scheduler's integer timesteps).

Reference: Eq 14 solved by torchdiffeq's dopri5 (``solve_adaptive``) at rtol = atol = ``--tol`` in
float64 (the network itself in float32, its input cast) from σ(999) down to σ(0), stopping at
σ(t_min) of each grid on the way, then the Euler step from σ(0) to σ = 0 that every sampler takes
(the network is not defined below t = 0). Its accuracy is checked on the first 32 points against a
solve at 10 × the tolerance. Metrics: the RMSE of x_0 to the reference (pixels in [-1, 1]); the
distance to the data (Fréchet distance² with a bootstrap standard error, and KID, in the digits
classifier's features of ``ddim_edu.evaluation.digits``) of each row's samples at its best grid,
against n real digits, with the floor between two real sets of n.

    python benchmarks/digits_solvers.py          # writes docs/digits_solvers.{md,png}
    python benchmarks/digits_solvers.py --smoke --out /tmp/s   # seconds: 8 points, NFE 5 and 10, two grids, a loose reference
"""
from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_cli import parse, parser_for  # noqa: E402
from ode_accuracy import (  # noqa: E402
    EXTRAPOLATED, PEER_LABELS, best, cell, integer_grid, make_peer, rmse, run_ours, run_peer, split)

from ddim_edu.evaluation.digits import (  # noqa: E402
    digits_features, digits_floor, disjoint_digits, frechet_bootstrap, kernel_distance)
from ddim_edu.evaluation.fid import feature_statistics, frechet_distance  # noqa: E402
from ddim_edu.image.pretrained import load_unet  # noqa: E402
from ddim_edu.model import eps_at_sigma  # noqa: E402
from ddim_edu.schedules import linear_schedule  # noqa: E402
from ddim_edu.solvers import extrapolated_x0, solve_adaptive  # noqa: E402

TARGETS = (5, 10, 20, 50)  # NFE targets
T_MINS = (0, 10)  # smallest timestep of the karras and logsnr grids
GRIDS = ("trailing", *(f"{s}@{t}" for s in ("karras", "logsnr") for t in T_MINS))
METHOD_NAMES = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "pc_sigma")
OURS = (*METHOD_NAMES, *(m + EXTRAPOLATED for m in METHOD_NAMES))
PEERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
PROBLEM = "digits"
SMOKE = dict(n=8, targets=(5, 10), grids=("trailing", "logsnr@10"), tol=1e-3, bootstrap=10, subsets=10)


def float64_state(model):
    """The float32 network on a float64 state: its input cast to float32, ε cast back."""
    def f(x, t):
        return model(x.float(), t.float()).double()
    return f


def denoised(model, schedule, x_bar, sigma):
    """D = x̄ − σ ε at noise level σ: the x_0 prediction, i.e. the Euler step from σ to 0."""
    return x_bar - sigma * eps_at_sigma(model, schedule, x_bar, sigma)


@torch.no_grad()
def reference(model, schedule, x_T, tol):
    """Exact states x̄ at σ(t) for t in (999, *T_MINS, 0) by dopri5, segment by segment; and its NFE."""
    f64 = float64_state(model)
    ts = sorted({schedule.T - 1, *T_MINS, 0}, reverse=True)
    levels = [schedule.sigma(float(t)).item() for t in ts]
    x_bar = x_T.double() * math.sqrt(1 + levels[0] ** 2)
    states, nfe = {ts[0]: x_bar}, 0
    for t, a, b in zip(ts[1:], levels[:-1], levels[1:]):
        x_bar, used = solve_adaptive(f64, x_bar, schedule, a, b, rtol=tol, atol=tol)
        states[t], nfe = x_bar, nfe + used
    return states, nfe


def distances(x0, ref_features, args, bootstrap: bool) -> dict:
    """Fréchet distance² (with a bootstrap SE if asked) and KID of samples against the real reference set."""
    f = digits_features(x0.clamp(-1, 1))
    kid = kernel_distance(f, ref_features, subsets=args.subsets, subset_size=min(100, len(f) // 2),
                          generator=torch.Generator().manual_seed(args.seed + 3))
    out = {"fd": frechet_distance(*feature_statistics(f), *feature_statistics(ref_features)),
           "kid": kid.value, "kid_se": kid.standard_error, "fd_se": math.nan}
    if bootstrap:
        boot = frechet_bootstrap(f, ref_features, replicates=args.bootstrap,
                                 generator=torch.Generator().manual_seed(args.seed + 2))
        out["fd_se"] = float(boot.std(ddof=1))
    return out


def run(args):
    model, schedule = load_unet("digits"), linear_schedule()
    x_T = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    info = {}

    start = time.perf_counter()
    states, info["ref_nfe"] = reference(model, schedule, x_T, args.tol)
    t1 = max(T_MINS)
    s0, s1 = (schedule.sigma(float(t)).item() for t in (0, t1))
    f64 = float64_state(model)
    with torch.no_grad():
        d0, d1 = denoised(f64, schedule, states[0], s0), denoised(f64, schedule, states[t1], s1)
        x0_ref = d0.float()
        info["floors"] = {t: rmse(denoised(f64, schedule, states[t], schedule.sigma(float(t)).item()), d0)
                          for t in T_MINS if t > 0}
        info["extrapolated_ref"] = rmse(extrapolated_x0(d0, d1, s0, s1), d0)
        k = min(32, args.n)
        loose, _ = reference(model, schedule, x_T[:k], args.tol * 10)
        info["ref_vs_loose"] = rmse(denoised(f64, schedule, loose[0], s0), d0[:k])
    info["ref_seconds"] = time.perf_counter() - start
    print(f"reference: {info['ref_nfe']} evaluations, {info['ref_seconds']:.0f} s; RMSE to a {args.tol * 10:g} solve "
          f"{info['ref_vs_loose']:.1e}", flush=True)

    reference_set, _ = disjoint_digits(args.n, seed=args.seed)
    ref_features = digits_features(reference_set)
    floor = digits_floor(args.n, seed=args.seed, subsets=args.subsets, subset_size=min(100, args.n // 2),
                         bootstrap=args.bootstrap)
    info["floor"] = {"fd": floor.frechet, "fd_se": floor.frechet_standard_error, "kid": floor.kernel,
                     "kid_se": floor.kernel_standard_error}
    info["exact"] = distances(x0_ref, ref_features, args, bootstrap=True)

    rows, samples = [], {}

    def record(x0, **fields):
        r = {"problem": PROBLEM, **fields, "rmse": rmse(x0, x0_ref)}
        rows.append(r)
        samples[id(r)] = x0

    start = time.perf_counter()
    for method in OURS:
        for target in args.targets:
            for g in args.grids:
                x0, S, nfe = run_ours(model, x_T, schedule, method, g, target)
                record(x0, kind="ours", method=method, grid=g, target=target, S=S, nfe=nfe)
            r = best(rows, PROBLEM, "ours", method, target)
            print(f"{method} NFE ≤ {target}: RMSE {r['rmse']:.2e} ({r['grid']}, NFE {r['nfe']})", flush=True)
    info["ours_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    for name in PEERS:
        for target in args.targets:
            stock = make_peer(name, schedule, S=target)
            x0, S, nfe = run_peer(stock, model, x_T)
            record(x0, kind="stock", method=name, grid=stock.config.timestep_spacing, target=target, S=S, nfe=nfe)
            for g in args.grids:
                x0, S, nfe = run_peer(make_peer(name, schedule, timesteps=integer_grid(schedule, g, target)), model, x_T)
                record(x0, kind="grid", method=name, grid=g, target=target, S=S, nfe=nfe)
    info["peers_seconds"] = time.perf_counter() - start

    for r in rows:  # the distance to the data: every run; the bootstrap only for the cells reported
        shown = r is best(rows, PROBLEM, r["kind"], r["method"], r["target"])
        r.update(distances(samples[id(r)], ref_features, args, bootstrap=shown))
    return rows, info


# --- the report ---------------------------------------------------------------------------------


def labels():
    ours = [("ours", m, f"**{m}** (ours)") for m in OURS]
    stock = [("stock", p, f"{PEER_LABELS[p]}, diffusers stock") for p in PEERS]
    free = [("grid", p, f"{PEER_LABELS[p]}, diffusers best grid") for p in PEERS]
    return ours + stock + free


def pick(rows, kind, names, target):
    cands = [best(rows, PROBLEM, kind, m, target) for m in names]
    return min((c for c in cands if c is not None), key=lambda r: r["rmse"])


def distance_cell(r) -> str:
    return f"{r['fd']:.2f} ± {r['fd_se']:.2f} / {r['kid']:.1f} ± {r['kid_se']:.1f}"


def rank_lines(rows, args) -> list[str]:
    """The ranking here against docs/ode_accuracy.md's, computed."""
    lines = ["## Does the ranking on the exact mixtures hold here?", ""]
    for target in args.targets:
        base = sorted(METHOD_NAMES, key=lambda m: best(rows, PROBLEM, "ours", m, target)["rmse"])
        lines.append(f"- NFE ≤ {target}: ours by RMSE at each method's best grid, Euler last step: "
                     + " < ".join(f"{m} {best(rows, PROBLEM, 'ours', m, target)['rmse']:.2e}" for m in base) + "; "
                     + "with the extrapolated last step: "
                     + ", ".join(f"{m}+x0 {best(rows, PROBLEM, 'ours', m + EXTRAPOLATED, target)['rmse']:.2e}" for m in base)
                     + ".")
    lines.append("")
    for target in args.targets:
        ours = pick(rows, "ours", OURS, target)
        stock, grid = pick(rows, "stock", PEERS, target), pick(rows, "grid", PEERS, target)
        lines.append(f"- NFE ≤ {target}: our best, {ours['method']} on {ours['grid']}, {ours['rmse']:.2e}; the best stock "
                     f"peer, {PEER_LABELS[stock['method']]}, {stock['rmse']:.2e} (ours {ours['rmse'] / stock['rmse']:.2f}× of it); "
                     f"the best peer on our grids, {PEER_LABELS[grid['method']]} on {grid['grid']}, {grid['rmse']:.2e} "
                     f"(ours {ours['rmse'] / grid['rmse']:.2f}×).")
    lines.append("")
    return lines


def markdown(rows, info, args, seconds) -> list[str]:
    import diffusers

    head = "| | " + " | ".join(f"NFE ≤ {t}" for t in args.targets) + " |"
    rule = "|---" * (len(args.targets) + 1) + "|"
    floors = ", ".join(f"t_min = {t}: {v:.2e}" for t, v in info["floors"].items())
    lines = [
        "# Eq 14 solvers on a real network: the digits UNet" + (" — SMOKE RUN (meaningless numbers)" if args.smoke else ""),
        "",
        (f"Written by `benchmarks/digits_solvers.py` in {seconds / 60:.1f} min on {platform.machine()} with "
         f"{args.threads} torch thread{'s' if args.threads > 1 else ''}, torch {torch.__version__}, diffusers "
         f"{diffusers.__version__} (reference {info['ref_seconds']:.0f} s, ours {info['ours_seconds']:.0f} s, diffusers "
         f"{info['peers_seconds']:.0f} s). Figure: `digits_solvers.png`."),
        "",
        "## Protocol",
        "",
        (f"- Model: `load_unet(\"digits\")` (1.0M parameters, float32), DDPM's linear schedule, T = 1000. {args.n} seeded "
         f"x_T ~ N(0, I) (seed {args.seed}), fed in at t = 999, where every grid here starts."),
        (f"- Reference: dopri5 (`solve_adaptive`) at rtol = atol = {args.tol:g} on a float64 state from σ(999) to σ(0) "
         f"({info['ref_nfe']} network evaluations in all), then the Euler step to σ = 0 that every sampler takes last. "
         f"On the first {min(32, args.n)} points it differs from a solve at {args.tol * 10:g} by {info['ref_vs_loose']:.1e} RMSE. "
         f"The last step alone: an exact solve to σ(t_min) followed by the Euler step misses it by {floors} (a floor "
         "for the grids that end there); extrapolating the exact x_0 predictions at σ(0) and σ({max(T_MINS)}) to σ = 0 in σ² "
         f"(what `final_step=\"extrapolate\"` does) would move the reference by {info['extrapolated_ref']:.1e}, a limit "
         "below which the `+x0` rows cannot be judged against it."),
        ("- Ours: each method at the largest S with NFE ≤ the target (NFE: S for euler and the multistep methods, "
         f"`Method.nfe(S)` otherwise), on every grid of {', '.join(f'`{g}`' for g in args.grids)}: `trailing` is the "
         "integer grid ending at 999, `karras@t`/`logsnr@t` run from t_min = t to 999; a cell shows the best grid. "
         "Rows `+x0`: `final_step=\"extrapolate\"`."),
        ("- diffusers: `DPMSolverMultistepScheduler` (dpmsolver++, order 2) and `UniPCMultistepScheduler` (bh2, order 2, "
         "corrector on), stock (spacing `linspace`, starting at 999) and on the integer-rounded versions of our grids, "
         "driven by `make_peer`/`run_peer` of `benchmarks/ode_accuracy.py` (float64 noise levels, our UNet called at "
         "the scheduler's integer timesteps)."),
        (f"- Distance to the data: samples clamped to [-1, 1], against {args.n} real digits (the first set of "
         f"`disjoint_digits({args.n})`), in the digits classifier's features: Fréchet distance² ± bootstrap SE "
         f"({args.bootstrap} replicates) / KID ± its SE over {args.subsets} subsets. Floor (two real sets of "
         f"{args.n}): {distance_cell(info['floor'])}; the reference solution's samples: {distance_cell(info['exact'])}."),
        "",
        "## RMSE of x_0 to the reference (pixels in [-1, 1]); best grid per row",
        "",
        "Each cell: RMSE <sub>actual NFE · grid</sub>.",
        "",
        head,
        rule,
    ]
    for kind, method, label in labels():
        lines.append(f"| {label} | " + " | ".join(cell(best(rows, PROBLEM, kind, method, t)) for t in args.targets) + " |")
    lines += ["", "## Distance to the data at the same cells", "",
              "Fréchet distance² ± bootstrap SE / KID ± SE, of the samples of each cell above (its best grid by RMSE).", "",
              head, rule]
    for kind, method, label in labels():
        lines.append(f"| {label} | " + " | ".join(distance_cell(best(rows, PROBLEM, kind, method, t)) for t in args.targets) + " |")
    lines += ["| reference solution (dopri5) | " + " | ".join(distance_cell(info["exact"]) for _ in args.targets) + " |",
              "| floor: two real sets | " + " | ".join(distance_cell(info["floor"]) for _ in args.targets) + " |", ""]
    lines += rank_lines(rows, args)
    lines += ["![RMSE and distance to the data vs NFE](digits_solvers.png)", ""]
    return lines


def plot(rows, info, args, path):
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    palette = plt.get_cmap("tab20").colors
    palette = palette[::2] + palette[1::2]
    series = [("ours", m, f"{m} (ours)", "o-" if not m.endswith(EXTRAPOLATED) else "o--") for m in OURS]
    series += [(kind, p, f"diffusers {PEER_LABELS[p]}, {tag}", style)
               for p in PEERS for kind, tag, style in (("stock", "stock", ":"), ("grid", "best grid", "-."))]
    for i, (kind, method, label, style) in enumerate(series):
        pts = [best(rows, PROBLEM, kind, method, t) for t in args.targets]
        colour = palette[METHOD_NAMES.index(split(method)[0]) % len(palette)] if kind == "ours" else (
            "black" if kind == "grid" else "0.5")
        marker = None if kind == "ours" else ("s" if method == PEERS[0] else "^")
        kw = dict(color=colour, lw=1.3, label=label, **({"marker": marker, "mfc": "none"} if marker else {}))
        axes[0].plot([p["nfe"] for p in pts], [p["rmse"] for p in pts], style, **kw)
        axes[1].errorbar([p["nfe"] for p in pts], [p["fd"] for p in pts], yerr=[p["fd_se"] for p in pts], fmt=style,
                         capsize=2, **kw)
    axes[1].axhline(info["floor"]["fd"], color="tab:red", lw=1, ls="-.", label="floor: two sets of real digits")
    axes[1].axhline(info["exact"]["fd"], color="tab:green", lw=1, ls="--", label="reference solution (dopri5)")
    for ax, ylabel in zip(axes, ("RMSE of x_0 to the dopri5 reference", "Fréchet distance² to real digits (classifier features)")):
        ax.set_xscale("log")
        ax.set_xticks([p for p in args.targets], [str(t) for t in args.targets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    handles, labs = axes[1].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    target = args.targets[1] if len(args.targets) > 1 else args.targets[0]
    ours, grid = pick(rows, "ours", OURS, target), pick(rows, "grid", PEERS, target)
    fig.suptitle(f"Eq 14 solvers on the digits UNet ({args.n} x_T; each row at its best grid)\nAt NFE ≤ {target}: ours best "
                 f"{ours['method']} ({ours['grid']}) RMSE {ours['rmse']:.2e}; diffusers best "
                 f"{PEER_LABELS[grid['method']]} ({grid['grid']}) {grid['rmse']:.2e}", fontsize=10)
    fig.tight_layout(rect=(0, 0.17, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("--n", type=int, default=128, help="points x_T (default 128; at most 898 for the floor)")
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), help="NFE targets (default 5 10 20 50)")
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=GRIDS, help="the grids tried (default all)")
    parser.add_argument("--tol", type=float, default=1e-7, help="the reference's rtol = atol (default 1e-7)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of the Fréchet distance (default 200)")
    parser.add_argument("--subsets", type=int, default=100, help="KID's subsets (default 100)")
    return parse(parser, argv, SMOKE, "8 points, NFE 5 and 10, two grids, reference at 1e-3")


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=1, user_api="blas")  # the metric's small linear algebra: one BLAS thread on the shared cores
    start = time.perf_counter()
    with torch.no_grad():  # the peers call the UNet directly: without this every call's graph is kept (tens of GB)
        rows, info = run(args)
    seconds = time.perf_counter() - start
    lines = markdown(rows, info, args, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "digits_solvers.md"
    md.write_text("\n".join(lines) + "\n")
    plot(rows, info, args, args.out / "digits_solvers.png")
    print("\n".join(lines))
    print(f"wrote {md} and digits_solvers.png in {seconds:.0f} s")
    return md


if __name__ == "__main__":
    main()
