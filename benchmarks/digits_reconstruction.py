"""The paper's Table 2 and Sections 5.2–5.3 on real images: DDIM inversion, sample consistency and
interpolation with the shipped digits model.

- **Reconstruction** (Table 2): each held-out digit x_0 (355 images the model never saw) is encoded
  to x_T with :func:`ddim_edu.solvers.encode` (Eq 14 integrated upwards with Euler steps, i.e.
  DDIM run backwards; its first step, 0 → σ(τ_1), is solved as a fixed point) and decoded with
  DDIM (η = 0) on the same τ, the paper's ``uniform`` τ, which starts at t = 0. Reported: the
  per-dimension MSE with pixels in [0, 1] (the model's [-1, 1] halved), as the paper's Table 2,
  with its standard error over images, and the same after clamping the decoded digits to [-1, 1].
  Where the encode does not converge for some digits (:class:`~ddim_edu.solvers.ConvergenceError`),
  the MSE is over the digits it inverted, and how many those are is reported.
- **Exact inversion** (``inversion="exact"``, for S in ``--exact-steps``): each upward step solved so that
  DDIM's step maps it back, with the evaluations it costs and the digits it inverts. Where it does not
  converge, the report shows why it may not: for the exact ε, DDIM's step Φ from σ(τ_2) down to σ(τ_1) has a Jacobian whose
  symmetric part is at least ρ = σ(τ_1)/σ(τ_2) in every direction (so Φ is a bijection, see
  :func:`ddim_edu.solvers.encode`); the network's is measured at each digit's explicit encode.
- **Consistency** (Section 5.2): the same x_T decoded with DDIM at several S; the RMS difference
  of each to the S = 1000 decode, in [0, 1] pixels, over more x_T than the figure shows.
- **Interpolation** (Section 5.3): two held-out digits encoded (S = 100), their latents joined by
  :func:`ddim_edu.interpolation.slerp`, and every point on the path decoded.

    python benchmarks/digits_reconstruction.py   # docs/digits_reconstruction.{md,png}, digits_consistency.png, digits_interpolation.png
    python benchmarks/digits_reconstruction.py --smoke --out /tmp/t2   # seconds
"""
from __future__ import annotations

import math
import platform
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_cli import parse, parser_for  # noqa: E402
from ddim_edu.image.data import load_digits  # noqa: E402
from ddim_edu.evaluation.metrics import pixel_rms  # noqa: E402
from ddim_edu.image.grids import show_rows  # noqa: E402
from ddim_edu.image.pretrained import load_unet  # noqa: E402
from ddim_edu.interpolation import slerp  # noqa: E402
from ddim_edu.paper import TABLE2_RECONSTRUCTION_MSE  # noqa: E402
from ddim_edu.schedules import linear_schedule  # noqa: E402
from ddim_edu.evaluation.inversion import round_trip, second_step_monotonicity  # noqa: E402
from ddim_edu.solvers import encode, sample  # noqa: E402

STEPS = (10, 20, 50, 100, 200, 500, 1000)
EXACT_STEPS = (10, 20, 50, 100)
CONSISTENCY_STEPS = (10, 20, 50, 100, 1000)
PAIRS = ((0, 6), (1, 7), (3, 8))  # classes of the digits interpolated between (the first held-out digit of each)
SMOKE = dict(n=8, steps=(2, 4, 8), exact_steps=(2, 4), consistency_steps=(2, 4, 8), consistency_n=8, shown=6, interpolation_steps=4,
             weights=5)


def reconstruct(model, schedule, x0, S: int, spacing: str, inversion: str = "explicit") -> dict:
    """x_0 → x_T → x_0 on S timesteps of ``spacing`` (:func:`~ddim_edu.evaluation.inversion.round_trip`): the MSEs
    in [0, 1] pixels over the digits the encode inverted, how many those are, its evaluations and its failure."""
    start = time.perf_counter()
    r = round_trip(model, schedule, x0, schedule.timesteps(S, spacing), "euler", inversion=inversion)
    ok = r["converged"]
    out = {"seconds": time.perf_counter() - start, "encode_nfe": r["nfe"], "decode_nfe": S, "inverted": int(ok.sum()),
           "n": len(x0), "failure": r["failure"], "ok": ok, "per_image": r["mse"] / 4}  # pixels in [0, 1]: (x + 1)/2
    if not ok.any():
        return out
    for key, x in (("mse", r["x0_back"]), ("mse_clamped", r["x0_back"].clamp(-1, 1))):
        per_image = ((x - x0) / 2).pow(2).flatten(1).mean(1)[ok]
        out[key] = per_image.mean().item()
        out[key + "_se"] = (per_image.std() / math.sqrt(len(per_image))).item() if len(per_image) > 1 else math.nan
    out["x_T_std"] = r["x_T"][ok].std().item()
    return out


def inverted(r: dict) -> str:
    """' (k of n digits)' where the encode inverted only some of the digits, else ''."""
    return "" if r["inverted"] == r["n"] else f" ({r['inverted']} of {r['n']} digits)"


def monotonicity_report(model, schedule, x0, S: int, spacing: str) -> dict:
    """:func:`~ddim_edu.evaluation.inversion.second_step_monotonicity` at each digit: the smallest value, and at how
    many digits it is below ρ or below 0."""
    tau = schedule.timesteps(S, spacing)
    rho, lowest = second_step_monotonicity(model, schedule, x0, tau)
    return {"rho": rho, "min": lowest.min().item(), "below_rho": int((lowest < rho).sum()),
            "negative": int((lowest < 0).sum()), "n": len(lowest), "sigmas": tuple(schedule.sigma(tau[:2]).tolist()),
            "timesteps": tau[:2].tolist()}


def wrapped(title: str, fig) -> str:
    """``title`` with each line wrapped to the figure's width (about 13 characters an inch at font size 9)."""
    return "\n".join(textwrap.fill(part, int(fig.get_figwidth() * 13)) for part in title.split("\n"))


def parse_args(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("--n", type=int, default=355, help="held-out digits reconstructed (default all 355)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--exact-steps", type=int, nargs="+", default=list(EXACT_STEPS),
                        help="S of the rows with exact inversion (default 10 20 50 100)")
    parser.add_argument("--spacing", default="uniform", help="τ (default the paper's uniform, which starts at t = 0)")
    parser.add_argument("--consistency-steps", type=int, nargs="+", default=list(CONSISTENCY_STEPS))
    parser.add_argument("--consistency-n", type=int, default=200, help="x_T for the consistency numbers (default 200)")
    parser.add_argument("--shown", type=int, default=12, help="x_T shown in the consistency figure (default 12)")
    parser.add_argument("--interpolation-steps", type=int, default=100, help="S of the encode and decode (default 100)")
    parser.add_argument("--weights", type=int, default=9, help="points on each slerp path (default 9)")
    return parse(parser, argv, SMOKE, "8 digits, S = 2, 4, 8")


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, schedule = load_unet("digits"), linear_schedule()
    images, labels = load_digits("heldout")
    x0 = images[:args.n]

    # Table 2
    results = {}
    for S in args.steps:
        results[S] = r = reconstruct(model, schedule, x0, S, args.spacing)
        print(f"S = {S}: " + (f"encode failed: {r['failure']}" if "mse" not in r else
                              f"MSE {r['mse']:.3g} ± {r['mse_se']:.2g} (clamped {r['mse_clamped']:.3g}){inverted(r)}, "
                              f"{r['seconds']:.1f} s"), flush=True)
    exact = {}
    for S in args.exact_steps:
        exact[S] = r = reconstruct(model, schedule, x0, S, args.spacing, inversion="exact")
        print(f"S = {S}, exact: " + (f"encode failed: {r['failure']}" if "mse" not in r else
                                     f"MSE {r['mse']:.3g} ± {r['mse_se']:.2g}{inverted(r)}, {r['encode_nfe']} evaluations, "
                                     f"{r['seconds']:.1f} s"), flush=True)
    monotone = {S: monotonicity_report(model, schedule, x0, S, args.spacing) for S in args.exact_steps}
    table2_seconds = time.perf_counter() - start

    # consistency: the same x_T at several S
    t0 = time.perf_counter()
    x_T = torch.randn(args.consistency_n, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    decoded = {S: sample(model, x_T, schedule, schedule.timesteps(S, args.spacing), method="ddim")
               for S in args.consistency_steps}
    top = args.consistency_steps[-1]
    consistency = {S: pixel_rms(decoded[S], decoded[top]) for S in args.consistency_steps[:-1]}
    spread = pixel_rms(decoded[top], decoded[top][torch.roll(torch.arange(args.consistency_n), 1)])
    consistency_seconds = time.perf_counter() - t0

    # interpolation between encoded held-out digits
    t0 = time.perf_counter()
    first = {int(c): int((labels == c).nonzero()[0]) for c in labels.unique()}
    pairs = [(a, b) for a, b in PAIRS if a in first and b in first]
    a = images[[first[p[0]] for p in pairs]]
    b = images[[first[p[1]] for p in pairs]]
    tau = schedule.timesteps(args.interpolation_steps, args.spacing)
    z_a, z_b = encode(model, a, schedule, tau, "euler"), encode(model, b, schedule, tau, "euler")
    weights = torch.linspace(0, 1, args.weights, dtype=torch.float64)
    path = slerp(z_a, z_b, weights)  # [K, P, 1, 8, 8]
    path_x0 = sample(model, path.flatten(0, 1), schedule, tau, method="ddim").view_as(path)
    ends = (pixel_rms(path_x0[0], a), pixel_rms(path_x0[-1], b))
    interpolation_seconds = time.perf_counter() - t0
    seconds = time.perf_counter() - start

    # --- the report ---
    ok = [S for S in args.steps if "mse" in results[S]]
    failed = [S for S in args.steps if results[S]["failure"]]
    lines = [
        "# Reconstruction, consistency and interpolation on 8×8 digits (the paper's Table 2, Sections 5.2–5.3)"
        + (" — SMOKE RUN (meaningless numbers)" if args.smoke else ""),
        "",
        (f"Written by `benchmarks/digits_reconstruction.py` in {seconds / 60:.1f} min on {platform.machine()} with "
         f"{args.threads} torch thread{'s' if args.threads > 1 else ''}, torch {torch.__version__} (Table 2 "
         f"{table2_seconds:.0f} s, consistency {consistency_seconds:.0f} s, interpolation {interpolation_seconds:.0f} s). "
         "Model: `load_unet(\"digits\")` (float32), DDPM's linear schedule, T = 1000."),
        "",
        "## Reconstruction x_0 → x_T → x_0 (Table 2)",
        "",
        (f"The first {args.n} held-out digits (never seen in training), encoded with `encode(..., \"euler\")` and "
         f"decoded with DDIM (η = 0) on the same `{args.spacing}` τ (S timesteps, so 2S network evaluations plus "
         "the encode's fixed-point iterations at its first step). Per-dimension MSE with pixels in [0, 1], ± its "
         "standard error over images; \"clamped\": the decoded digits clamped to [-1, 1] first. The paper's row is "
         "CIFAR-10 (32×32 RGB, a 35.7M-parameter network): a different data set, so compare the trend."),
        "",
        "| S | " + " | ".join(str(S) for S in args.steps) + " |",
        "|---" * (len(args.steps) + 1) + "|",
        "| digits, DDIM | " + " | ".join("encode failed" if "mse" not in results[S] else
                                         f"{results[S]['mse']:.2e} ± {results[S]['mse_se']:.0e}{inverted(results[S])}"
                                         for S in args.steps) + " |",
        "| digits, DDIM, clamped | " + " | ".join("–" if "mse" not in results[S] else f"{results[S]['mse_clamped']:.2e}"
                                                 for S in args.steps) + " |",
        "| digits, DDIM, exact inversion | " + " | ".join(
            "–" if S not in exact else "no inverse found" if "mse" not in exact[S]
            else f"{exact[S]['mse']:.2e} ± {exact[S]['mse_se']:.0e}{inverted(exact[S])}" for S in args.steps) + " |",
        "| paper, CIFAR-10 (DDIM) | " + " | ".join(f"{TABLE2_RECONSTRUCTION_MSE[S]:g}" if S in TABLE2_RECONSTRUCTION_MSE
                                                  else "–" for S in args.steps) + " |",
        "| encode's evaluations, explicit | " + " | ".join(str(results[S]["encode_nfe"]) for S in args.steps) + " |",
        "| encode's evaluations, exact | " + " | ".join(
            "–" if S not in exact else f"{exact[S]['encode_nfe']} ({exact[S]['encode_nfe'] / results[S]['encode_nfe']:.1f}×)"
            for S in args.steps) + " |",
        "",
    ]
    if failed:
        lines += ["Explicit encodes that failed for some digits: " + "; ".join(
            f"S = {S}: {results[S]['failure']}{inverted(results[S])}" for S in failed) + ".", ""]
    else:
        lines += [f"Every explicit encode converged (S = {', '.join(map(str, args.steps))}).", ""]
    converged = [S for S in args.exact_steps if "mse" in exact[S] and S in results]
    same_digits = {S: results[S]["per_image"][exact[S]["ok"]].mean().item() for S in converged}  # explicit, same digits
    lines += [("Exact inversion (`encode(..., inversion=\"exact\")`, default tolerance, the decode unchanged; where it "
               "inverts only some digits, `ConvergenceError` keeps them and their mask, and the MSEs are over those)"
               + (": " + "; ".join(f"S = {S}: {exact[S]['inverted']} of {exact[S]['n']} digits inverted, MSE "
                                   f"{exact[S]['mse']:.2e} against {same_digits[S]:.2e} explicit on the same digits "
                                   f"({same_digits[S] / exact[S]['mse']:.2g}× lower), for {exact[S]['encode_nfe']} "
                                   f"encode evaluations instead of {results[S]['encode_nfe']}" for S in converged)
                  if converged else " inverted no digit at any S")
               + "." + "".join(f" At S = {S}: {exact[S]['failure']}." for S in args.exact_steps if exact[S]["failure"])), ""]
    lines += [
        ("The exact ε's guarantee does not cover the network: for the exact ε, DDIM's step Φ(y) = y + (σ_1 − σ_2) "
         "ε(y, σ_2) from σ_2 = σ(τ_2) down to σ_1 = σ(τ_1) has a Jacobian whose symmetric part is at least ρ = σ_1/σ_2 "
         "in every direction, which makes Φ a bijection (`encode`'s docstring), so every step has exactly one "
         "inverse. The network's Jacobian, at each digit's explicit encode to σ_2 (autograd, smallest eigenvalue "
         "of (J + Jᵀ)/2), against whether the exact encode found the inverse:"),
        "",
        "| S | τ_1 → τ_2 | σ_1 → σ_2 | ρ | smallest eigenvalue | digits below ρ | digits below 0 | exact inverse found |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {S} | {m['timesteps'][0]:g} → {m['timesteps'][1]:g} | {m['sigmas'][0]:.3g} → {m['sigmas'][1]:.3g} | "
          f"{m['rho']:.3f} | {m['min']:.3f} | {m['below_rho']} of {m['n']} | {m['negative']} of {m['n']} | "
          + f"{exact[S]['inverted']} of {exact[S]['n']} digits |" for S, m in monotone.items()),
        "",
    ]
    if len(ok) >= 2:
        lo, hi = ok[0], ok[-1]
        ratio = [f"S = {S}: {results[S]['mse'] / TABLE2_RECONSTRUCTION_MSE[S]:.2g}×" for S in ok if S in TABLE2_RECONSTRUCTION_MSE]
        lines += [(f"The error falls from {results[lo]['mse']:.2e} at S = {lo} to {results[hi]['mse']:.2e} at S = {hi} "
                   f"({results[lo]['mse'] / results[hi]['mse']:.0f}× lower)"
                   + ("; digits over the paper's CIFAR-10 value: " + ", ".join(ratio) if ratio else "") + "."), ""]

    lines += [
        "## Sample consistency (Section 5.2)",
        "",
        (f"{args.consistency_n} x_T ~ N(0, I) (seed {args.seed}) decoded with DDIM (η = 0) on the `{args.spacing}` τ "
         f"for S = {', '.join(map(str, args.consistency_steps))}. RMS difference to the S = {top} decode of the same x_T, "
         f"pixels in [0, 1]: " + ", ".join(f"S = {S}: {v:.3f}" for S, v in consistency.items())
         + f". For scale, two S = {top} decodes of different x_T differ by {spread:.3f}."),
        "",
        "![the same x_T at several S](digits_consistency.png)",
        "",
        "## Interpolation (Section 5.3)",
        "",
        (f"The first held-out digit of each class pair ({', '.join(f'{p} → {q}' for p, q in pairs)}) encoded with "
         f"S = {args.interpolation_steps} (`{args.spacing}` τ), the two latents joined by `slerp` at "
         f"{args.weights} evenly spaced weights, each point decoded with DDIM on the same τ. The path's ends reproduce "
         f"the two digits to an RMS of {ends[0]:.3f} and {ends[1]:.3f} (pixels in [0, 1])."),
        "",
        "![slerp between encoded digits](digits_interpolation.png)",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "digits_reconstruction.md"
    md.write_text("\n".join(lines) + "\n")

    # Table 2 figure
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    if ok:
        ax.errorbar(ok, [results[S]["mse"] for S in ok], yerr=[results[S]["mse_se"] for S in ok], fmt="o-",
                    capsize=3, label=f"digits: DDIM encode → decode, {args.n} held-out digits")
    if converged:
        ax.errorbar(converged, [exact[S]["mse"] for S in converged], yerr=[exact[S]["mse_se"] for S in converged],
                    fmt="s--", capsize=3, label="digits: exact inversion (inversion=\"exact\")")
    paper = [S for S in args.steps if S in TABLE2_RECONSTRUCTION_MSE]
    ax.plot(paper, [TABLE2_RECONSTRUCTION_MSE[S] for S in paper], "k:s", mfc="none", label="paper: CIFAR-10 (DDIM)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(args.steps, [str(S) for S in args.steps])
    ax.set_xlabel("number of steps S (encode and decode each)")
    ax.set_ylabel("per-dimension MSE, pixels in [0, 1]")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if len(ok) >= 2:
        ax.set_title(f"Reconstruction error vs S on digits (Table 2): {results[ok[0]]['mse']:.1e} at S = {ok[0]}, "
                     f"{results[ok[-1]]['mse']:.1e} at S = {ok[-1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "digits_reconstruction.png", dpi=110)
    plt.close(fig)

    # consistency figure
    shown = min(args.shown, args.consistency_n)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 + 0.55 * shown), 1.2 + 0.6 * len(args.consistency_steps)))
    show_rows(ax, [decoded[S][:shown] for S in args.consistency_steps], [f"S = {S}" for S in args.consistency_steps],
              title=wrapped(f"Sample consistency: each column is one x_T decoded with DDIM (η = 0) at every S\n"
                            f"RMS to S = {top}: " + ", ".join(f"{v:.3f} (S = {S})" for S, v in consistency.items())
                            + f"; different x_T: {spread:.3f}", fig),
              xlabel=f"x_T number (seed {args.seed}); rows: number of steps S", column_labels=[str(i) for i in range(shown)])
    fig.tight_layout()
    fig.savefig(args.out / "digits_consistency.png", dpi=110)
    plt.close(fig)

    # interpolation figure: original a | decoded path | original b
    rows = [torch.cat([a[i:i + 1], path_x0[:, i], b[i:i + 1]]) for i in range(len(pairs))]
    columns = ["digit A"] + [f"{w:.2f}" for w in weights.tolist()] + ["digit B"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 + 0.6 * len(columns)), 1.6 + 0.75 * len(rows)))
    show_rows(ax, rows, [f"{p} → {q}" for p, q in pairs],
              title=wrapped(f"Slerp between DDIM-encoded held-out digits (S = {args.interpolation_steps}), every point "
                            f"decoded: the ends reproduce the digits (RMS {ends[0]:.3f}, {ends[1]:.3f})", fig),
              xlabel="slerp weight w (outer columns: the real digits)", column_labels=columns)
    fig.tight_layout()
    fig.savefig(args.out / "digits_interpolation.png", dpi=110)
    plt.close(fig)

    print("\n".join(lines))
    print(f"wrote {md}, digits_reconstruction.png, digits_consistency.png, digits_interpolation.png in {seconds:.0f} s")
    return md


if __name__ == "__main__":
    main()
