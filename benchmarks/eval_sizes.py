"""Inference time of one NAM site (BatchNorm2d then NAM, eval mode, no gradient) per map size:
the one-pass eval kernel against the straightforward NAM's PyTorch operators, in turns.

What ``kernels.SMALL_MAP`` rests on for inference: at most that many elements a site runs the
operators, above it the kernel. Each size prints both medians and kernel / operators; below 1
the kernel is faster.

    python benchmarks/eval_sizes.py [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import parse_args, take_turns
from torch import nn

from nam_lightning import NAM, NAMSite, kernels

SHAPES = [  # (N, C, H, W): batch 64 over the small maps of small_resnet and resnets, then larger
    (64, 64, 2, 2),
    (64, 32, 4, 4),
    (64, 16, 8, 8),
    (64, 32, 8, 8),
    (64, 64, 8, 8),
    (64, 128, 8, 8),
    (64, 64, 16, 16),
    (32, 256, 16, 16),
    (8, 256, 56, 56),
]


def site(channels: int) -> NAMSite:
    result = NAMSite(nn.BatchNorm2d(channels), NAM(channels)).eval()
    with torch.no_grad():
        for bn in (result.module, result.nam.channel.bn):
            bn.weight.uniform_(-1, 1)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return result


def operators(s: NAMSite, x: torch.Tensor) -> torch.Tensor:
    """The straightforward NAM: ``y * sigmoid(w * bn(y))`` after the site's BatchNorm."""
    y = s.module(x)
    w = s.nam.channel.weights().view(1, -1, 1, 1)
    return y * torch.sigmoid(s.nam.channel.bn(y) * w)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls of each (200)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parse_args(parser, positive=("repeats", "threads"))
    kernels.SMALL_MAP = 0  # the site's own path is the kernel at every size
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats}")
    print(f"{'N, C, H, W':>16} {'elements':>9} {'kernel':>10} {'operators':>10} {'ratio':>6}")
    with torch.no_grad():
        for shape in SHAPES:
            x = torch.randn(shape)
            s = site(shape[1])
            torch.testing.assert_close(s(x), operators(s, x), rtol=1e-5, atol=1e-5)
            reps = args.repeats if x.numel() <= 2**20 else max(1, args.repeats // 8)
            times = take_turns(
                {"kernel": lambda s=s, x=x: s(x), "operators": lambda s=s, x=x: operators(s, x)},
                reps,
                warmup=3,
            )
            kernel, ops = (statistics.median(times[k]) for k in ("kernel", "operators"))
            print(
                f"{', '.join(map(str, shape)):>16} {x.numel():>9} {kernel * 1e6:>8.0f}us "
                f"{ops * 1e6:>8.0f}us {kernel / ops:>6.2f}"
            )


if __name__ == "__main__":
    main()
