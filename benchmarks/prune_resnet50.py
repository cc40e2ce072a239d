"""How much of the FLOPs saved by channel pruning turns into CPU speed, on resnet50 with NAM.

A torchvision resnet50 gets NAM at its 16 blocks and random BatchNorm scale factors (a fresh
model has every gamma at 1: a tie, nothing to rank), then a copy is pruned by half with
``prune_channels(amount=0.5)``, once with free channel counts and once with ``round_to=8``.
For each, the table shows the wall time of the pruning call (graph tracing, surgery and the two
FLOP counts it makes), the parameter and FLOP ratios, and the eval-mode latency of the original
and the pruned models, measured in turns in one process (median of the repetitions). "speed
fraction" is the latency reduction divided by the FLOPs reduction: 1.0 would mean every FLOP
saved is time saved.

Run from the repository root::

    python benchmarks/prune_resnet50.py [--batch 8] [--size 224] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nam_lightning import inject_nam, prune_channels

AMOUNT = 0.5
ROUND_TO = (None, 8)


def forward_seconds(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


@torch.no_grad()
def randomise_gammas(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.weight.uniform_(0.5, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (224)")
    parser.add_argument("--repeats", type=int, default=7, help="timed forward passes (7)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    for name in ("batch", "size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.resnet50(weights=None, num_classes=1000)
    sites = inject_nam(model)
    randomise_gammas(model)
    model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)  # (B, C, H, W)

    pruned, reports, prune_s = {}, {}, {}
    for round_to in ROUND_TO:
        pruned[round_to] = copy.deepcopy(model)
        start = time.perf_counter()
        reports[round_to] = prune_channels(
            pruned[round_to], x, AMOUNT, round_to=round_to, measure=False
        )
        prune_s[round_to] = time.perf_counter() - start

    # All models take turns in every repetition, so a slow spell of the machine hits them alike.
    models = {"original": model, **pruned}
    seconds: dict[object, list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        for m in models.values():
            forward_seconds(m, x)  # warm-up
        for _ in range(args.repeats):
            for key, m in models.items():
                seconds[key].append(forward_seconds(m, x))
    original = statistics.median(seconds["original"])

    rows = []
    for round_to in ROUND_TO:
        report = reports[round_to]
        latency = statistics.median(seconds[round_to])
        flops_reduction = 1 / report.flops_ratio
        latency_reduction = original / latency
        rows.append(
            (
                str(round_to),
                f"{prune_s[round_to]:.2f}",
                f"{report.params_ratio:.3f}",
                f"{report.flops_ratio:.3f}",
                f"{flops_reduction:.2f}x",
                f"{latency_reduction:.2f}x",
                f"{latency_reduction / flops_reduction:.2f}",
                f"{original * 1e3:.0f} -> {latency * 1e3:.0f}",
            )
        )

    print(
        f"resnet50 + NAM at {len(sites)} sites, random BatchNorm gammas, amount={AMOUNT} "
        f"(global |gamma|)\nCPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"eval mode, batch {args.batch} x 3 x {args.size} x {args.size}; latency: median of "
        f"{args.repeats} forward passes, the three models taking turns\n"
    )
    header = (
        "round_to",
        "prune s",
        "params ratio",
        "FLOPs ratio",
        "FLOPs reduction",
        "latency reduction",
        "speed fraction",
        "latency ms",
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
