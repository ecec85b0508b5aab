"""The paper's Table 1 on CIFAR-10: FID of DDIM (η = 0, 0.2, 0.5, 1) and of σ̂ for S = 10 … 1000.

One pretrained DDPM model (the published CIFAR-10 UNet, diffusers layout), T = 1000, the
quadratic τ the paper used for CIFAR-10 (App. D.2), 50000 samples per cell, FID against the
CIFAR-10 training set with the TensorFlow Inception-v3 (through torch-fidelity, see
``ddim_edu.cli``). Every cell is sampled with ``ddim_edu.image.generate.generate`` into its own folder under
``--work-dir``, so an interrupted run resumes where it stopped; its FID is kept in ``fid.json``
beside the samples. The Markdown written to ``--out`` puts our FIDs beside the paper's and states
the protocol.

    # the weights: config.json + diffusion_pytorch_model.safetensors of google/ddpm-cifar10-32
    python benchmarks/cifar10_table1.py --model google/ddpm-cifar10-32 --cifar10 cifar-10-binary.tar.gz
    python benchmarks/cifar10_table1.py --num-images 5000 --steps 10 50   # a smaller grid
    python benchmarks/cifar10_table1.py --smoke   # the whole grid on a tiny random UNet (plumbing only)

The full grid samples 25 × 50000 images (S = 1000 alone is about 50M network evaluations per row):
a GPU job of many hours. ``--smoke`` replaces the model by a tiny random UNet, the data by patches
of the offline photo and the Inception features by a fixed random projection of the pixels, so it
needs no weights, no data and no FID backend; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ddim_edu.evaluation import fid as fid_module
from ddim_edu.image import generate
from ddim_edu.solvers import check_options
from ddim_edu.utils.checks import resolve_device
from ddim_edu.image.data import float_to_pixels, load_offline_images
from ddim_edu.paper import SIGMA_HAT, TABLE1_FID, table1_row_label
from ddim_edu.image.pretrained import CONFIG_NAME, WEIGHTS_NAMES, diffusers_config, load_unet, to_diffusers_state_dict
from ddim_edu.schedules import SPACINGS, linear_schedule
from ddim_edu.image.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
STEPS = (10, 20, 50, 100, 1000)
ETAS = (0.0, 0.2, 0.5, 1.0)
SMOKE_CONFIG = UNetConfig(image_size=8, base_channels=16, channel_mult=(1,), num_res_blocks=1,
                          attention_resolutions=(), norm_groups=4, dropout=0.0)


def cell_name(row, S: int) -> str:
    return f"{'sigma_hat' if row == SIGMA_HAT else f'eta{row:g}'}_S{S}"


# --- smoke stand-ins --------------------------------------------------------------------------------


def smoke_model(folder: Path) -> Path:
    """A tiny random UNet saved in the diffusers layout (so the run also goes through load_unet)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = UNet(SMOKE_CONFIG)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(diffusers_config(SMOKE_CONFIG), indent=2))
    save_file({k: v.contiguous() for k, v in to_diffusers_state_dict(model.state_dict()).items()},
              str(folder / WEIGHTS_NAMES[0]))
    return folder


def smoke_features(dim: int = 16) -> fid_module.Features:
    """A fixed random projection of the pixels (in [0, 1]) to ``dim`` features: a stand-in for Inception."""
    size = SMOKE_CONFIG.image_size
    projection = np.random.default_rng(0).standard_normal((size * size * 3, dim)) / size

    def fn(images: np.ndarray) -> np.ndarray:
        return (images.reshape(len(images), -1) / 255.0) @ projection

    return fid_module.Features(f"smoke-pixel-projection-{dim}", fn)


def smoke_reference(features: fid_module.Features) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of 512 patches of the offline photo, in place of CIFAR-10."""
    patches = float_to_pixels(load_offline_images(size=SMOKE_CONFIG.image_size, n=512)).permute(0, 2, 3, 1).numpy()
    return fid_module.image_statistics(patches, features)


# --- the run ----------------------------------------------------------------------------------------


def fail(message: str) -> None:
    print(f"cifar10_table1: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_args(args) -> None:
    """Every argument checked before the model, the data or the FID statistics are touched."""
    if args.num_images < 2:
        fail("--num-images must be at least 2 (FID needs a covariance)")
    if args.batch_size < 1 or args.fid_batch_size < 1:
        fail("--batch-size and --fid-batch-size must be at least 1")
    try:
        for eta in args.etas:
            check_options("ddim", eta=eta)
        for S in args.steps:
            linear_schedule().timesteps(S, args.spacing)
        resolve_device(args.device)
    except ValueError as e:
        fail(str(e))


def setup(args):
    """Model, features and reference statistics, all checked before anything is sampled."""
    if args.smoke:
        folder = smoke_model(args.work_dir / "tiny_unet")
        features = smoke_features()
        return load_unet(folder), str(folder), features, smoke_reference(features), "offline photo patches (512, 8×8)"
    try:
        model = load_unet(args.model, download=args.download)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(f"cannot load the pretrained model: {e}")
    try:
        features = fid_module.inception_features(args.inception_weights, args.device)
        reference = fid_module.cifar10_statistics(features, args.stats, cifar10=args.cifar10, batch_size=args.fid_batch_size)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(f"FID is not available: {e}")
    return model, str(args.model), features, reference, "CIFAR-10 train (50000 images)"


def run_cell(model, args, features, reference, row, S: int, source: str) -> dict:
    """Sample one cell (resuming if it was started) and compute its FID (or read it back)."""
    folder = args.work_dir / cell_name(row, S)
    result_file = folder / "fid.json"
    method, eta = (SIGMA_HAT, 0.0) if row == SIGMA_HAT else ("ddim", float(row))
    start = time.perf_counter()
    samples = generate.generate(model, folder, method=method, steps=S, eta=eta, spacing=args.spacing,
                           num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
                           device=args.device, grid=64, keep_shards=False, progress=not args.quiet,
                           source=source)
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result.get("features") == features.name:
            return result
    seconds = time.perf_counter() - start
    images = generate.load_images(samples)
    score = fid_module.fid(images, reference, features, batch_size=args.fid_batch_size, progress=not args.quiet)
    result = {"fid": score, "features": features.name, "num_images": len(images), "seconds": seconds}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(results: dict, args, rows, features: fid_module.Features, reference_name: str, source: str, weights: str) -> str:
    schedule = linear_schedule()
    evals = {S: len(schedule.timesteps(S, args.spacing)) for S in args.steps}
    lines = [
        "# Table 1 on CIFAR-10: FID of the η-family and σ̂" + (" — SMOKE RUN (meaningless numbers)" if args.smoke else ""),
        "",
        (f"Each cell: our FID (the paper's in parentheses). Written by `benchmarks/cifar10_table1.py` "
         f"on {datetime.now(timezone.utc):%Y-%m-%d}."),
        "",
        "| | " + " | ".join(f"S = {S}" for S in args.steps) + " |",
        "|---" * (len(args.steps) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for S in args.steps:
            ours = f"{results[row, S]['fid']:.2f}"
            paper = TABLE1_FID.get(row, {}).get(S)
            cells.append(ours + (f" ({paper:.2f})" if paper is not None else ""))
        lines.append(f"| {table1_row_label(row)} | " + " | ".join(cells) + " |")
    tau_note = {
        "quad": "the quadratic τ_i = int() of numpy's linspace(0, sqrt(0.8 T), S)², as the paper's code computes it "
                "for CIFAR-10 (repeated small indices are dropped: a step from a timestep to itself is the identity)",
        "uniform": "the uniform τ = range(0, T, ⌊T/S⌋) of the paper's code (0, T/S, 2T/S, … when S divides T)",
        "leading": "τ_i = (i-1)·⌊T/S⌋, exactly S points (diffusers' \"leading\" spacing)",
    }.get(args.spacing, f"the {args.spacing!r} spacing of ddim_edu.schedules")
    lines += [
        "",
        "## Protocol",
        "",
        (f"- Model: {'a tiny random UNet (smoke run)' if args.smoke else source}; weights SHA-256 `{weights[:16]}…`; "
         "DDPM's linear β schedule, T = 1000."),
        (f"- Samples: {args.num_images} per cell, batches of {args.batch_size}, seed {args.seed} (image i's x_T is drawn "
         "from a generator seeded from (seed, i), so every row starts from the same x_T), float32 on "
         f"{resolve_device(args.device)}."),
        (f"- τ: {tau_note}; sampling starts at the largest τ. Network evaluations per sample: "
         + ", ".join(f"S = {S}: {n}" for S, n in evals.items()) + "."),
        ("- Rows: Eq 12 with σ(η) of Eq 16 (`ddim_edu.sampling.ddim_steps`, no clipping); σ̂ as the paper's code runs it "
         "(DDPM ancestral steps on τ with x_0 clipped to [-1, 1], `sigma_hat_steps`)."),
        f"- FID: features `{features.name}`, reference {reference_name}; Fréchet distance of `ddim_edu.cli`"
        + (" (the paper used TensorFlow's FID code; torch-fidelity's Inception port matches it closely)." if not args.smoke
           else " (smoke run: a random projection of the pixels, not Inception)."),
        "- Users who rerun Table 1 report spreads of a few tenths to a few points with τ, seed and FID implementation.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/ddpm-cifar10-32", help="diffusers-layout folder, or a Hub name found as a local folder or in the Hugging Face cache")
    parser.add_argument("--download", action="store_true", help="let --model NAME download from the Hugging Face Hub "
                                                                 "(needs huggingface_hub: the hub extra)")
    parser.add_argument("--num-images", type=int, default=None, help="samples per cell (default 50000; smoke: 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="sampling batch (default 500; smoke: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of η > 0's noise (default 0)")
    parser.add_argument("--spacing", default="quad", choices=SPACINGS, help="τ (default quad, as the paper for CIFAR-10)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="the S columns (default 10 20 50 100 1000)")
    parser.add_argument("--etas", type=float, nargs="+", default=list(ETAS), help="the η rows (default 0 0.2 0.5 1)")
    parser.add_argument("--no-sigma-hat", action="store_true", help="leave out the σ̂ row")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--work-dir", type=Path, default=None, help="samples and per-cell results (default outputs/cifar10_table1[_smoke])")
    parser.add_argument("--out", type=Path, default=None, help="the Markdown table (default docs/cifar10_table1.md; smoke: <work-dir>/table1.md)")
    parser.add_argument("--stats", type=Path, default=None, help="cache of the CIFAR-10 FID statistics")
    parser.add_argument("--cifar10", default=None, help="CIFAR-10 archive (binary or python version) or its folder (needed once for the statistics)")
    parser.add_argument("--inception-weights", type=Path, default=None, help="torch-fidelity's Inception weights file")
    parser.add_argument("--fid-batch-size", type=int, default=250, help="images per Inception forward pass (default 250)")
    parser.add_argument("--smoke", action="store_true", help="the whole grid on a tiny random UNet with stand-in FID features")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.num_images is None:
        args.num_images = 4 if args.smoke else 50000
    if args.batch_size is None:
        args.batch_size = 4 if args.smoke else 500
    args.work_dir = args.work_dir or ROOT / "outputs" / ("cifar10_table1_smoke" if args.smoke else "cifar10_table1")
    args.out = args.out or (args.work_dir / "table1.md" if args.smoke else ROOT / "docs" / "cifar10_table1.md")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_args(args)
    model, source, features, reference, reference_name = setup(args)
    weights = generate.weights_sha256(model)
    rows = [*args.etas, *([] if args.no_sigma_hat else [SIGMA_HAT])]
    results = {}
    try:
        for row in rows:
            for S in args.steps:
                results[row, S] = run_cell(model, args, features, reference, row, S, source)
                if not args.quiet:
                    print(f"{table1_row_label(row)}, S = {S}: FID {results[row, S]['fid']:.2f}", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished batches are kept under {args.work_dir}: rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except ValueError as e:
        fail(str(e))
    text = markdown(results, args, rows, features, reference_name, source, weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
