"""Fit the ``"calibrated"`` grid: the blend (w, t_min) per NFE that serves best on a calibration set.

The calibration set is two draws (seeds 1 and 2) of every kind of
:data:`ddim_edu.evaluation.mixture_family.KINDS`, never the seed-0 family on which
``benchmarks/ode_accuracy.py`` judges the solvers. For each problem, NFE ∈ {5, 10, 20} and method
(dpmpp_2m, unipc and pc_sigma with the extrapolated last step, each at the largest S within the
NFE), every blend ``schedule.timesteps(S, "blend", weight=w, t_min=t_min)`` of the search is run;
its error is divided by the best blend's for that problem and method, and the (w, t_min) of least
geometric mean of that ratio is chosen. The chosen values are what ``CALIBRATED_GRID`` in
``ddim_edu/schedules.py`` freezes (anchored at dpmpp_2m's S = NFE); this script prints them and the
table of the best candidates, and writes them to docs/calibrated_grid.md.

    python benchmarks/calibrate_grid.py            # about 10 min on one core
"""
from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

from ddim_edu.evaluation.mixture_family import family, reference_x0
from ddim_edu.schedules import CALIBRATED_GRID, linear_schedule
from ode_accuracy import rmse, sample_row, steps_for
from ode_family import FAMILY_TARGETS, geometric_mean

SEEDS = (1, 2)
METHODS = ("dpmpp_2m", "unipc", "pc_sigma+x0")
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
T_MINS = (0.0, 1.0, 3.0, 6.0, 10.0, 16.0, 25.0)


def errors(schedule, n_points, seeds, members=None):
    """{(seed, member, nfe, method): {(w, t_min): RMSE}} over the search."""
    out = defaultdict(dict)
    for seed in seeds:
        for name, mixture in family(seed).items():
            if members is not None and name not in members:
                continue
            x_T = torch.randn(n_points, mixture.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            x0_ref, _ = reference_x0(mixture, schedule, x_T)
            model = mixture.eps_model(schedule)
            for nfe in FAMILY_TARGETS:
                for method in METHODS:
                    S = steps_for(method, nfe)
                    for t_min in T_MINS:
                        for w in WEIGHTS:
                            tau = schedule.timesteps(S, "blend", weight=w, t_min=t_min)
                            out[seed, name, nfe, method][w, t_min] = rmse(sample_row(model, x_T, schedule, tau, method), x0_ref)
            print(f"seed {seed}, {name}", flush=True)
    return out


def choose(errs, nfe):
    """[(geometric mean, worst, (w, t_min))] over the search, best first: each run's RMSE over its problem's best blend."""
    ratios = defaultdict(list)
    for (_, _, n, _), by_blend in errs.items():
        if n == nfe:
            best = min(by_blend.values())
            for blend, value in by_blend.items():
                ratios[blend].append(value / best)
    return sorted((geometric_mean(r), max(r), blend) for blend, r in ratios.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=128, help="x_T per problem (default 128)")
    parser.add_argument("--smoke", action="store_true", help="two members of one seed, 16 points: checks that it runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs",
                        help="folder for calibrated_grid.md (default docs/)")
    args = parser.parse_args(argv)
    if args.points < 1:
        parser.error(f"--points must be at least 1, got {args.points}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    errs = errors(linear_schedule(), 16 if args.smoke else args.points, SEEDS[:1] if args.smoke else SEEDS,
                  members=("few", "8d") if args.smoke else None)
    chosen, lines = [], []
    for nfe in FAMILY_TARGETS:
        ranked = choose(errs, nfe)
        lines += ["", f"NFE ≤ {nfe}: the best blends, geometric mean (and worst) of RMSE / the problem's best blend", "",
                  "| w | t_min | geometric mean | worst |", "|---|---|---|---|"]
        lines += [f"| {w:.2f} | {t_min:g} | {gm:.3f} | {worst:.2f} |" for gm, worst, (w, t_min) in ranked[:5]]
        chosen.append((nfe, *ranked[0][2]))
    seconds = time.perf_counter() - start
    head = ["# The calibrated grid" + (" (SMOKE RUN: two members, 16 points)" if args.smoke else ""), "",
            f"Written by `python benchmarks/calibrate_grid.py`: seeds {SEEDS[:1] if args.smoke else SEEDS} of the family's "
            f"kinds, methods {', '.join(METHODS)}, w ∈ {WEIGHTS}, t_min ∈ {T_MINS}; torch {torch.__version__}, "
            f"{platform.machine()}, {seconds:.0f} s.", "",
            f"Chosen (S = NFE, w, t_min): {tuple(chosen)}. Frozen in `ddim_edu/schedules.py` as `CALIBRATED_GRID`: "
            f"{CALIBRATED_GRID}" + (" (the same)." if tuple(chosen) == CALIBRATED_GRID else " (they differ).")]
    text = "\n".join(head + lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibrated_grid.md").write_text(text)
    return chosen


if __name__ == "__main__":
    main()
