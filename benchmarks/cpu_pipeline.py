"""The small-image pipeline end to end on a CPU: train a 16×16 UNet on photo patches, sample with DDIM.

Stages, each timed:

1. data: ``load_offline_images`` — 16×16 RGB patches of the photo frozen in ``toy_data/`` (works
   offline), one set to train on and a disjoint-seed set held out;
2. training: ``train_image_model`` (L_1, AdamW, warm-up, gradient clipping, EMA, flips) for a
   fixed number of steps on a small UNet (base 32, two levels, attention at 8×8);
3. sampling: DDIM (Eq 12, η = 0) from the EMA weights at S = 10, 20, 50 on the paper's CIFAR-10
   "quad" grid τ (which starts at t = 800, σ ≈ 26), and at S = 50 on the "uniform" grid (which
   starts at t = 980, σ ≈ 130, where a briefly trained ε-model's errors are multiplied by σ),
   all from the same noise;
4. a check of the samples: the sliced 2-Wasserstein distance (``ddim_edu.evaluation.metrics``) of each set
   of samples to the held-out patches, beside the same distance for a second set of real patches
   (the floor, sampling error only) and for independent Gaussian pixels with the data's per-pixel
   mean and std (what a model that learnt only first and second moments per pixel would give);
5. the figure ``docs/cpu_pipeline_samples.png`` (training patches, then the samples of each S) and
   this script's section of ``docs/benchmarks.md``.

    python benchmarks/cpu_pipeline.py              # about 4 minutes on 2 idle cores
    python benchmarks/cpu_pipeline.py --steps 300  # a quicker look (noisier samples)
    python benchmarks/cpu_pipeline.py --threads 2  # torch's intra-op threads (default 1: small work, see
                                                   # ddim_edu.utils.threads; OMP_NUM_THREADS is respected)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ddim_edu.image.data import load_offline_images
from ddim_edu.image.training import make_grid, train_image_model
from ddim_edu.evaluation.metrics import sliced_wasserstein
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample
from ddim_edu.training import TrainConfig
from ddim_edu.image.unet import UNet, UNetConfig
from ddim_edu.utils.threads import choose_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import ROOT, publish

FIGURE = ROOT / "docs" / "cpu_pipeline_samples.png"
GRIDS = (("quad", 10), ("quad", 20), ("quad", 50), ("uniform", 50))  # (spacing of τ, S)


def save_figure(panels: dict[str, torch.Tensor], path: Path) -> None:
    """One image grid per panel, side by side, titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    for ax, (title, images) in zip(axes, panels.items()):
        ax.imshow(make_grid(images, nrow=8, padding=1), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200, help="training steps (fixed budget)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--base", type=int, default=32, help="UNet base channels")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=4096, help="training patches")
    parser.add_argument("--n-samples", type=int, default=128, help="samples per S (the figure shows the first 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-doc", dest="doc", action="store_false", help="print only; write neither figure nor doc")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: 1, unless OMP_NUM_THREADS or torch.set_num_threads chose)")
    args = parser.parse_args()
    chosen = choose_threads(args.threads, small=True)
    if chosen is not None:
        torch.set_num_threads(chosen)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    stages: list[tuple[str, float, str]] = []
    begin = time.perf_counter()

    def stage(name: str, start: float, note: str = "") -> None:
        stages.append((name, time.perf_counter() - start, note))
        print(f"[{time.perf_counter() - begin:6.1f} s] {name}: {stages[-1][1]:.1f} s {note}", flush=True)

    # 1. data: training patches, and held-out patches from other corners of the same photo
    start = time.perf_counter()
    data = load_offline_images(size=16, n=args.n_train, seed=args.seed)  # [N, 3, 16, 16] in [-1, 1]
    held_out = load_offline_images(size=16, n=args.n_samples, seed=args.seed + 1)
    second = load_offline_images(size=16, n=args.n_samples, seed=args.seed + 2)
    stage("data", start, f"{len(data)} training patches 16×16 (`load_offline_images`)")

    # 2. training
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = UNetConfig(image_size=16, base_channels=args.base, channel_mult=(1, 2), attention_resolutions=(8,),
                        norm_groups=8, dropout=0.0)
    model = UNet(config)
    n_params = sum(p.numel() for p in model.parameters())
    schedule = linear_schedule(1000)
    recipe = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=50, ema_decay=0.995, seed=args.seed)
    result = train_image_model(model, data, schedule, recipe, progress=False, threads=threads)
    final_loss = result.losses[-50:].mean().item()
    stage("training", start, f"{args.steps} steps × batch {args.batch}, {result.examples_per_second:.0f} images/s, "
          f"L_1 over the last 50 steps {final_loss:.1f} (d = {3 * 16 * 16})")

    # 3. sampling, all S from the same noise
    x_T = torch.randn((args.n_samples, 3, 16, 16), generator=torch.Generator().manual_seed(args.seed))
    samples = {}
    for spacing, S in GRIDS:
        start = time.perf_counter()
        tau = schedule.timesteps(S, spacing)
        name = f"DDIM S = {S}, {spacing} τ" + (f" ({len(tau)} distinct steps)" if len(tau) != S else "")
        samples[name] = sample(result.ema, x_T, schedule, tau, method="ddim", eta=0.0)
        rate = args.n_samples / (time.perf_counter() - start)
        stage(f"sampling, {name}", start, f"{args.n_samples} images, {rate:.1f} images/s, τ_S = {tau[-1].item():.0f}")

    # 4. how close the samples are to held-out patches (sliced W_2 over the 768 pixel values)
    start = time.perf_counter()
    flat = lambda x: x.flatten(1)
    sw = lambda x: sliced_wasserstein(flat(x.clamp(-1, 1)), flat(held_out), 512, torch.Generator().manual_seed(0)).item()
    mean, std = data.mean(0), data.std(0)
    gaussian = mean + std * torch.randn(held_out.shape, generator=torch.Generator().manual_seed(3))
    distances = {"real patches (second set)": sw(second), **{name: sw(x) for name, x in samples.items()},
                 "per-pixel Gaussian": sw(gaussian)}
    stage("sliced W_2 to held-out patches", start)

    # 5. figure
    start = time.perf_counter()
    if args.doc:
        panels = {"training patches": data[:64], **{name.split(" (")[0]: x[:64].clamp(-1, 1) for name, x in samples.items()}}
        save_figure(panels, FIGURE)
    stage("figure", start, str(FIGURE.relative_to(ROOT)) if args.doc else "(skipped)")
    total = time.perf_counter() - begin
    load_after = os.getloadavg()[0]

    heading = f"## CPU pipeline ({threads} threads): train a 16×16 UNet on photo patches, sample with DDIM"
    lines = [
        f"Written by `python benchmarks/cpu_pipeline.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on "
        f"{datetime.date.today().isoformat()}: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{threads} threads, float32, **{total / 60:.1f} min in all** (1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after, on {os.cpu_count()} cores; above {os.cpu_count()} other work shared the cores). "
        f"`UNet(UNetConfig(image_size=16, base_channels={args.base}, channel_mult=(1, 2), attention_resolutions=(8,), "
        f"norm_groups=8, dropout=0.0))`, {n_params / 1e6:.2f}M parameters; `train_image_model` with AdamW lr {args.lr:g} "
        f"(50 warm-up steps), clipping at 1, EMA decay 0.995, flips; DDPM's linear schedule, T = 1000; DDIM from the EMA "
        f"weights, η = 0, the same {args.n_samples} noise images for every grid.",
        "",
        "| stage | wall time (s) | |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.1f} | {note} |" for name, seconds, note in stages],
        f"| **total** | **{total:.1f}** | |",
        "",
        f"Sliced 2-Wasserstein distance (512 directions, over the 768 pixel values, samples clamped to [-1, 1]) from {args.n_samples} "
        f"images to {args.n_samples} held-out patches; a second set of real patches gives the floor:",
        "",
        "| images | sliced W_2 |",
        "|---|---|",
        *[f"| {name} | {d:.4f} |" for name, d in distances.items()],
        "",
        f"![training patches and DDIM samples]({FIGURE.name})",
    ]
    text = "\n".join(lines) + "\n"
    publish(heading, text, args.doc)


if __name__ == "__main__":
    main()
