"""Train the digits UNet that ships as ``toy_data/digits_unet.safetensors`` (with ``digits_unet.json``).

Run from the repository root:  python toy_data/make_digits_unet.py
A :class:`~ddim_edu.image.unet.UNet` of about 1.0M parameters (``CONFIG``) learns scikit-learn's
8×8 digits (``load_digits("train")``, 1,442 images in [-1, 1]) with DDPM's loss L_1 on DDPM's linear
schedule (T = 1000), by :func:`ddim_edu.image.training.train_image_model` with the recipe
``RECIPE``: 3,500 steps, about 15 minutes on one idle CPU core. The EMA weights are written as
safetensors, and the UNetConfig with the recipe as JSON; ``ddim_edu.image.pretrained.load_unet("digits")``
reads the pair.

The initial weights come from ``torch.manual_seed(INIT_SEED)``, everything the trainer draws from
``RECIPE["seed"]``, so a run is reproducible: with the same torch, CPU type and ``--threads`` it gives
the shipped file bit for bit (the thread count changes float rounding, and so the weights: another
count gives an equally good model, not the same file). The trainer's checkpoint, written every 250
steps and on Ctrl-C or SIGTERM, sits next to the output; rerunning the same command resumes from it
exactly, and it is deleted once the files are written.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, so ddim_edu imports without installing

# The UNetConfig fields: the DDPM UNet made small for 8×8 grey digits (1,001,729 parameters).
CONFIG = dict(
    image_size=8, in_channels=1,  # the digits at their native 8×8, grey
    base_channels=32, channel_mult=(1, 2),  # 32 channels at 8×8, 64 at 4×4
    num_res_blocks=2, attention_resolutions=(4,),  # self-attention at 4×4 (and in the middle, as always)
    dropout=0.1, norm_groups=8,
)
# The TrainConfig fields: about 310 epochs of the 1,442 training digits, sized to take about 15 minutes on one core.
RECIPE = dict(
    steps=3500, batch_size=128, lr=1e-3, warmup=200, final_lr_fraction=0.05,  # a cosine down to 5e-5
    grad_clip=1.0, ema_decay=0.999,
    hflip=False,  # digits are not mirror-symmetric
    seed=0,
)
INIT_SEED = 0  # torch.manual_seed before UNet(CONFIG): the initial weights
THREADS = 1  # the intra-op thread count the shipped file was made with
CHECKPOINT_EVERY = 250


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the digits UNet shipped in toy_data/ (resumable).")
    parser.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default: the recipe's, {RECIPE['steps']})")
    parser.add_argument("--out", type=Path, default=HERE / "digits_unet.safetensors",
                        help="the weights file; the JSON goes next to it with the suffix .json "
                             "(default: toy_data/digits_unet.safetensors)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch intra-op threads (default {THREADS}, as the shipped file; others change the last bits)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported: the count is the user's choice

    import torch
    from safetensors.torch import save

    from ddim_edu.image.data import load_digits
    from ddim_edu.image.training import train_image_model
    from ddim_edu.image.unet import UNet, UNetConfig
    from ddim_edu.schedules import linear_schedule
    from ddim_edu.training import TrainConfig
    from ddim_edu.utils.files import atomic_write, save_json_atomic

    config = UNetConfig(**CONFIG)
    recipe = TrainConfig(**{**RECIPE, **({} if args.steps is None else {"steps": args.steps})})
    torch.set_num_threads(args.threads)
    out = args.out
    out_json = out.with_suffix(".json")
    checkpoint = out.with_name(out.stem + ".checkpoint.pt")

    data, _ = load_digits("train")
    torch.manual_seed(INIT_SEED)
    model = UNet(config)
    start = time.perf_counter()
    try:
        result = train_image_model(model, data, linear_schedule(), recipe, checkpoint=checkpoint,
                                   checkpoint_every=CHECKPOINT_EVERY, progress=not args.quiet)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trainer has saved the last finished step
        print(f"\ninterrupted; {checkpoint} holds the last finished step: rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    seconds = time.perf_counter() - start

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in result.ema.state_dict().items()}
    blob = save(tensors, metadata={"format": "pt"})
    with atomic_write(out) as f:
        f.write(blob)
    final_loss = result.losses[-100:].mean().item()
    save_json_atomic(out_json, {
        "unet_config": asdict(config),
        "weights": "EMA",
        "parameters": sum(v.numel() for v in tensors.values()),
        "data": 'ddim_edu.image.data.load_digits("train"): 1,442 images [1, 8, 8] in [-1, 1]',
        "schedule": "linear, T=1000, beta 1e-4..0.02",
        "train_config": {**asdict(recipe), "betas": list(recipe.betas)},
        "init_seed": INIT_SEED,
        "threads": args.threads,
        "steps": result.step,
        "final_loss": round(final_loss, 4),  # L_1 (summed over the 64 pixels), mean of the last 100 steps
        "torch": torch.__version__.split("+")[0],
        "sha256": hashlib.sha256(blob).hexdigest(),
    })
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {out} ({len(blob) / 1e6:.1f} MB) and {out_json}: {result.step} steps, final loss {final_loss:.4f} "
          f"(mean of the last 100), {seconds / 60:.1f} min in this call ({result.steps_per_second:.2f} steps/s)")


if __name__ == "__main__":
    main()
