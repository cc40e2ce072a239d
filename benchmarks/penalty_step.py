"""Cost of NAMCallback's per-step work relative to a resnet18 training step, on CPU.

Every optimizer step, ``NAMCallback.on_before_optimizer_step`` collects the stepped parameters'
ids, finds the scale factors (``scale_factors``) and adds ``lambda_ * sign(gamma)`` to their
gradients (``add_l1_subgradient_``); with ``log_on="step"`` its ``_log`` then computes
``l1_penalty`` and ``sparsity`` after every batch. This script times those two pieces, calling
the callback's own methods with minimal stand-ins for the trainer and the LightningModule,
against a full training step (forward, backward, SGD step) of a torchvision resnet18 with NAM on
CIFAR-sized input. The measurements alternate in one process; the table shows medians over the
repetitions. The target: the penalty step costs under 1% of a training step.

Run from the repository root::

    python benchmarks/penalty_step.py [--steps 20] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable

import torch
import torchvision
from common import parse_args
from torch import nn

from nam_lightning import inject_nam, scale_factors
from nam_lightning.callback import NAMCallback

TARGET_PERCENT = 1.0
HOOK_CALLS = 50  # callback calls per repetition: one takes well under a millisecond
WARMUP = 3


class StandInModule(nn.Module):
    """What NAMCallback touches of a LightningModule: its submodules and ``log``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def log(self, *args: object, **kwargs: object) -> None:
        """Lightning's own logging is not part of what is measured."""


def ms_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parse_args(parser, positive=("steps", "batch", "threads"))
    torch.manual_seed(0)

    net = torchvision.models.resnet18(weights=None, num_classes=100)
    sites = inject_nam(net)
    module = StandInModule(net).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, 32, 32)  # (B, C, H, W)
    y = torch.randint(0, 100, (args.batch,))

    callback = NAMCallback(lambda_=1e-4, targets="all", log_on="step")
    trainer = types.SimpleNamespace(precision_plugin=types.SimpleNamespace())  # no `scaler`

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()

    def penalty_step() -> None:
        callback.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]

    def logging() -> None:
        callback._log(module, on_step=True)  # type: ignore[arg-type]

    for _ in range(WARMUP):
        train_step()
        penalty_step()
        logging()
    targets = scale_factors(module, "all")
    assert all(p.grad is not None for p in targets), "the penalty would have nothing to do"

    step_ms, penalty_ms, logging_ms = [], [], []
    for _ in range(args.steps):
        step_ms.append(ms_per_call(train_step, 1))
        penalty_ms.append(ms_per_call(penalty_step, HOOK_CALLS))
        logging_ms.append(ms_per_call(logging, HOOK_CALLS))

    print(
        f"resnet18 + NAM at {len(sites)} sites, {len(targets)} scale-factor tensors "
        f"({sum(p.numel() for p in targets)} values), targets='all'\n"
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch} x 3 x 32 x 32, SGD; {args.steps} repetitions "
        f"(penalty and logging: {HOOK_CALLS} calls each per repetition)\n"
    )
    header = ("", "step ms", "penalty ms", "penalty %", "logging ms", "logging %")
    print("{:<8}{:>10}{:>12}{:>11}{:>12}{:>11}".format(*header))
    for label, stat in (("median", statistics.median), ("min", min), ("max", max)):
        step, penalty, log = stat(step_ms), stat(penalty_ms), stat(logging_ms)
        print(
            f"{label:<8}{step:>10.1f}{penalty:>12.3f}{100 * penalty / step:>11.3f}"
            f"{log:>12.3f}{100 * log / step:>11.3f}"
        )
    ratio = 100 * statistics.median(penalty_ms) / statistics.median(step_ms)
    verdict = "met" if ratio < TARGET_PERCENT else "MISSED"
    print(f"\ntarget: penalty step < {TARGET_PERCENT:g}% of a training step (median): {verdict}")


if __name__ == "__main__":
    main()
