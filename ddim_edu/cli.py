"""Command line: ``python -m ddim_edu sample ...`` and ``python -m ddim_edu fid ...``.

Argument parsing over library functions: ``sample`` is :func:`ddim_edu.image.generate.generate`
(resumable; see that module for the files it writes) on a UNet that :func:`ddim_edu.image.pretrained.load_unet`
or :func:`ddim_edu.image.training.load_checkpoint_unet` reads, and ``fid`` is
:func:`ddim_edu.evaluation.fid.fid` against CIFAR-10's training statistics. Errors are printed on
one line with the subcommand's name (exit status 1; an OS error names its path and the system's
reason; ``--debug`` shows the traceback instead), bad arguments by argparse (status 2), Ctrl-C or
SIGTERM end with status 130 and say how to resume. A ``sample`` run holds a lock on its ``--out``
folder: a second run into it is refused at once (see :mod:`ddim_edu.image.generate`).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .evaluation.fid import (
    INCEPTION_FEATURES_NAME,
    NEED_CIFAR10,
    FIDBackendMissing,
    cifar10_statistics,
    default_inception_weights,
    default_stats_path,
    fid,
    inception_features,
)
from .image.data import CIFAR10_URL, locate_cifar10
from .image.generate import FRACTIONAL_SPACINGS, generate, load_images, tolerances
from .image.pretrained import load_unet, read_unet_config
from .image.training import CHECKPOINT_WEIGHTS, load_checkpoint_unet
from .image.unet import UNet
from .schedules import MODEL_FREE_SPACINGS
from .solvers import ADAPTIVE, FINAL_STEPS, check_options, method_listing
from .utils.files import FolderInUse
from .utils.signals import sigterm_as_keyboard_interrupt

__all__ = ["build_parser", "main"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, so that a bad count is refused under its flag's name."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def folder(text: str) -> Path:
    """An argparse type: a folder's path, not empty (an empty --out would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddim_edu", description="ddim_edu: sample images and score them with FID.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("sample", help="sample images from a pretrained or trained UNet (resumable)",
                       description="Sample images into --out: samples.npz (uint8 [N, H, W, C], key 'images'; C = 3 RGB, "
                                   "1 grey), grid.png, "
                                   "and per-batch shards so that a rerun with the same arguments resumes.")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model that ships with the package (digits: a small UNet of scikit-learn's 8×8 "
                                       "digits, grey), a diffusers-layout folder, a state-dict file, or a Hugging Face name "
                                       "(e.g. google/ddpm-cifar10-32: a local folder of that name, else the Hugging Face cache)")
    which.add_argument("--checkpoint", help="a checkpoint of ddim_edu.image_training (its EMA weights, see --weights)")
    s.add_argument("--weights", default="ema", choices=CHECKPOINT_WEIGHTS,
                   help="which weights of a --checkpoint: ema (default; what to sample after a long run) or model "
                        "(the trained weights; for a short run, whose EMA is still near the initial weights)")
    s.add_argument("--config", help="JSON UNet config (diffusers config.json or UNetConfig fields) for --checkpoint "
                                    "or a single state-dict file (default: the config a training checkpoint stores, "
                                    "else the CIFAR-10 UNet)")
    s.add_argument("--download", action="store_true", help="let --model NAME download from the Hugging Face Hub "
                                                            "(needs huggingface_hub: the hub extra)")
    s.add_argument("--method", default="ddim", help=f"sampling method (default ddim). {method_listing()}")
    s.add_argument("--steps", type=int_at_least(1), default=50,
                   help="S, the number of steps of the sub-sequence τ (default 50); --spacing uniform gives "
                        "⌈T/⌊T/S⌋⌉ steps, more than S when S does not divide T = 1000 (--spacing leading: exactly S); "
                        "an adaptive solver uses τ's largest and smallest entries only and chooses its own steps")
    s.add_argument("--eta", type=float, default=0.0, help="η of Eq 16 for --method ddim: 0 DDIM, 1 DDPM (default 0)")
    s.add_argument("--final-step", default="euler", choices=FINAL_STEPS,
                   help="last step to σ = 0 of an ODE method: euler (= DDIM's) or extrapolate (the x_0 predictions "
                        "extrapolated in σ²; default euler)")
    default_tols = tolerances(ADAPTIVE[0], None, None)
    s.add_argument("--rtol", type=float, default=None,
                   help=f"relative tolerance of an adaptive solver ({', '.join(ADAPTIVE)}; default {default_tols['rtol']:g})")
    s.add_argument("--atol", type=float, default=None,
                   help=f"absolute tolerance of an adaptive solver (default {default_tols['atol']:g})")
    s.add_argument("--spacing", default="uniform", choices=MODEL_FREE_SPACINGS,
                   help="how τ is chosen (default uniform: range(0, T, T // S), the paper's code; leading: its first S "
                        "entries; quad: the paper's CIFAR-10 τ; trailing: ends at T-1; linear, karras, logsnr: "
                        "fractional grids for the ODE methods)")
    s.add_argument("--t-min", type=float, default=None, help=f"smallest timestep for the spacings {', '.join(FRACTIONAL_SPACINGS)}")
    s.add_argument("--num-images", type=int_at_least(1), default=64, help="number of images (default 64)")
    s.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per batch and per shard (default 64)")
    s.add_argument("--seed", type=int_at_least(0), default=0, help="seed of all randomness (default 0)")
    s.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch's intra-op threads on a CPU (default: 1 for models under 5M parameters, unless "
                        "OMP_NUM_THREADS says otherwise; more threads can be far slower on a busy machine)")
    s.add_argument("--grid", type=int_at_least(0), default=64, help="images in grid.png (default 64; 0: no grid)")
    s.add_argument("--remove-shards", action="store_true", help="delete the shards once samples.npz is written")
    s.add_argument("--out", required=True, type=folder,
                   help="output folder (a rerun with the same arguments resumes; one run at a time)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    s.set_defaults(run=_cmd_sample, parser=s)

    f = sub.add_parser("fid", help="FID of an .npz of uint8 images against CIFAR-10 train statistics",
                       description="FID of uint8 images [N, H, W, 3] (key 'images') against the CIFAR-10 training set, "
                                   "with torch-fidelity's Inception-v3 pool3 features (the error says what to install if it is missing).")
    f.add_argument("samples", type=Path, help=".npz of uint8 images [N, H, W, 3]")
    f.add_argument("--stats", type=Path, default=None, help="cache of the CIFAR-10 statistics (default ~/.cache/ddim_edu/...)")
    f.add_argument("--cifar10", default=None, help=f"CIFAR-10 archive (binary or python version) or its folder, needed once to compute the "
                                                   f"statistics (default $DDIM_EDU_CIFAR10; download {CIFAR10_URL})")
    f.add_argument("--inception-weights", type=Path, default=None, help=f"Inception weights file (default {default_inception_weights()})")
    f.add_argument("--batch-size", type=int_at_least(1), default=250, help="images per forward pass (default 250)")
    f.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    f.set_defaults(run=_cmd_fid, parser=f)
    return parser


def load_model_from_args(model: str | None, checkpoint: str | None, config: str | None, download: bool = False,
                         weights: str = "ema") -> tuple[UNet, str]:
    """The UNet that ``--model`` or ``--checkpoint`` (with ``--weights``) name, and a description of its source."""
    unet_config = read_unet_config(config) if config else None
    if checkpoint is not None:
        return load_checkpoint_unet(checkpoint, unet_config, weights), f"checkpoint {checkpoint} ({weights})"
    return load_unet(model, config=unet_config, download=download), f"model {model}"


def _cmd_sample(args, parser) -> int:
    try:
        check_options(args.method, eta=args.eta, final_step=args.final_step, rtol=args.rtol, atol=args.atol)
    except ValueError as e:
        parser.error(str(e))
    if args.weights != "ema" and args.checkpoint is None:
        parser.error("--weights applies to --checkpoint only")
    model, source = load_model_from_args(args.model, args.checkpoint, args.config, args.download, args.weights)
    path = generate(model, args.out, method=args.method, steps=args.steps, eta=args.eta, final_step=args.final_step,
                    rtol=args.rtol, atol=args.atol,
                    spacing=args.spacing,
                    t_min=args.t_min, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
                    device=args.device, grid=args.grid, keep_shards=not args.remove_shards,
                    progress=not args.quiet, source=source, threads=args.threads)
    print(f"wrote {path}" + (f" and {args.out / 'grid.png'}" if args.grid else ""))
    return 0


def _cmd_fid(args, parser) -> int:
    images = load_images(args.samples)
    if images.shape[1:3] != (32, 32):
        print(f"warning: {args.samples} holds {images.shape[1]}×{images.shape[2]} images; CIFAR-10's are 32×32, so the "
              "FID (computed after resizing both to the Inception input) is not comparable to published ones", file=sys.stderr)
    missing = []  # everything that is missing, said at once rather than one run at a time
    try:
        features = inception_features(args.inception_weights, args.device)
    except FIDBackendMissing as e:
        missing.append(str(e))
    stats = args.stats if args.stats is not None else default_stats_path(INCEPTION_FEATURES_NAME)
    if not Path(stats).is_file():
        try:
            locate_cifar10(args.cifar10)
        except FileNotFoundError as e:
            missing.append(f"{NEED_CIFAR10}: {e}")
    if missing:
        raise ValueError("\n".join(f"({i}) {m}" for i, m in enumerate(missing, 1)) if len(missing) > 1 else missing[0])
    reference = cifar10_statistics(features, args.stats, cifar10=args.cifar10, batch_size=args.batch_size,
                                   progress=not args.quiet)
    score = fid(images, reference, features, batch_size=args.batch_size, progress=not args.quiet)
    print(f"FID {score:.4f} ({len(images)} images vs CIFAR-10 train, {features.name})")
    return 0


def describe_error(error: BaseException) -> str:
    """What went wrong, for one line of the command line: an OS error names its path and the system's reason."""
    if isinstance(error, OSError) and error.filename is not None:
        where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
        return f"{where}: {error.strerror or type(error).__name__}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({type(error).__name__})"
    return str(error) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 bad arguments, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    command = args.parser  # the subcommand's parser: its usage and name head the errors
    try:
        with sigterm_as_keyboard_interrupt():
            return args.run(args, command)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a job scheduler
        where = f"; the finished batches are in {args.out / 'shards'}, rerun the same command to resume" if args.command == "sample" else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError, FloatingPointError, FolderInUse) as e:
        if args.debug:
            raise
        print(f"{command.prog}: error: {describe_error(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a fault of ours or of a library: said in one line, the traceback with --debug
        if args.debug:
            raise
        print(f"{command.prog}: error: {type(e).__name__}: {describe_error(e)} (unexpected; rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
