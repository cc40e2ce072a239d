"""How much of the FLOPs saved by channel pruning turns into CPU speed, on resnet50 with NAM.

A torchvision resnet50 gets NAM at its 16 blocks and random BatchNorm scale factors (a fresh
model has every gamma at 1: a tie, nothing to rank), then copies are pruned four ways: half of
the channels (``amount=0.5``) and half of the FLOPs (``flops_target=0.5``), each with free
channel counts and with ``round_to=8`` (and, for the FLOPs target, ``round_to=16``, the width
of an AVX-512 vector of floats). For each, the table shows the wall time of the pruning
call (graph tracing, surgery, FLOP counts, and for a FLOPs target the bisection), the parameter
and FLOP ratios, and the eval-mode latency of the original and the pruned models, measured in
turns in one process (median of the repetitions). Two ways to say how much of the FLOPs gain
becomes speed (1.0: all of it):

- ``time saved / FLOPs saved``: ``(1 - latency ratio) / (1 - FLOPs ratio)``, the latency
  reduction as a share of the FLOPs reduction;
- ``speedup / FLOPs cut``: ``(1 / latency ratio) / (1 / FLOPs ratio)``, the stricter one.

Run from the repository root::

    python benchmarks/prune_resnet50.py [--batch 8] [--size 224] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
import torchvision
from common import parse_args
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nam_lightning import inject_nam, prune_channels

CONFIGS: list[tuple[str, dict[str, Any]]] = [  # (label, prune_channels keyword arguments)
    ("amount=0.5", {"amount": 0.5, "round_to": None}),
    ("amount=0.5", {"amount": 0.5, "round_to": 8}),
    ("flops_target=0.5", {"flops_target": 0.5, "round_to": None}),
    ("flops_target=0.5", {"flops_target": 0.5, "round_to": 8}),
    ("flops_target=0.5", {"flops_target": 0.5, "round_to": 16}),  # AVX-512: 16 floats a vector
]


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
    args = parse_args(parser, positive=("batch", "size", "repeats", "threads"))
    torch.manual_seed(0)

    model = torchvision.models.resnet50(weights=None, num_classes=1000)
    sites = inject_nam(model)
    randomise_gammas(model)
    model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)  # (B, C, H, W)

    pruned: dict[object, nn.Module] = {}
    reports: dict[int, Any] = {}
    prune_s: dict[int, float] = {}
    for i, (_, kwargs) in enumerate(CONFIGS):
        pruned[i] = copy.deepcopy(model)
        start = time.perf_counter()
        reports[i] = prune_channels(pruned[i], x, **kwargs, measure=False)
        prune_s[i] = time.perf_counter() - start

    # All models take turns in every repetition, so a slow spell of the machine hits them alike.
    models: dict[object, nn.Module] = {"original": model, **pruned}
    seconds: dict[object, list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        for m in models.values():
            forward_seconds(m, x)  # warm-up
        for _ in range(args.repeats):
            for key, m in models.items():
                seconds[key].append(forward_seconds(m, x))
    original = statistics.median(seconds["original"])

    rows = []
    for i, (label, kwargs) in enumerate(CONFIGS):
        report = reports[i]
        latency = statistics.median(seconds[i])
        flops_ratio, latency_ratio = report.flops_ratio, latency / original
        rows.append(
            (
                label,
                str(kwargs["round_to"]),
                f"{prune_s[i]:.1f}",
                f"{report.params_ratio:.3f}",
                f"{flops_ratio:.3f}",
                f"{latency_ratio:.3f}",
                f"{(1 - latency_ratio) / (1 - flops_ratio):.2f}",
                f"{flops_ratio / latency_ratio:.2f}",
                f"{original * 1e3:.0f} -> {latency * 1e3:.0f}",
            )
        )

    print(
        f"resnet50 + NAM at {len(sites)} sites, random BatchNorm gammas, global |gamma|\n"
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, eval mode, batch "
        f"{args.batch} x 3 x {args.size} x {args.size}; latency: median of {args.repeats} "
        "forward passes, the models taking turns\n"
    )
    header = (
        "pruned to",
        "round_to",
        "prune s",
        "params ratio",
        "FLOPs ratio",
        "latency ratio",
        "time saved / FLOPs saved",
        "speedup / FLOPs cut",
        "latency ms",
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
