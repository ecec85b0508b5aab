"""The toy-data demo: train an ε-MLP on a 2-D set, sample with DDPM and DDIM, write the toy Table 1.

    python -m ddim_edu.demo [--dataset swiss_roll] [--out outputs/demo] [--fast] [--threads N]

Trains :class:`~ddim_edu.toy.nets.MLPEps` with L_1 on fresh draws of the data set, then samples the
same x_T with Eq 12 over S ∈ {10, 20, 50, 100, 1000} × η ∈ {0, 0.2, 0.5, 1} and the σ̂ variant
(the grid of the paper's Table 1; η = 1 with S = 1000 is DDPM). Quality is measured against the
frozen held-out sample in ``toy_data/`` (lower is better) by the RBF MMD² (the headline: it sees
fine structure) and the energy distance (coarser: it can rate a blurred cloud well); the
"two data samples" line is the distance between two independent data samples of the same size,
the floor that sampling noise allows.
Writes ``samples.png``, ``table1_toy.png``, ``table1_toy.md`` and ``table1_toy.csv``.
All of it is small work, run on one thread unless ``--threads``, ``OMP_NUM_THREADS`` or
``torch.set_num_threads`` says otherwise (:mod:`ddim_edu.utils.threads`: more threads gain little
here on idle cores and can be many times slower on busy ones).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .evaluation.metrics import energy_distance, mmd_rbf
from .paper import SIGMA_HAT, table1_row_label
from .schedules import MODEL_FREE_SPACINGS, linear_schedule
from .solvers import sample
from .toy.datasets import DATASETS, load_frozen
from .toy.nets import MLPEps
from .training import TrainConfig, train_eps_model
from .utils.threads import choose_threads, intra_op_threads

__all__ = ["ETAS", "STEPS", "animate_trajectories", "finding", "main", "plot_samples", "plot_table", "sample_grid",
           "write_tables"]

STEPS = (10, 20, 50, 100, 1000)
ETAS = (0.0, 0.2, 0.5, 1.0)


def sample_grid(model, x_T, schedule, steps, etas, spacing, seed):
    """{(row, S): x_0} for every η in ``etas`` and the σ̂ row, all from the same x_T."""
    out = {}
    for S in steps:
        tau = schedule.timesteps(S, spacing)
        for eta in etas:
            out[eta, S] = sample(model, x_T, schedule, tau, eta=eta, generator=torch.Generator().manual_seed(seed))
        # The reference code clips x̂_0 to [-1, 1] for images; toy data spans about [-2, 2], so no clipping here.
        out[SIGMA_HAT, S] = sample(model, x_T, schedule, tau, method="sigma_hat", clip_x0=math.inf,
                                   generator=torch.Generator().manual_seed(seed))
    return out


def write_tables(results, steps, rows, out: Path) -> str:
    """The toy Table 1, one block per metric, as CSV and Markdown; returns the Markdown.

    ``results`` maps a metric name to (scores {(row, S): value}, floor).
    """
    with open(out / "table1_toy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "row", *[f"S={S}" for S in steps]])
        for metric, (scores, floor) in results.items():
            for row in rows:
                writer.writerow([metric, table1_row_label(row), *[f"{scores[row, S]:.6g}" for S in steps]])
            writer.writerow([metric, "data floor", *[f"{floor:.6g}"] * len(steps)])
    blocks = []
    for metric, (scores, floor) in results.items():
        best = {S: min(rows, key=lambda r: scores[r, S]) for S in steps}
        lines = [f"| {metric} (×10³, lower is better) | " + " | ".join(f"S = {S}" for S in steps) + " |",
                 "|---" * (len(steps) + 1) + "|"]
        for row in rows:
            cells = [(f"**{1e3 * scores[row, S]:.2f}**" if best[S] == row else f"{1e3 * scores[row, S]:.2f}")
                     for S in steps]
            lines.append(f"| {table1_row_label(row)} | " + " | ".join(cells) + " |")
        lines.append("| two data samples | " + " | ".join(f"{1e3 * floor:.2f}" for _ in steps) + " |")
        blocks.append("\n".join(lines) + "\n")
    markdown = "\n".join(blocks)
    (out / "table1_toy.md").write_text(markdown)
    return markdown


def animate_trajectories(paths, tau, heldout, path: Path, *, n_trails=4, hold=5, fps=8, dpi=72) -> None:
    """Write a GIF of 2-D sampling trajectories side by side: ``paths`` maps a label to a trajectory [S+1, B, 2]
    (``sample(..., return_trajectory=True)`` along ``tau``); frame k shows the states after k steps, with
    ``n_trails`` paths traced and the held-out data behind, and the last frame is held ``hold`` frames more.
    Needs matplotlib's Pillow writer."""
    from matplotlib import animation

    fig, axes = plt.subplots(1, len(paths), figsize=(3.4 * len(paths), 3.9), sharex=True, sharey=True)
    drawn = []
    for ax, (label, trajectory) in zip(axes, paths.items()):
        ax.scatter(heldout[:, 0], heldout[:, 1], s=1, color="0.85", label="held-out data")
        dots = ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=2, color="C0", label="samples")
        trails = [ax.plot([], [], lw=1.1, alpha=0.8, color="C3")[0] for _ in range(n_trails)]
        trails[0].set_label(f"{n_trails} paths")
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=label, xlabel="$x_1$")
        drawn.append((trajectory, dots, trails))
    axes[0].set_ylabel("$x_2$")
    axes[0].legend(loc="lower left", fontsize=7, markerscale=4)
    captions = [f"x_T, fed in at index i = {int(tau[-1])}"] + [
        f"after step {k} of {len(tau)}: " + (f"at index i = {int(tau[-1 - k])}" if k < len(tau) else "x_0")
        for k in range(1, len(tau) + 1)]
    caption = fig.suptitle(captions[0], fontsize=10)
    fig.tight_layout()

    def draw(k):
        for trajectory, dots, trails in drawn:
            dots.set_offsets(trajectory[k].clamp(-3, 3).numpy())
            for j, line in enumerate(trails):
                line.set_data(trajectory[: k + 1, j, 0].numpy(), trajectory[: k + 1, j, 1].numpy())
        caption.set_text(captions[k])

    frames = [*range(len(tau) + 1), *[len(tau)] * hold]   # hold the last frame a little
    animation.FuncAnimation(fig, draw, frames=frames).save(path, writer=animation.PillowWriter(fps=fps), dpi=dpi)
    plt.close(fig)


def plot_samples(samples, heldout, steps, rows, path: Path, title: str):
    fig, axes = plt.subplots(len(rows), len(steps) + 1, figsize=(2.2 * (len(steps) + 1), 2.2 * len(rows)),
                             sharex=True, sharey=True)
    for r, row in enumerate(rows):
        for c, S in enumerate(steps):
            ax = axes[r, c]
            pts = samples[row, S].float().clamp(-3, 3)
            ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.5, color="C0" if row != SIGMA_HAT else "C4")
            if r == 0:
                ax.set_title(f"S = {S}" + (" (DDPM at η = 1)" if S == 1000 else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(table1_row_label(row))
        axes[r, -1].scatter(heldout[:, 0], heldout[:, 1], s=0.5, alpha=0.5, color="k")
        if r == 0:
            axes[r, -1].set_title("held-out data", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    fig.suptitle(title)
    fig.supxlabel("$x_1$ (each panel: the two data coordinates)", fontsize=9)
    fig.supylabel("$x_2$", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_table(scores, floor, steps, rows, path: Path, title: str, metric: str):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in rows:
        ax.plot(steps, [scores[row, S] for S in steps], "o-" if row != SIGMA_HAT else "s--", label=table1_row_label(row),
                color="C4" if row == SIGMA_HAT else None)
    ax.axhline(floor, color="k", ls=":", label="two data samples")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of sampling steps S")
    ax.set_ylabel(f"{metric} to held-out data")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finding(scores, steps) -> str:
    """Whether η = 0 is best at the smallest S (the paper's qualitative finding), said plainly."""
    S = steps[0]
    order = sorted(ETAS, key=lambda e: scores[e, S])
    if order[0] == 0.0:
        text = f"As in the paper, η = 0 (DDIM) gives the best samples at S = {S} among η ∈ {list(ETAS)}"
    else:
        text = (f"Unlike the paper, η = 0 is not the best at S = {S} here: the order is "
                + ", ".join(f"η = {e:g}" for e in order))
    hat = "worse" if scores[SIGMA_HAT, S] > scores[0.0, S] else "better"
    return text + f"; σ̂ is {hat} than η = 0 there ({1e3 * scores[SIGMA_HAT, S]:.2f} vs {1e3 * scores[0.0, S]:.2f} ×10³)."


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="swiss_roll", choices=sorted(DATASETS))
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--train-steps", type=int, default=8000)
    parser.add_argument("--n-samples", type=int, default=2000, help="samples per cell (and held-out points used)")
    parser.add_argument("--spacing", default="uniform", choices=MODEL_FREE_SPACINGS,
                        help="sub-sequence τ; 'uniform' is the paper's (starts at t = T - T/S)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a few seconds: tiny training, S ≤ 20 (for tests)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: 1, unless OMP_NUM_THREADS or torch.set_num_threads chose)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    with intra_op_threads(choose_threads(args.threads, small=True)):
        return _run(args)


def _run(args) -> Path:
    """The demo itself, on the threads :func:`main` chose."""
    steps, train_steps = ((10, 20), 200) if args.fast else (STEPS, args.train_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # the network's initial weights
    schedule = linear_schedule()
    gen = torch.Generator().manual_seed(args.seed)
    train = DATASETS[args.dataset](50_000, generator=gen)
    heldout = load_frozen(args.dataset)[: args.n_samples]
    n = len(heldout)

    start = time.perf_counter()
    threads = torch.get_num_threads()
    result = train_eps_model(MLPEps(dim=2), train, schedule, TrainConfig.toy(steps=train_steps, seed=args.seed),
                             threads=threads)
    train_seconds = time.perf_counter() - start
    print(f"trained {train_steps} steps in {train_seconds:.0f} s on {threads} thread{'s' * (threads != 1)}; "
          f"final loss {result.losses[-100:].mean():.3f}")

    x_T = torch.randn(n, 2, generator=gen)
    rows = [*ETAS, SIGMA_HAT]
    start = time.perf_counter()
    samples = sample_grid(result.ema, x_T, schedule, steps, ETAS, args.spacing, args.seed)
    print(f"sampled {len(samples)} cells of {n} points in {time.perf_counter() - start:.0f} s")

    fresh = DATASETS[args.dataset](n, generator=gen)
    metrics = {"MMD²": mmd_rbf, "energy distance": energy_distance}
    results = {name: ({key: fn(x, heldout).item() for key, x in samples.items()}, fn(fresh, heldout).item())
               for name, fn in metrics.items()}
    title = f"{args.dataset}: DDIM (Eq 12) on '{args.spacing}' τ, MLP trained {train_steps} steps"
    table = write_tables(results, steps, rows, args.out)
    plot_samples(samples, heldout, steps, rows, args.out / "samples.png", title)
    plot_table(*results["MMD²"], steps, rows, args.out / "table1_toy.png", title, "MMD² (RBF)")
    print(f"\nToy Table 1 ({args.dataset}, distances to {n} held-out points):\n\n{table}")
    print(finding(results["MMD²"][0], steps))
    print(f"\nwrote samples.png, table1_toy.png, table1_toy.md, table1_toy.csv to {args.out.resolve()}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
