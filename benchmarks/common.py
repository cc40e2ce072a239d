"""What the benchmark scripts share: their command-line checks and CPU thread setting."""

from __future__ import annotations

import argparse

import torch


def parse_args(parser: argparse.ArgumentParser, positive: tuple[str, ...]) -> argparse.Namespace:
    """Parse the command line, refuse a non-positive value of any option in ``positive`` (a
    usage error naming it), and use ``--threads`` CPU threads."""
    args = parser.parse_args()
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    return args
