"""Training time of NAM on small maps with its BatchNorms on contiguous maps against
channels-last, in turns: what ``kernels.SHORT_PLANE`` rests on.

On a CPU, PyTorch's BatchNorm walks a contiguous map's planes one at a time; on planes of a few
pixels the channels-last kernel is faster. First one site (BatchNorm2d then NAM, forward and
backward, batch 64) per plane size, each layout forced; then a whole training step of the
command line's default model (small_resnet, batch 64 at 8 px: sites at 8x8, 4x4 and 2x2) without
NAM, with NAM on contiguous maps only (``SHORT_PLANE = 0``), and with NAM as shipped. Ratios below
1 favour channels-last; the step ratios are against no NAM's step, median and paired.

    python benchmarks/short_planes.py [--repeats 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from common import parse_args, take_turns
from torch import nn

from nam_lightning import NAM, NAMSite, inject_nam, kernels
from nam_lightning.models import small_resnet

SHAPES = [
    (64, 128, 1, 1),
    (64, 128, 2, 2),
    (64, 512, 2, 2),
    (64, 128, 3, 3),
    (64, 64, 4, 4),
    (64, 32, 8, 8),
    (32, 16, 16, 16),
]
SHIPPED = kernels.SHORT_PLANE


def with_short_plane(pixels: int, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``kernels.SHORT_PLANE`` set to ``pixels``."""

    def run() -> object:
        kernels.SHORT_PLANE = pixels
        try:
            return fn()
        finally:
            kernels.SHORT_PLANE = SHIPPED

    return run


def site_step(shape: tuple[int, int, int, int]) -> Callable[[], object]:
    """One training step's forward and backward of a NAM site on a fresh input of ``shape``."""
    channels = shape[1]
    s = NAMSite(nn.BatchNorm2d(channels), NAM(channels)).train()
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)

    def step() -> object:
        s(x).backward(dy)
        return None

    return step


def model_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed runs of each (200)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parse_args(parser, positive=("repeats", "threads"))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats} runs "
        f"in turns; shipped SHORT_PLANE = {SHIPPED}"
    )
    print(f"{'site N, C, H, W':>18} {'contiguous':>11} {'channels-last':>14} {'ratio':>6}")
    for shape in SHAPES:
        step = site_step(shape)
        times = take_turns(
            {
                "contiguous": with_short_plane(0, step),
                "channels-last": with_short_plane(shape[2] * shape[3], step),
            },
            args.repeats,
            warmup=3,
        )
        cont, last = (statistics.median(t) for t in times.values())
        print(
            f"{', '.join(map(str, shape)):>18} {cont * 1e6:>9.0f}us {last * 1e6:>12.0f}us "
            f"{last / cont:>6.3f}"
        )

    torch.manual_seed(0)
    base = small_resnet()
    with_nam = copy.deepcopy(base)
    inject_nam(with_nam)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    steps = {
        "no NAM": model_step(base, x, y),
        "NAM, contiguous only": with_short_plane(0, model_step(copy.deepcopy(with_nam), x, y)),
        "NAM as shipped": model_step(with_nam, x, y),
    }
    times = take_turns(steps, args.repeats, warmup=3)
    reference = times["no NAM"]
    print(f"\nsmall_resnet training step, {args.repeats} runs each in turns")
    print(f"{'variant':>22} {'step ms':>8} {'x no NAM':>9} {'paired x':>9}")
    for name, t in times.items():
        median = statistics.median(t)
        paired = statistics.median(a / b for a, b in zip(t, reference, strict=True))
        print(
            f"{name:>22} {median * 1e3:>8.2f} {median / statistics.median(reference):>9.3f} "
            f"{paired:>9.3f}"
        )


if __name__ == "__main__":
    main()
