"""What NAM costs in a CPU training step: no NAM vs a straightforward NAM vs nam_lightning's.

For each model, three variants are built from the same seed and weights:

- ``no NAM``: the plain network;
- ``straightforward``: NAM as a user would write it, defined in this file (a BatchNorm, the
  ``|gamma| / sum |gamma|`` weights, permute, multiply, permute back, sigmoid, gate the input),
  placed at the library's sites (after ``bn2`` of a BasicBlock, ``bn3`` of a Bottleneck,
  before the residual addition);
- ``ours``: ``nam_lightning.inject_nam(model)`` with its defaults, so this script measures
  whatever the library's NAM currently does.

Every variant runs full SGD training steps (zero_grad, forward, cross-entropy, backward,
optimizer step) in train mode. After warm-up steps the variants take turns for ``--reps``
repetitions, the order alternating between repetitions, and the table shows the median step
time. Both NAM variants train the paper's method, NAM with the L1 penalty on the BatchNorm
scale factors (NAM's own and the backbone's, weight 1e-4): the straightforward one as a user
would write it, ``+ 1e-4 * sum |gamma|`` added to the loss, over the BatchNorms found in the
model each step; ours with ``NAMCallback(1e-4).on_before_optimizer_step`` between backward and
the optimizer step (as Lightning does), which is also timed on its own. Memory is what one
training-mode forward pass saves for backward: the tensors
``torch.autograd.graph.saved_tensors_hooks`` sees, counted once per underlying storage.

Run from the repository root::

    python benchmarks/train_step.py [--model resnet50|cifar_resnet18|small_resnet|all]
                                    [--reps 10] [--warmup 2] [--threads 2] [--quick]
                                    [--profile]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision
from common import parse_args
from torch import nn
from torchvision.models import resnet

from nam_lightning import inject_nam
from nam_lightning.callback import NAMCallback
from nam_lightning.models import small_resnet

MiB = 2**20
PENALTY = 1e-4
# The targets, checked on resnet50.
STEP_RATIO_TARGET = 1.04  # ours / no NAM, step time
SMALL_RATIO_TARGET = 1.10  # the same on small_resnet (and at most the straightforward NAM's)
EXTRA_MEMORY_TARGET = 0.5  # ours' extra saved memory / the straightforward NAM's extra
EXTRA_MEMORY_FUSED_TARGET = 0.1  # the same, once a fused BN -> NAM path exists
VARIANTS = ("no NAM", "straightforward", "ours")


class StraightforwardNAM(nn.Module):
    """NAM channel attention written plainly: ``x * sigmoid(w * BN(x))``, w = |gamma|/sum|gamma|."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        z = self.bn(x)
        gamma = self.bn.weight.detach().abs()
        w = (gamma / gamma.sum()).to(z.dtype)  # (C,), in the dtype of z under autocast
        z = z.permute(0, 2, 3, 1) * w  # (N, H, W, C)
        z = z.permute(0, 3, 1, 2)  # (N, C, H, W)
        return torch.sigmoid(z) * x


def add_straightforward_nam(model: nn.Module) -> int:
    """Put StraightforwardNAM after each residual branch's last BN; returns the site count."""
    sites = 0
    for block in model.modules():
        if isinstance(block, resnet.Bottleneck):
            block.bn3 = nn.Sequential(block.bn3, StraightforwardNAM(block.bn3.num_features))
        elif isinstance(block, resnet.BasicBlock):
            block.bn2 = nn.Sequential(block.bn2, StraightforwardNAM(block.bn2.num_features))
        else:
            continue
        sites += 1
    return sites


def build_resnet50() -> nn.Module:
    return torchvision.models.resnet50(weights=None, num_classes=1000)


def build_cifar_resnet18() -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=100)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


# name -> (builder, batch, image size, classes)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, int, int]] = {
    "resnet50": (build_resnet50, 8, 224, 1000),
    "cifar_resnet18": (build_cifar_resnet18, 128, 32, 100),
    # the command line's default job: digits-sized maps, where NAM's fixed cost per call shows
    "small_resnet": (lambda: small_resnet(10), 64, 8, 10),
}


@dataclass
class Variant:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sites: int
    penalty: bool = False
    l1_in_loss: bool = False
    step_ms: list[float] = field(default_factory=list)
    penalty_ms: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    logits: torch.Tensor | None = None
    last_loss: float = float("nan")


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the unique storages saved for backward by one forward pass, and its output."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(storages.values()), out.detach()


def train_step(
    v: Variant,
    x: torch.Tensor,
    y: torch.Tensor,
    callback: NAMCallback,
    trainer: object,
) -> None:
    start = time.perf_counter()
    v.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(v.model(x), y)
    if v.l1_in_loss:
        bns = [m for m in v.model.modules() if isinstance(m, nn.BatchNorm2d)]
        loss = loss + PENALTY * sum(bn.weight.abs().sum() for bn in bns)
    loss.backward()
    if v.penalty:
        p_start = time.perf_counter()
        callback.on_before_optimizer_step(trainer, v.model, v.optimizer)  # type: ignore[arg-type]
        v.penalty_ms.append((time.perf_counter() - p_start) * 1e3)
    v.optimizer.step()
    v.step_ms.append((time.perf_counter() - start) * 1e3)
    v.last_loss = loss.item()


def bench_model(name: str, reps: int, warmup: int, profile: bool = False) -> dict[str, Variant]:
    builder, batch, size, classes = MODELS[name]
    torch.manual_seed(0)
    base = builder().train()
    x = torch.randn(batch, 3, size, size)  # (B, C, H, W)
    y = torch.randint(0, classes, (batch,))

    models = {key: copy.deepcopy(base) for key in VARIANTS}
    sites = {
        "no NAM": 0,
        "straightforward": add_straightforward_nam(models["straightforward"]),
        "ours": len(inject_nam(models["ours"])),
    }
    if sites["straightforward"] != sites["ours"]:
        raise RuntimeError(f"site counts differ: {sites}")
    variants = {}
    for key, model in models.items():
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        variants[key] = Variant(
            model,
            optimizer,
            sites[key],
            penalty=key == "ours",
            l1_in_loss=key == "straightforward",
        )

    # Memory first, while all variants still hold the same weights (their outputs must agree).
    for v in variants.values():
        v.saved_bytes, v.logits = saved_for_backward(v.model, x)

    callback = NAMCallback(PENALTY)
    trainer = types.SimpleNamespace(precision_plugin=types.SimpleNamespace())  # no `scaler`
    order = list(variants.values())
    for _ in range(warmup):
        for v in order:
            train_step(v, x, y, callback, trainer)
    for v in order:
        v.step_ms.clear()
        v.penalty_ms.clear()
    for rep in range(reps):
        for v in order if rep % 2 == 0 else order[::-1]:
            train_step(v, x, y, callback, trainer)
    for key, v in variants.items():
        if not torch.isfinite(torch.tensor(v.last_loss)):
            raise RuntimeError(f"{name} {key}: the loss became {v.last_loss}")

    print_table(name, batch, size, variants)
    if profile:
        print_profiles(name, variants, x, y, callback, trainer, reps)
    return variants


def print_profiles(
    name: str,
    variants: dict[str, Variant],
    x: torch.Tensor,
    y: torch.Tensor,
    callback: NAMCallback,
    trainer: object,
    steps: int,
) -> None:
    """PyTorch's profiler over ``steps`` more training steps of each variant: the operators
    that take the most CPU time, their calls and the total, to see where a variant's extra
    time goes."""
    from torch.profiler import ProfilerActivity, profile

    for key, v in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(v, x, y, callback, trainer)
        events = prof.key_averages()
        total_us = sum(e.self_cpu_time_total for e in events)
        print(f"\n-- {name}, {key}: {steps} steps, self CPU time {total_us / 1e3:.1f} ms --")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"{e.key:<40} {e.count:>6} calls {e.self_cpu_time_total / 1e3:>9.1f} ms")


def paired_ratio(v: Variant, base: Variant) -> float:
    """Median over repetitions of this variant's step time / no NAM's in the same repetition."""
    return statistics.median(a / b for a, b in zip(v.step_ms, base.step_ms, strict=True))


def print_table(name: str, batch: int, size: int, variants: dict[str, Variant]) -> None:
    base = variants["no NAM"]
    plain = variants["straightforward"]
    base_ms = statistics.median(base.step_ms)
    plain_extra = plain.saved_bytes - base.saved_bytes
    header = (
        "variant",
        "step ms",
        "min-max ms",
        "x no NAM",
        "paired x",
        "saved MiB",
        "extra MiB",
        "extra / straightforward's",
    )
    rows = []
    for key, v in variants.items():
        median = statistics.median(v.step_ms)
        extra = v.saved_bytes - base.saved_bytes
        rows.append(
            (
                key,
                f"{median:.0f}",
                f"{min(v.step_ms):.0f}-{max(v.step_ms):.0f}",
                f"{median / base_ms:.3f}",
                f"{paired_ratio(v, base):.3f}",
                f"{v.saved_bytes / MiB:.0f}",
                "-" if v is base else f"{extra / MiB:+.0f}",
                "-" if v is base or plain_extra == 0 else f"{extra / plain_extra:.3f}",
            )
        )
    print(
        f"\n== {name}: batch {batch} x 3 x {size} x {size}, NAM at {plain.sites} sites, "
        f"{len(base.step_ms)} repetitions, load average now {load()} =="
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            row[0].ljust(widths[0])
            + "".join("  " + c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        )
    ours = variants["ours"]
    assert plain.logits is not None and ours.logits is not None
    diff = (ours.logits - plain.logits).abs().max().item()
    penalty = statistics.median(ours.penalty_ms)
    print(
        f"max |logits(ours) - logits(straightforward)| at equal weights: {diff:.2e}\n"
        f"penalty step (NAMCallback({PENALTY:g}).on_before_optimizer_step, inside ours' step): "
        f"{penalty:.2f} ms = {100 * penalty / statistics.median(ours.step_ms):.3f}% of the step"
    )


def verdicts(variants: dict[str, Variant], busy: bool) -> None:
    base, plain, ours = (variants[k] for k in VARIANTS)
    base_ms = statistics.median(base.step_ms)
    ratio = statistics.median(ours.step_ms) / base_ms
    plain_ratio = statistics.median(plain.step_ms) / base_ms
    plain_extra = plain.saved_bytes - base.saved_bytes
    fraction = (ours.saved_bytes - base.saved_bytes) / plain_extra if plain_extra else float("nan")

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    # A slow spell of a shared machine can hit one variant's steps more than another's, so the
    # ratio of medians alone can pass by luck: the paired ratio must meet the target too.
    paired = paired_ratio(ours, base)
    print("\n== targets (resnet50) ==")
    if busy:
        print("(the machine was busy: the step-time verdict is unreliable, rerun on a quiet one)")
    print(
        f"{verdict(max(ratio, paired) <= STEP_RATIO_TARGET)}  step time ours / no NAM = "
        f"{ratio:.3f}, paired {paired:.3f}, both <= {STEP_RATIO_TARGET} (straightforward in the "
        f"same run: {plain_ratio:.3f}, paired {paired_ratio(plain, base):.3f})"
    )
    print(
        f"{verdict(fraction <= EXTRA_MEMORY_TARGET)}  extra saved memory ours / straightforward "
        f"= {fraction:.3f} <= {EXTRA_MEMORY_TARGET}"
    )
    print(
        f"{verdict(fraction <= EXTRA_MEMORY_FUSED_TARGET)}  extra saved memory ours / "
        f"straightforward = {fraction:.3f} <= {EXTRA_MEMORY_FUSED_TARGET} "
        "(required once a fused BN -> NAM path exists)"
    )


def small_map_verdict(variants: dict[str, Variant], busy: bool) -> None:
    """Issue 19's line for the default job: ours at most the straightforward NAM's ratio (both
    with their L1 penalty) and at most SMALL_RATIO_TARGET of no NAM's step."""
    base, plain, ours = (variants[k] for k in VARIANTS)
    base_ms = statistics.median(base.step_ms)
    ratio = statistics.median(ours.step_ms) / base_ms
    plain_ratio = statistics.median(plain.step_ms) / base_ms
    paired, plain_paired = paired_ratio(ours, base), paired_ratio(plain, base)
    ok = ratio <= min(plain_ratio, SMALL_RATIO_TARGET) and paired <= min(
        plain_paired, SMALL_RATIO_TARGET
    )
    print("\n== target (small_resnet) ==")
    if busy:
        print("(the machine was busy: the step-time verdict is unreliable, rerun on a quiet one)")
    print(
        f"{'PASS' if ok else 'FAIL'}  step time ours / no NAM = {ratio:.3f}, paired {paired:.3f}; "
        f"straightforward {plain_ratio:.3f}, paired {plain_paired:.3f}; ours at most the "
        f"straightforward's and at most {SMALL_RATIO_TARGET}, both ways"
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant (2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 3 repetitions")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then profile --reps more steps of each variant (PyTorch's profiler, top operators)",
    )
    args = parse_args(parser, positive=("reps", "threads"))
    if args.quick:
        args.reps = 3
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_name()} ({os.cpu_count()} CPUs), "
        f"Python {platform.python_version()}\n"
        f"load average at start: {load()}\n"
        f"SGD (lr 0.01, momentum 0.9, weight decay 5e-4), cross-entropy, train mode; "
        f"{args.warmup} warm-up steps per variant, then {args.reps} repetitions with the "
        "variants taking turns (order alternating); step ms is the median. Saved MiB: unique "
        "storages saved for backward by one forward pass. paired x: median over repetitions "
        "of the step time / no NAM's in the same repetition."
    )
    start_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = start_load > (os.cpu_count() or 1) - args.threads + 0.5
    if busy:
        print(
            f"WARNING: load average {start_load:.2f} on {os.cpu_count()} CPUs: other processes "
            "compete for the cores, so the step times (even the ratios) are unreliable."
        )
    names = list(MODELS) if args.model == "all" else [args.model]
    results = {name: bench_model(name, args.reps, args.warmup, args.profile) for name in names}
    print(f"\nload average at end: {load()}")
    if "resnet50" in results:
        verdicts(results["resnet50"], busy)
    if "small_resnet" in results:
        small_map_verdict(results["small_resnet"], busy)
    if not {"resnet50", "small_resnet"} & set(results):
        print("\n(the targets are checked on resnet50 and small_resnet, not measured in this run)")


if __name__ == "__main__":
    main()
