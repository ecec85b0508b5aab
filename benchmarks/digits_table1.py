"""The paper's Table 1 on real images: the η-family and σ̂ on scikit-learn's 8×8 digits, S = 10 … 1000.

The shipped digits model (``load_unet("digits")``: a 1.0M-parameter UNet, ε-prediction, DDPM's
linear schedule with T = 1000) samples with Eq 12 for η ∈ {0, 0.2, 0.5, 1} (Eq 16) and with the
σ̂ row (DDPM ancestral steps on τ with x_0 clipped to [-1, 1], as the reference code), on the
paper's ``uniform`` τ and its ``quad`` τ. Every cell of a column starts from the same seeded x_T
(the first n of one draw); the stochastic rows draw their noise from one seeded generator.

Measured per cell, against n real digits (the first set of ``disjoint_digits(n)``), in the
features of the digits classifier of ``ddim_edu.evaluation.digits``:

- the Fréchet distance², with a bootstrap standard error over both sets (``frechet_bootstrap``);
  every cell of a column resamples the same rows, so differences between rows get paired standard
  errors (the reference set and x_T are shared, and their share of the spread cancels);
- KID's unbiased MMD² estimate with its standard error (subset sampling only, as the metric gives it);
- the floor: the same between the reference set and a disjoint set of n real digits (``digits_floor``).

The largest S takes fewer samples (``--n-last``); since the Fréchet distance's bias grows as 1/n,
the comparison "DDIM at 20–100 steps vs 1000-step DDPM" is made at that smaller n, on the first
samples of the other cells (same x_T). Samples are clamped to [-1, 1] before the metric, as
writing them as images does. The sampler runs on one torch thread unless ``--threads`` says (a
small model on shared cores, as :mod:`ddim_edu.utils.threads` explains).

    python benchmarks/digits_table1.py           # writes docs/digits_table1.{md,png} and docs/digits_table1_samples.png
    python benchmarks/digits_table1.py --smoke --out /tmp/t1   # seconds: tiny n and S
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_cli import parse, parser_for  # noqa: E402
from ddim_edu.evaluation.digits import (  # noqa: E402
    digits_features, digits_floor, disjoint_digits, frechet_bootstrap, kernel_distance, paired_difference)
from ddim_edu.evaluation.fid import feature_statistics, frechet_distance  # noqa: E402
from ddim_edu.image.grids import make_grid  # noqa: E402
from ddim_edu.image.pretrained import load_unet  # noqa: E402
from ddim_edu.paper import SIGMA_HAT, TABLE1_FID, table1_row_label, table1_sample  # noqa: E402
from ddim_edu.schedules import linear_schedule  # noqa: E402

STEPS = (10, 20, 50, 100, 1000)
ETAS = (0.0, 0.2, 0.5, 1.0)
ROWS = (*ETAS, SIGMA_HAT)
SPACINGS = ("uniform", "quad")
SMOKE = dict(n=24, n_last=16, steps=(2, 4, 8), bootstrap=10, subsets=10)
TAU_NOTE = {
    "uniform": "`range(0, T, T // S)`: 0, 100, …, 900 for S = 10; sampling starts at its largest entry",
    "quad": "`int()` of `linspace(0, sqrt(0.8 T), S)²` (repeats dropped: 49 timesteps for S = 50, 96 for 100, "
            "688 for 1000); it starts at t = 800",
}


def cell_n(args, S: int) -> int:
    return args.n_last if S == args.steps[-1] else args.n


def run_cell(model, schedule, x_T, spacing, row, S, seed):
    """x_0 of one cell (clamped to [-1, 1]), and the number of network evaluations per image."""
    x0 = table1_sample(model, x_T, schedule, S, row, spacing, generator=torch.Generator().manual_seed(seed + 1))
    return x0.clamp(-1, 1), len(schedule.timesteps(S, spacing))


def kid_subset(n: int) -> int:
    """KID's subset size: 100, or n/2 for sets under 200, so that the subsets differ and their spread is an error."""
    return min(100, n // 2)


def frechet(fx, fy) -> float:
    return frechet_distance(*feature_statistics(fx), *feature_statistics(fy))


def measure(features, reference, args, seed_offset: int = 0) -> dict:
    """Fréchet distance (with its bootstrap replicates) and KID of features against reference features."""
    boot = frechet_bootstrap(features, reference, replicates=args.bootstrap,
                             generator=torch.Generator().manual_seed(args.seed + 2 + seed_offset))
    kid = kernel_distance(features, reference, subsets=args.subsets, subset_size=kid_subset(len(features)),
                          generator=torch.Generator().manual_seed(args.seed + 3))
    return {"fd": frechet(features, reference), "fd_se": float(boot.std(ddof=1)), "boot": boot,
            "kid": kid.value, "kid_se": kid.standard_error}


def paired(a: dict, b: dict) -> tuple[float, float]:
    """(FD of a − FD of b, its paired bootstrap standard error)."""
    return paired_difference(a["fd"], a["boot"], b["fd"], b["boot"])


# --- the findings, computed ---------------------------------------------------------------------


def verdict(diff: float, se: float) -> str:
    """How a difference compares with twice its standard error."""
    return "separated" if abs(diff) > 2 * se else "within 2 SE"


def findings(res, args) -> list[str]:
    small, middle, last = args.steps[:2], args.steps[1:-1], args.steps[-1]
    lines = ["## The paper's findings, here", ""]
    # 1. η = 0 best at small S
    parts, holds = [], []
    for spacing in args.spacings:
        for S in small:
            cells = {row: res[spacing, row, S] for row in ROWS}
            ranked = sorted(ROWS, key=lambda r: cells[r]["fd"])
            other = ranked[0] if ranked[0] != 0.0 else ranked[1]
            d, se = paired(cells[0.0], cells[other])
            holds.append(ranked[0] == 0.0 and d < -2 * se)
            parts.append(f"{spacing} S = {S}: η = 0 {cells[0.0]['fd']:.2f}, rank {ranked.index(0.0) + 1} of {len(ROWS)}; "
                         f"{'next' if ranked[0] == 0.0 else 'best'} {table1_row_label(other)} {cells[other]['fd']:.2f}, "
                         f"difference {d:+.2f} ± {se:.2f} ({verdict(d, se)}); KID η = 0 {cells[0.0]['kid']:.2f} ± "
                         f"{cells[0.0]['kid_se']:.2f} vs {cells[other]['kid']:.2f} ± {cells[other]['kid_se']:.2f}")
    lines.append(f"- **η = 0 is best at small S** (paper: S = 10, FID 13.36 against 14.04–41.07 for the other η). "
                 f"Here it {'holds' if all(holds) else 'holds in ' + str(sum(holds)) + ' of ' + str(len(holds))} "
                 "(lowest Fréchet distance, ahead of the next row by more than 2 paired SE): " + "; ".join(parts) + ".")
    # 2. σ̂ catastrophic at small S
    parts, worst = [], []
    for spacing in args.spacings:
        for S in small:
            cells = {row: res[spacing, row, S] for row in ROWS}
            d, se = paired(cells[SIGMA_HAT], cells[0.0])
            ranked = sorted(ROWS, key=lambda r: cells[r]["fd"])
            worst.append(ranked[-1] == SIGMA_HAT and d > 2 * se)
            parts.append(f"{spacing} S = {S}: σ̂ {cells[SIGMA_HAT]['fd']:.2f} = {cells[SIGMA_HAT]['fd'] / cells[0.0]['fd']:.1f}× "
                         f"η = 0 ({d:+.2f} ± {se:.2f}), rank {ranked.index(SIGMA_HAT) + 1} of {len(ROWS)}; KID "
                         f"{cells[SIGMA_HAT]['kid']:.2f} ± {cells[SIGMA_HAT]['kid_se']:.2f} vs η = 0 {cells[0.0]['kid']:.2f}")
    paper = TABLE1_FID[SIGMA_HAT]
    lines.append(f"- **σ̂ is catastrophic at small S** (paper: FID {paper[10]:.2f} at S = 10, "
                 f"{paper[10] / TABLE1_FID[0.0][10]:.1f}× η = 0; {paper[20]:.2f} at S = 20, "
                 f"{paper[20] / TABLE1_FID[0.0][20]:.1f}×). Here σ̂ is the worst row, by more than 2 paired SE, in "
                 f"{sum(worst)} of {len(worst)} cells: " + "; ".join(parts) + ".")
    # 3. DDIM at 20–100 steps close to 1000-step DDPM, at the last column's n
    parts, close = [], []
    for spacing in args.spacings:
        ddpm = res[spacing, 1.0, last, "at_last"]
        for S in middle:
            ddim = res[spacing, 0.0, S, "at_last"]
            d, se = paired(ddim, ddpm)
            close.append(abs(d) <= 2 * se or d < 0)
            parts.append(f"{spacing} S = {S}: {ddim['fd']:.2f} vs {ddpm['fd']:.2f}, {d:+.2f} ± {se:.2f} ({verdict(d, se)}; "
                         f"KID {ddim['kid']:.2f} ± {ddim['kid_se']:.2f} vs {ddpm['kid']:.2f} ± {ddpm['kid_se']:.2f})")
    p0 = TABLE1_FID[0.0]
    lines.append(f"- **DDIM (η = 0) at S = {', '.join(map(str, middle))} is close to DDPM (η = 1) at S = {last}** "
                 f"(paper: {', '.join(f'{p0[S]:.2f}' for S in (20, 50, 100))} against {TABLE1_FID[1.0][1000]:.2f}). "
                 f"Compared on the first {args.n_last} samples of each cell (the S = {last} column's n, same x_T, "
                 f"Fréchet distance η = 0 − η = 1 with its paired SE): DDIM is within 2 SE of DDPM or better in "
                 f"{sum(close)} of {len(close)} cells: " + "; ".join(parts) + ".")
    return lines + [""]


# --- the report ---------------------------------------------------------------------------------


def table(res, floors, spacing, args, key: str) -> list[str]:
    """One metric on one τ: a column per S, then S = the largest middle one again on the last column's x_T."""
    mid, last = args.steps[-2], args.steps[-1]
    columns = [(S, (S,), f"S = {S} (n = {cell_n(args, S)})") for S in args.steps]
    columns.append((last, (mid, "at_last"), f"S = {mid} on the S = {last} column's x_T (n = {args.n_last})"))
    lines = ["| | " + " | ".join(c[2] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in ROWS:
        cells = []
        for _, cell_key, _ in columns:
            r = res[(spacing, row, *cell_key[:1], *cell_key[1:])]
            b = min(res[(spacing, other, *cell_key[:1], *cell_key[1:])][key] for other in ROWS)
            text = f"{r[key]:.2f} ± {r[key + '_se']:.2f}"
            cells.append(f"**{text}**" if r[key] == b else text)
        lines.append(f"| {table1_row_label(row)} | " + " | ".join(cells) + " |")
    lines.append("| floor: two real sets | " + " | ".join(f"{floors[S][key]:.2f} ± {floors[S][key + '_se']:.2f}"
                                                          for S, _, _ in columns) + " |")
    return lines


def sample_set_note(res, args) -> list[str]:
    """How much the draw of the samples moves the distances, against the standard errors (computed)."""
    mid, last = args.steps[-2], args.steps[-1]
    parts = []
    for spacing in args.spacings:
        at_last, first, full = res[spacing, 0.0, last], res[spacing, 0.0, mid, "at_last"], res[spacing, 0.0, mid]
        move = abs(full["kid"] - first["kid"]) / math.hypot(full["kid_se"], first["kid_se"])
        parts.append(f"{spacing} τ, η = 0: S = {last} gives Fréchet distance {at_last['fd']:.2f}, KID {at_last['kid']:.2f}; "
                     f"S = {mid} on the same {args.n_last} x_T {first['fd']:.2f} and {first['kid']:.2f}; S = {mid} on all "
                     f"{args.n} x_T {full['fd']:.2f} and {full['kid']:.2f} (KID moved by {move:.1f} times the two "
                     "standard errors combined)")
    return [(f"**Comparing columns.** The S = {last} column has n = {args.n_last} samples, from the first {args.n_last} "
             f"x_T, against the first {args.n_last} reference digits; the last column samples the same x_T at S = {mid}: "
             + "; ".join(parts) + ". KID's standard error covers only its random subsets, not the draw of the samples "
             "and of the reference set; the bootstrap standard error of the Fréchet distance covers both draws. The "
             "findings below compare cells on the same x_T, with paired standard errors."), ""]


def markdown(res, floors, args, threads, seconds, sampling_seconds, evals) -> list[str]:
    n_images = sum(cell_n(args, S) for S in args.steps) * len(ROWS) * len(args.spacings)
    lines = [
        "# Table 1 on real images: the η-family and σ̂ on 8×8 digits" + (" — SMOKE RUN (meaningless numbers)" if args.smoke else ""),
        "",
        (f"Written by `benchmarks/digits_table1.py` in {seconds / 60:.1f} min ({sampling_seconds / 60:.1f} min sampling "
         f"{n_images} images) on {platform.machine()} with {threads} torch thread{'s' if threads > 1 else ''}, "
         f"torch {torch.__version__}; figures `digits_table1.png`, `digits_table1_samples.png`."),
        "",
        "## Protocol",
        "",
        ("- Model: `load_unet(\"digits\")`, the shipped 1.0M-parameter UNet (EMA weights) of scikit-learn's 8×8 digits in "
         "[-1, 1], trained on the train split (1,442 images) with L_1 on DDPM's linear schedule, T = 1000; float32."),
        (f"- Samples: n = {args.n} per cell for S < {args.steps[-1]}, n = {args.n_last} for S = {args.steps[-1]}; "
         f"x_T: the first n of one draw seeded with {args.seed}, the same for every cell of a column (and the "
         f"S = {args.steps[-1]} column's x_T are the first {args.n_last} of the others'); the stochastic rows draw "
         f"their noise from a generator seeded with {args.seed + 1}. Samples are clamped to [-1, 1] before the metric."),
        ("- Rows: Eq 12 with σ(η) of Eq 16 (no clipping); σ̂: DDPM ancestral steps on τ with noise std "
         "sqrt(1 − ᾱ_τi/ᾱ_τi−1) and the x_0 prediction clipped to [-1, 1], as the paper's code "
         "(`sample(..., method=\"sigma_hat\")`)."),
        "- τ: " + "; ".join(f"`{s}` {TAU_NOTE[s]}" for s in args.spacings) + ". Network evaluations per image: "
        + "; ".join(f"{s}: " + ", ".join(f"S = {S}: {evals[s, S]}" for S in args.steps) for s in args.spacings) + ".",
        ("- Metric (`ddim_edu.evaluation.digits`): in the 64 penultimate features of the digits classifier, against "
         "the first of the two sets of `disjoint_digits(n, seed=0)` (n random digits of all 1,797). "
         f"**Fréchet distance²** ± its bootstrap standard error ({args.bootstrap} replicates resampling both sets, "
         "`frechet_bootstrap`); **KID** (unbiased MMD², cubic kernel, "
         f"{args.subsets} subsets of min(100, n/2)) ± its standard error, which covers the subset sampling only. "
         "The floor row: the reference set against the second, disjoint set of n real digits (`digits_floor`), what a "
         "perfect generator would score at that n. The Fréchet distance is biased upward by O(d/n), so compare "
         f"values within a column, and the S = {args.steps[-1]} column only with its own floor; KID is unbiased. "
         "These are not FID values and cannot be compared with the paper's."),
        ("- Standard errors of differences: the rows of a column share x_T and the reference set, and their bootstrap "
         "replicates resample the same rows, so a difference between two rows has a paired standard error (the std of "
         "the difference of the replicates), smaller than either cell's own; the findings below use it."),
        "",
    ]
    for spacing in args.spacings:
        lines += [f"## `{spacing}` τ", "", "Fréchet distance² in the classifier's features (lower is better; best "
                  "row of each column in bold), ± bootstrap standard error:", ""]
        lines += table(res, floors, spacing, args, "fd")
        lines += ["", "KID (unbiased MMD², can be negative), ± its standard error over subsets:", ""]
        lines += table(res, floors, spacing, args, "kid")
        lines.append("")
    lines += sample_set_note(res, args)
    lines += findings(res, args)
    lines += ["## The paper's Table 1 (a different metric on a different data set)", "",
              "FID of 50,000 samples against CIFAR-10 (32×32 RGB), Inception features, the published DDPM model, "
              "`quad` τ (Song et al. 2021, Table 1). Only the ordering of rows and columns is comparable with the "
              "tables above, not the values.", "",
              "| CIFAR-10 FID | " + " | ".join(f"S = {S}" for S in STEPS) + " |", "|---" * (len(STEPS) + 1) + "|"]
    for row in ROWS:
        lines.append(f"| {table1_row_label(row)} | " + " | ".join(f"{TABLE1_FID[row][S]:.2f}" for S in STEPS) + " |")
    lines += ["", "![Table 1 on digits](digits_table1.png)", "", "![samples at the smallest S](digits_table1_samples.png)", ""]
    return lines


def takeaway(res, args) -> str:
    """One line from the smallest S: the best and the worst row on each τ, with their Fréchet distances."""
    S = args.steps[0]
    parts = []
    for spacing in args.spacings:
        c = {row: res[spacing, row, S]["fd"] for row in ROWS}
        ranked = sorted(ROWS, key=c.get)
        parts.append(f"{spacing} τ best {table1_row_label(ranked[0])} ({c[ranked[0]]:.2f}), "
                     f"worst {table1_row_label(ranked[-1])} ({c[ranked[-1]]:.2f})")
    return f"At S = {S}, Fréchet distance: " + "; ".join(parts)


def plot(res, floors, args, path: Path):
    fig, axes = plt.subplots(2, len(args.spacings), figsize=(6.2 * len(args.spacings), 8.4), squeeze=False)
    colours = dict(zip(ROWS, ("tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple")))
    for j, spacing in enumerate(args.spacings):
        for i, (key, label) in enumerate((("fd", "Fréchet distance² (classifier features)"), ("kid", "KID (unbiased MMD²)"))):
            ax = axes[i][j]
            for k, row in enumerate(ROWS):
                xs = [S * (1 + 0.04 * (k - 2)) for S in args.steps]  # a small offset so error bars do not overlap
                ax.errorbar(xs, [res[spacing, row, S][key] for S in args.steps],
                            yerr=[res[spacing, row, S][key + "_se"] for S in args.steps], fmt="o-", ms=4, capsize=3,
                            color=colours[row], label=table1_row_label(row))
                at_last = res[spacing, row, args.steps[-2], "at_last"]
                ax.errorbar([args.steps[-1] * (1.3 + 0.04 * (k - 2))], [at_last[key]], yerr=[at_last[key + "_se"]], fmt="o", mfc="white", ms=6,
                            capsize=3, color=colours[row],
                            label=f"hollow: S = {args.steps[-2]} on the S = {args.steps[-1]} column's {args.n_last} x_T"
                            if k == 0 else None)
            lo = [floors[S][key] - floors[S][key + "_se"] for S in args.steps]
            hi = [floors[S][key] + floors[S][key + "_se"] for S in args.steps]
            ax.fill_between(args.steps, lo, hi, color="0.6", alpha=0.35, label="floor: two sets of n real digits (± SE)")
            ax.plot(args.steps, [floors[S][key] for S in args.steps], "--", color="0.35", lw=1)
            ax.set_xscale("log")
            if key == "fd":
                ax.set_yscale("log")
            ax.set_xticks(args.steps, [str(S) for S in args.steps])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("number of sampling steps S")
            ax.set_ylabel(label)
            ax.set_title(f"`{spacing}` τ: {label.split(' (')[0]}", fontsize=10)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle("Table 1 on 8×8 digits (n = "
                 f"{args.n}, n = {args.n_last} at S = {args.steps[-1]}; error bars ± 1 SE)\n{takeaway(res, args)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(images, res, args, path: Path, count: int = 16):
    """The first ``count`` samples of every row at the smallest S, one panel per τ."""
    S = args.steps[0]
    fig, axes = plt.subplots(1, len(args.spacings), figsize=(6.4 * len(args.spacings), 3.0), squeeze=False)
    for ax, spacing in zip(axes[0], args.spacings):
        grid = make_grid(torch.cat([images[spacing, row][:count] for row in ROWS]), nrow=count, padding=1)
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255)
        cell = grid.shape[0] / len(ROWS)
        ax.set_yticks([cell * (k + 0.5) for k in range(len(ROWS))], [table1_row_label(r) for r in ROWS])
        ax.set_xticks([])
        ax.set_xlabel(f"the first {count} samples; each column starts from the same x_T in every row")
        ax.set_title(f"`{spacing}` τ, S = {S}", fontsize=10)
    fig.suptitle(f"Digits sampled with S = {S} steps\n{takeaway(res, args)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("--n", type=int, default=800, help="samples per cell for S below the largest (default 800; at most 898)")
    parser.add_argument("--n-last", type=int, default=200, help="samples per cell for the largest S (default 200)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="the S columns (default 10 20 50 100 1000)")
    parser.add_argument("--spacings", nargs="+", default=list(SPACINGS), choices=SPACINGS)
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of the Fréchet distance (default 200)")
    parser.add_argument("--subsets", type=int, default=100, help="KID's subsets (default 100)")
    args = parse(parser, argv, SMOKE, "n = 24 (16 at the largest S), S = 2, 4, 8")
    args.steps = sorted(args.steps)
    if len(args.steps) < 3:
        parser.error("--steps needs at least 3 columns (small S, middle, largest)")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    start = time.perf_counter()
    model, schedule = load_unet("digits"), linear_schedule()
    threads = args.threads
    torch.set_num_threads(threads)
    threadpool_limits(limits=1, user_api="blas")  # the metric's small linear algebra: one BLAS thread on the shared cores

    x_T = torch.randn(max(args.n, args.n_last), 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    reference, _ = disjoint_digits(args.n, seed=args.seed)
    ref_features = {n: digits_features(reference[:n]) for n in {args.n, args.n_last}}
    floors = {}
    for S in args.steps:
        n = cell_n(args, S)
        f = digits_floor(n, seed=args.seed, subsets=args.subsets, subset_size=kid_subset(n), bootstrap=args.bootstrap)
        floors[S] = {"fd": f.frechet, "fd_se": f.frechet_standard_error, "kid": f.kernel, "kid_se": f.kernel_standard_error}

    res, evals, images = {}, {}, {}
    sampling = 0.0
    for spacing in args.spacings:
        for row in ROWS:
            for S in args.steps:
                n = cell_n(args, S)
                t0 = time.perf_counter()
                x0, evals[spacing, S] = run_cell(model, schedule, x_T[:n], spacing, row, S, args.seed)
                sampling += time.perf_counter() - t0
                features = digits_features(x0)
                res[spacing, row, S] = measure(features, ref_features[n], args)
                if S != args.steps[-1]:  # the same cell on the largest S's n, for comparisons across columns
                    res[spacing, row, S, "at_last"] = measure(features[:args.n_last], ref_features[args.n_last], args)
                else:
                    res[spacing, row, S, "at_last"] = res[spacing, row, S]
                if S == args.steps[0]:
                    images[spacing, row] = x0
                r = res[spacing, row, S]
                print(f"{spacing} {table1_row_label(row)} S = {S} (n = {n}): FD {r['fd']:.2f} ± {r['fd_se']:.2f}, "
                      f"KID {r['kid']:.2f} ± {r['kid_se']:.2f}  [{time.perf_counter() - t0:.1f} s]", flush=True)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "digits_table1.md"
    lines = markdown(res, floors, args, threads, seconds, sampling, evals)
    md.write_text("\n".join(lines) + "\n")
    plot(res, floors, args, args.out / "digits_table1.png")
    plot_samples(images, res, args, args.out / "digits_table1_samples.png")
    print("\n".join(lines))
    print(f"wrote {md}, digits_table1.png and digits_table1_samples.png in {time.perf_counter() - start:.0f} s")
    return md


if __name__ == "__main__":
    main()
