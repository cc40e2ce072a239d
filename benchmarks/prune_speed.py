"""How long pruning takes, next to Torch-Pruning's own pruner, on resnet50 with NAM.

A torchvision resnet50 gets NAM at its 16 blocks and random BatchNorm scale factors (a fresh
model has every gamma at 1: a tie, nothing to rank). Three ways to prune a fresh copy of it are
timed side by side, taking turns in every repetition (median of ``--repeats``):

- ``torch-pruning``: Torch-Pruning's own ``MetaPruner`` with ``BNScaleImportance``, global,
  ``pruning_ratio=0.5``, the classifier ignored: trace the model and cut, nothing else;
- ``amount=0.5``: ``prune_channels(model, x, amount=0.5, measure=False)``;
- ``flops_target=0.5``: ``prune_channels(model, x, flops_target=0.5, measure=False)``.

``prune_channels`` also checks its arguments, counts the FLOPs before and after, and keeps
every layer within ``max_layer_amount``; its report splits its time into surgery (tracing,
choosing, cutting, counting FLOPs) and timing the model (none here: ``measure=False``).
Targets: ``amount=0.5`` at most 1.5x Torch-Pruning's time, ``flops_target=0.5`` at most 2x
``amount=0.5``'s and within 2% of half the FLOPs.

Run from the repository root::

    python benchmarks/prune_speed.py [--batch 8] [--size 224] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
import torchvision
from common import image_parser, parse_args, take_turns
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nam_lightning import PruneReport, inject_nam, prune_channels
from nam_lightning.report import count_flops

AMOUNT_TARGET = 1.5  # amount=0.5 / Torch-Pruning
FLOPS_TARGET = 2.0  # flops_target=0.5 / amount=0.5


def torch_pruning(model: nn.Module, x: torch.Tensor) -> None:
    """Torch-Pruning's own global BatchNorm-scale pruner at half the channels."""
    assert isinstance(model, torchvision.models.ResNet)
    with torch.enable_grad():  # tracing needs autograd
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.BNScaleImportance(),
            global_pruning=True,
            pruning_ratio=0.5,
            ignored_layers=[model.fc],
        )
        pruner.step()


def main() -> None:
    parser = image_parser(__doc__, 3, "timed runs of each")
    args = parse_args(parser, positive=("batch", "size", "repeats", "threads"))
    torch.manual_seed(0)

    model = torchvision.models.resnet50(weights=None, num_classes=1000)
    sites = inject_nam(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.0)
    model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)  # (B, C, H, W)

    reports: dict[str, list[PruneReport]] = {"amount=0.5": [], "flops_target=0.5": []}
    pruned: dict[str, nn.Module] = {}

    def run(name: str, prune: Callable[[nn.Module], Any]) -> Callable[[], float]:
        def timed() -> float:
            copied = copy.deepcopy(model)  # not timed
            start = time.perf_counter()
            report = prune(copied)
            seconds = time.perf_counter() - start
            if report is not None:
                reports[name].append(report)
            pruned[name] = copied
            return seconds

        return timed

    runs = {
        "torch-pruning": run("torch-pruning", lambda m: torch_pruning(m, x)),
        "amount=0.5": run("amount=0.5", lambda m: prune_channels(m, x, 0.5, measure=False)),
        "flops_target=0.5": run(
            "flops_target=0.5", lambda m: prune_channels(m, x, flops_target=0.5, measure=False)
        ),
    }
    seconds = take_turns(runs, args.repeats, warmup=1, timer=lambda fn: fn())
    median = {name: statistics.median(times) for name, times in seconds.items()}

    print(
        f"resnet50 + NAM at {len(sites)} sites, random BatchNorm gammas; CPU, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x 3 x "
        f"{args.size} x {args.size}; median of {args.repeats} runs, taking turns\n"
    )
    flops = count_flops(model, x)
    header = ("pruner", "seconds", "runs", "surgery s", "FLOPs ratio")
    rows = []
    for name, times in seconds.items():
        done = reports.get(name)
        surgery = f"{statistics.median(r.surgery_seconds for r in done):.2f}" if done else "-"
        ratio = count_flops(pruned[name], x) / flops
        runs_s = " ".join(f"{t:.2f}" for t in times)
        rows.append((name, f"{median[name]:.2f}", runs_s, surgery, f"{ratio:.4f}"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print()
    amount_ratio = median["amount=0.5"] / median["torch-pruning"]
    flops_ratio = median["flops_target=0.5"] / median["amount=0.5"]
    landing = abs(count_flops(pruned["flops_target=0.5"], x) / flops - 0.5)
    for label, value, target in (
        ("amount=0.5 / torch-pruning", amount_ratio, AMOUNT_TARGET),
        ("flops_target=0.5 / amount=0.5", flops_ratio, FLOPS_TARGET),
    ):
        verdict = "met" if value <= target else "NOT met"
        print(f"{label}: {value:.2f}x (target <= {target}x: {verdict})")
    verdict = "met" if landing <= 0.02 else "NOT met"
    print(f"flops_target=0.5 landed {landing:.4f} from half the FLOPs (target <= 0.02: {verdict})")


if __name__ == "__main__":
    main()
