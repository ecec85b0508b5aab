"""The command line the digits benchmarks share: seed, threads, output folder and a seconds-long smoke mode."""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parser_for(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as its help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse(parser: argparse.ArgumentParser, argv, smoke: dict, smoke_help: str) -> argparse.Namespace:
    """Add --seed, --threads, --out and --smoke, parse ``argv``; with --smoke, ``smoke``'s values replace the options'."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the Markdown and the figures (default docs/)")
    parser.add_argument("--smoke", action="store_true", help=f"seconds: {smoke_help}")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
    return args
