"""The samplers' own cost per step, side by side with diffusers' schedulers, as ratios from one run.

A trivial model returns a fixed ε (no arithmetic, no allocation), so a whole run's time is the
sampler's own work: its step arithmetic, the scaling into the model's coordinates, the bookkeeping.
Each row runs ours and its counterpart over the same number of steps, alternating, and keeps the
best of ``--repeats`` runs of each; the time of the bare model calls is subtracted. Rows and targets:

- ``ddim`` (Eq 12, η = 0, default checks) against ``DDIMScheduler.step``: target ≤ 0.25×;
- ``ddim`` with η = 1 against the same (most of the time is drawing the noise, which both pay);
- ``euler`` (Eq 14 in σ, which is DDIM) against our own ``ddim``: target ≤ 1.2×;
- ``dpmpp_2m`` against ``DPMSolverMultistepScheduler.step`` (DPM-Solver++(2M)): target ≤ 0.5×, aim 0.25×;
- ``unipc`` against ``UniPCMultistepScheduler.step`` (bh2): target ≤ 0.5×, aim 0.25×;
- ``pc_sigma`` against the same (no counterpart of its own; shown for its cost).

    python benchmarks/sampler_overhead.py      # prints the table, writes docs/sampler_overhead.{md,csv}
"""
from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample

PROBLEMS = {"4096 points in 2-D": (4096, 2), "64×3×32×32 images": (64, 3, 32, 32)}
ROWS = [  # (ours, η, counterpart, target ratio or None)
    ("ddim", 0.0, "DDIMScheduler", 0.25),
    ("ddim", 1.0, "DDIMScheduler", None),
    ("euler", 0.0, "ours: ddim", 1.2),
    ("dpmpp_2m", 0.0, "DPMSolverMultistepScheduler", 0.5),
    ("unipc", 0.0, "UniPCMultistepScheduler", 0.5),
    ("pc_sigma", 0.0, "UniPCMultistepScheduler", None),
]


def diffusers_scheduler(name: str):
    import diffusers

    common = {"num_train_timesteps": 1000, "beta_schedule": "linear", "timestep_spacing": "leading"}
    if name == "DDIMScheduler":
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    if name == "DPMSolverMultistepScheduler":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    return diffusers.UniPCMultistepScheduler(**common)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="steps per run (default 500)")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each variant; the best counts (default 7)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs",
                        help="folder for sampler_overhead.md and .csv (default docs/)")
    args = parser.parse_args(argv)
    for name, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    try:
        import diffusers
    except ImportError:
        parser.error("diffusers is needed for the comparison: pip install -e '.[compare]'")

    schedule = linear_schedule()
    tau = schedule.timesteps(args.steps, "leading")  # diffusers' "leading" grid, the same τ
    rows = []
    for problem, shape in PROBLEMS.items():
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        eps = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
        model = lambda x, t: eps  # noqa: E731  (a trivial model: the sampler's work is all that is timed)

        def ours(method, eta):
            return lambda: sample(model, x_T, schedule, tau, method, eta=eta, generator=torch.Generator().manual_seed(2))

        def theirs(name, eta):
            scheduler = diffusers_scheduler(name)

            def run():  # a pipeline's loop: set_timesteps (which resets the multistep state), then step
                scheduler.set_timesteps(args.steps)
                g, x = torch.Generator().manual_seed(2), x_T
                for t in scheduler.timesteps:
                    x = scheduler.step(model(x, t), t, x, **({"eta": eta, "generator": g} if name == "DDIMScheduler" else {})).prev_sample
            return run

        def model_calls():
            for t in range(args.steps):
                model(x_T, t)

        variants = {("model", 0.0): model_calls}
        for method, eta, counterpart, _ in ROWS:
            variants[(method, eta)] = ours(method, eta)
            if not counterpart.startswith("ours"):
                variants[(counterpart, eta)] = theirs(counterpart, eta)
        best = {key: float("inf") for key in variants}
        for key, fn in variants.items():
            fn()  # warm-up
        for _ in range(args.repeats):  # the variants take turns, so that a busy moment hits them alike
            for key, fn in variants.items():
                best[key] = min(best[key], timed(fn))
        per_step = {key: (t - best[("model", 0.0)]) / args.steps * 1e6 for key, t in best.items()}
        for method, eta, counterpart, target in ROWS:
            other = per_step[("ddim", 0.0)] if counterpart == "ours: ddim" else per_step[(counterpart, eta)]
            row = {"problem": problem, "ours": method, "eta": eta, "ours_us": per_step[(method, eta)],
                   "counterpart": counterpart, "counterpart_us": other, "ratio": per_step[(method, eta)] / other,
                   "target": target}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sampler_overhead.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Sampler overhead per step",
        "",
        f"Written by `python benchmarks/sampler_overhead.py`: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, float32, diffusers {diffusers.__version__}; {args.steps}-step runs on diffusers' "
        f"\"leading\" grid, best of {args.repeats}, a trivial model returning a fixed ε (its call time subtracted). "
        "Ours run with their default checks (the result is checked once; a NaN is then traced to its timestep).",
        "",
        "| problem | ours | η | ours (µs/step) | counterpart | its µs/step | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "" if r["target"] is None else f"≤ {r['target']:g}×"
        met = "" if r["target"] is None else ("yes" if r["ratio"] <= r["target"] else "no")
        lines.append(f"| {r['problem']} | `{r['ours']}` | {r['eta']:g} | {r['ours_us']:.1f} | {r['counterpart']} "
                     f"| {r['counterpart_us']:.1f} | {r['ratio']:.2f} | {target} | {met} |")
    (args.out / "sampler_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out / 'sampler_overhead.md'} and .csv")


if __name__ == "__main__":
    main()
