"""The sampler's own cost per step, model excluded, side by side with diffusers' DDIMScheduler.

A trivial model (ε = 0.1·x) isolates the sampler: each variant runs a whole 1000-step DDIM
trajectory, the same loop with only the model calls is subtracted, and the remainder per step
is the sampler's overhead. Reported as µs per step and as the ratio ours / diffusers.

    python benchmarks/sampler_overhead.py            # writes benchmarks/results/sampler_overhead.{md,csv}
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample

PROBLEMS = {"4096 points in 2-D": (4096, 2), "64×3×32×32 images": (64, 3, 32, 32)}


def model(x, t):
    return 0.1 * x


def run_ours(x, sched, tau, eta, check_finite=True):
    sample(model, x, sched, tau, eta=eta, generator=torch.Generator().manual_seed(0), check_finite=check_finite)


def run_diffusers(x, scheduler, eta):
    gen = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, eta=eta, generator=gen).prev_sample


def run_model_only(x, steps):
    for _ in range(steps):
        model(x, None)


def run_two_op(x, steps):
    for _ in range(steps):
        x = torch.add(x * 0.999, model(x, None), alpha=0.001)


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    sched = linear_schedule()
    steps = 1000
    tau = sched.timesteps(steps, "uniform")
    rows = []
    try:
        import diffusers
    except ImportError:
        diffusers = None
        print("diffusers is not installed (pip install -e '.[compare]'): reporting ours only")
    for name, shape in PROBLEMS.items():
        x = torch.randn(shape)
        base, _ = best_of(lambda: run_model_only(x, steps), args.repeats)
        two_op, _ = best_of(lambda: run_two_op(x, steps), args.repeats)
        for eta in (0.0, 1.0):
            ours, _ = best_of(lambda: run_ours(x, sched, tau, eta), args.repeats)
            unchecked, _ = best_of(lambda: run_ours(x, sched, tau, eta, check_finite=False), args.repeats)
            row = {"problem": name, "eta": eta, "ours_us": (ours - base) / steps * 1e6,
                   "unchecked_us": (unchecked - base) / steps * 1e6, "two_op_us": (two_op - base) / steps * 1e6}
            if diffusers is not None:
                ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                              set_alpha_to_one=True)
                ref.set_timesteps(steps)
                theirs, _ = best_of(lambda: run_diffusers(x, ref, eta), args.repeats)
                row["diffusers_us"] = (theirs - base) / steps * 1e6
                row["ratio"] = row["ours_us"] / row["diffusers_us"]
                row["whole_run_ratio"] = ours / theirs
                row["unchecked_ratio"] = row["unchecked_us"] / row["diffusers_us"]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})

    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["problem", "eta", "ours_us", "diffusers_us", "ratio", "whole_run_ratio", "unchecked_us",
              "unchecked_ratio", "two_op_us"]
    with open(args.out / "sampler_overhead.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Sampler overhead per step (model excluded)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"float32, 1000-step runs, best of {args.repeats}; model ε = 0.1·x subtracted."
        + (f" diffusers {diffusers.__version__}." if diffusers else ""),
        "",
        "| problem | η | ours (µs/step) | diffusers DDIMScheduler.step (µs/step) | ours / diffusers "
        "| whole runs, model included | ours, check_finite=False (µs/step) | its ratio | bare two-op update (µs/step) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['eta']:g} | {r['ours_us']:.1f} | {r.get('diffusers_us', float('nan')):.1f} "
                     f"| {r.get('ratio', float('nan')):.2f} | {r.get('whole_run_ratio', float('nan')):.2f} "
                     f"| {r['unchecked_us']:.1f} | {r.get('unchecked_ratio', float('nan')):.2f} | {r['two_op_us']:.1f} |")
    (args.out / "sampler_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out / 'sampler_overhead.md'} and .csv")


if __name__ == "__main__":
    main()
