"""The paper's Table 2 on toy data: reconstruction error of x_0 → x_T → x_0 (DDIM inversion) vs S.

Encodes held-out points with :func:`ddim_edu.solvers.encode` (Eq 14 integrated upwards) and decodes
them with :func:`ddim_edu.solvers.sample` on the same timesteps, for DDIM (Euler on Eq 14) and two
higher-order methods, with the exact ε of a Gaussian mixture (so the error is the solvers' alone).
Euler and Heun are encoded both with their explicit steps upwards (``inversion="explicit"``) and by
exact inversion (``inversion="exact"``: each upward step solves the decoder's step backwards by
fixed-point iteration). Reports the per-dimension MSE, as the paper does, and the encode's model
evaluations (NFE) per S, the cost of exact inversion.

    python benchmarks/reconstruction.py      # writes docs/reconstruction.md and docs/reconstruction.png
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ddim_edu.mixture import GaussianMixture  # noqa: E402
from ddim_edu.paper import TABLE2_RECONSTRUCTION_MSE  # noqa: E402
from ddim_edu.schedules import linear_schedule  # noqa: E402
from ddim_edu.evaluation.inversion import round_trip  # noqa: E402
from ddim_edu.solvers import METHODS  # noqa: E402

STEPS = (10, 20, 50, 100, 200, 500, 1000)


def table(corner: str, labels, values: dict, fmt: str) -> list[str]:
    """Markdown rows: a header of the S columns, then one row per label of values[label, S] ("none inverted": None)."""
    rows = ["| " + corner + " | " + " | ".join(str(S) for S in STEPS) + " |", "|---" * (len(STEPS) + 1) + "|"]
    for label in labels:
        rows.append(f"| {label} | " + " | ".join("none inverted" if values[label, S] is None else format(values[label, S], fmt)
                                                 for S in STEPS) + " |")
    return rows

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--spacing", default="uniform")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    schedule = linear_schedule()
    data = GaussianMixture.ring(K=8, radius=1.0, std=0.05)
    model = data.eps_model(schedule)
    x0 = data.sample(args.n, generator=torch.Generator().manual_seed(0))
    methods = {  # label: (method, inversion)
        "DDIM (euler)": ("euler", "explicit"),
        "DDIM (euler), exact inversion": ("euler", "exact"),
        "heun": ("heun", "explicit"),
        "heun, exact inversion": ("heun", "exact"),
        "dpmpp_2m": ("dpmpp_2m", "explicit"),
    }
    mse, nfe, partial = {}, {}, []  # mse: over the points the encode inverted, None where it inverted none
    start = time.perf_counter()
    for label, (method, inversion) in methods.items():
        for S in STEPS:
            r = round_trip(model, schedule, x0, schedule.timesteps(S, args.spacing), method, inversion=inversion)
            ok = r["converged"]
            mse[label, S] = r["mse"][ok].mean().item() if ok.any() else None
            nfe[label, S] = r["nfe"]
            if not ok.all():
                partial.append(f"{label}, S = {S}: {int(ok.sum())} of {len(ok)} points inverted ({r['failure']})")
    seconds = time.perf_counter() - start

    lines = [
        "# Reconstruction x_0 → x_T → x_0 on toy data (the paper's Table 2)",
        "",
        f"8 Gaussians on the unit circle (std 0.05), exact ε, {args.n} points, '{args.spacing}' τ, "
        f"float64; per-dimension MSE. Written by `benchmarks/reconstruction.py` ({seconds:.0f} s).",
        "The paper's row is CIFAR-10 (images in [0, 1], a trained network): its trend, not its values, is comparable.",
        "",
        *table("S", methods, mse, ".2e"),
    ]
    lines.append("| paper, CIFAR-10 (DDIM) | " + " | ".join(f"{TABLE2_RECONSTRUCTION_MSE[S]:g}" for S in STEPS) + " |")
    lines += [
        "",
        "Model evaluations (NFE) of the encode, each a call on the whole batch; decoding costs S (Euler),",
        "2S - 1 (Heun; its last step, to σ = 0, is an Euler step) or S (dpmpp_2m) in every row.",
        "",
        *table("encode NFE, S", methods, nfe, "d"),
        "",
        ("Encodes that inverted only some points (the MSE above is over those): " + "; ".join(partial) + "." if partial
         else "Every encode converged for every point."),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reconstruction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, (label, (method, inversion)) in enumerate(methods.items()):
        points = [(S, mse[label, S]) for S in STEPS if mse[label, S] is not None and mse[label, S] > 0]
        style = "s--" if inversion == "exact" else "o-"
        name = label if inversion == "exact" else f"{label} (order {METHODS[method].order})"
        ax.loglog([S for S, _ in points], [v for _, v in points], style, c=f"C{k}", label=name)
    ax.loglog(STEPS, [TABLE2_RECONSTRUCTION_MSE[S] for S in STEPS], "k:", label="paper, CIFAR-10 (DDIM)")
    ax.set_xlabel("number of steps S (encode and decode each)")
    ax.set_ylabel("per-dimension MSE of x_0 → x_T → x_0")
    ax.set_title("Reconstruction error vs S (toy Table 2)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "reconstruction.png", dpi=110)
    print(f"wrote {args.out / 'reconstruction.md'} and reconstruction.png")


if __name__ == "__main__":
    main()
