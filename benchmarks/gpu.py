"""NAM on a GPU: resnet50 in bf16 mixed precision with channels_last, in one command.

Three tables, each measured side by side in this one process (the variants take turns, the
order alternating; times are medians of synchronised wall-clock times):

- training step (SGD, cross-entropy, autocast bf16, channels_last): no NAM, the straightforward
  NAM of ``train_step.py``, and nam_lightning's (``inject_nam``, with ``NAMCallback``'s L1
  penalty step inside the timed step): ms, images/s, ratio to no NAM, the memory one forward
  pass saves for backward and the peak memory of a step;
- one site per stage alone (forward and backward): BatchNorm, BatchNorm + straightforward
  NAM, ours, to show where the training step's overhead comes from;
- inference (eval, inference mode, autocast bf16, channels_last): no NAM, straightforward,
  ours, ours after ``fold_nam``;
- pruning: ours with random BatchNorm gammas pruned to half the FLOPs (``round_to`` None and 8):
  pruning wall time, FLOPs ratio and the folded model's latency ratio.

The issue's goal, printed at the end: ours / no NAM <= 1.05 per training step; and whether
every NAM kernel ran compiled (one whose compiling failed runs eagerly, warns once, and its
timings are not the library's).

Run from the repository root on a machine with a CUDA GPU::

    python benchmarks/gpu.py [--batch 256] [--size 224] [--reps 20] [--warmup 5] [--no-prune]

``--device cpu`` with small shapes (``--batch 4 --size 64 --reps 2 --warmup 1``) checks that
the script runs; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from common import parse_args, take_turns
from prune_resnet50 import print_table, randomise_gammas
from torch import nn
from train_step import (
    StraightforwardNAM,
    add_straightforward_nam,
    build_resnet50,
    saved_for_backward,
)

from nam_lightning import (
    NAM,
    NAMCallback,
    NAMSite,
    fold_nam,
    functional,
    inject_nam,
    kernels,
    prune_channels,
)

MiB = 2**20
STEP_RATIO_GOAL = 1.05  # ours / no NAM per training step, resnet50 bf16 channels_last
PENALTY = 1e-4
TRAIN_VARIANTS = ("no NAM", "straightforward", "ours")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Seconds of ``fn()`` on ``device``, its queued work included."""

    def timed(fn: Callable[[], Any]) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    return timed


def timing_columns(seconds: list[float], base: list[float], batch: int) -> tuple[str, ...]:
    """ms, images/s, ratio to the baseline's median and paired ratio (median over repetitions
    of the time / the baseline's in the same repetition)."""
    median = statistics.median(seconds)
    paired = statistics.median(a / b for a, b in zip(seconds, base, strict=True))
    return (
        f"{median * 1e3:.1f}",
        f"{batch / median:.0f}",
        f"{median / statistics.median(base):.3f}",
        f"{paired:.3f}",
    )


def training(args: argparse.Namespace, base: nn.Module, device: torch.device) -> float:
    """The training table; returns ours / no NAM (median step times)."""
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    models = {key: copy.deepcopy(base) for key in TRAIN_VARIANTS}
    add_straightforward_nam(models["straightforward"])
    inject_nam(models["ours"])
    callback = NAMCallback(PENALTY)
    trainer = types.SimpleNamespace(precision_plugin=types.SimpleNamespace())  # no `scaler`
    steps, saved, peak = {}, {}, {}
    for key, model in models.items():
        model.to(device, memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step(model: nn.Module = model, optimizer: Any = optimizer, key: str = key) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if key == "ours":
                callback.on_before_optimizer_step(trainer, model, optimizer)  # type: ignore[arg-type]
            optimizer.step()

        steps[key] = step
        with torch.autocast(device.type, dtype=torch.bfloat16):
            saved[key], _ = saved_for_backward(model, x)
    for key, step in steps.items():  # the peak of one step, after its first (compiling) one
        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peak[key] = f"{torch.cuda.max_memory_allocated(device) / MiB:.0f}"
        else:
            peak[key] = "-"
    seconds = take_turns(steps, args.reps, args.warmup, timer(device))
    rows = [
        (
            key,
            *timing_columns(times, seconds["no NAM"], args.batch),
            f"{saved[key] / MiB:.0f}",
            f"{(saved[key] - saved['no NAM']) / MiB:+.0f}",
            peak[key],
        )
        for key, times in seconds.items()
    ]
    print(f"\n== training step: batch {args.batch}, {args.reps} repetitions ==")
    print_table(
        (
            "variant",
            "step ms",
            "images/s",
            "x no NAM",
            "paired x",
            "saved MiB",
            "extra MiB",
            "peak MiB",
        ),
        rows,
    )
    return statistics.median(seconds["ours"]) / statistics.median(seconds["no NAM"])


def inference(args: argparse.Namespace, base: nn.Module, device: torch.device) -> None:
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    models = {"no NAM": copy.deepcopy(base), "straightforward": copy.deepcopy(base)}
    add_straightforward_nam(models["straightforward"])
    models["ours"] = copy.deepcopy(base)
    inject_nam(models["ours"])
    for key in ("straightforward", "ours"):  # the same gammas, BatchNorm by BatchNorm
        torch.manual_seed(1)
        randomise_gammas(models[key])
    models["ours folded"] = copy.deepcopy(models["ours"]).eval()
    fold_nam(models["ours folded"])
    outputs: dict[str, torch.Tensor] = {}
    passes = {}
    for key, model in models.items():
        model.to(device, memory_format=torch.channels_last).eval()

        def forward(model: nn.Module = model, key: str = key) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                outputs[key] = model(x)

        passes[key] = forward
    seconds = take_turns(passes, args.reps, args.warmup, timer(device))
    reference = outputs["straightforward"].float()
    rows = [
        (
            key,
            *timing_columns(times, seconds["no NAM"], args.batch),
            "-" if key == "no NAM" else f"{(outputs[key].float() - reference).abs().max():.1e}",
        )
        for key, times in seconds.items()
    ]
    print(f"\n== inference: batch {args.batch}, {args.reps} repetitions ==")
    print_table(
        ("variant", "ms", "images/s", "x no NAM", "paired x", "max |logits - straightforward|"),
        rows,
    )


def sites(args: argparse.Namespace, device: torch.device) -> None:
    """One site per stage alone, forward and backward in training mode: resnet50's last
    BatchNorm of a block (what the site replaces), that BatchNorm followed by the
    straightforward NAM, and ours (one fused step): where the step's overhead comes from.
    Each call is synchronised, so the host's time to launch the kernels counts in full here
    (ours launches more: ~0.7 ms per site forward and backward on a 2-core CPU), while in a
    network step it runs ahead of the GPU's work."""
    rows = []
    for stage, channels in enumerate((256, 512, 1024, 2048), start=1):
        side = args.size // 2 ** (stage + 1)  # 56, 28, 14, 7 at 224 px
        shape = (args.batch, channels, side, side)
        z = torch.randn(shape, device=device, dtype=torch.bfloat16)
        z = z.contiguous(memory_format=torch.channels_last).requires_grad_()
        dy = torch.randn_like(z)
        bn = nn.BatchNorm2d(channels)
        variants = {
            "BatchNorm": bn,
            "straightforward": nn.Sequential(copy.deepcopy(bn), StraightforwardNAM(channels)),
            "ours": NAMSite(copy.deepcopy(bn), NAM(channels)),
        }
        passes = {}
        for key, module in variants.items():
            module.to(device).train()

            def forward_backward(
                module: nn.Module = module, z: torch.Tensor = z, dy: torch.Tensor = dy
            ) -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    y = module(z)
                # the input's and the parameters' gradients, as in a network, but returned
                # rather than accumulated into .grad (an extra pass that no network makes)
                torch.autograd.grad(y, [z, *module.parameters()], dy)

            passes[key] = forward_backward
        seconds = take_turns(passes, args.reps, args.warmup, timer(device))
        for key, times in seconds.items():
            ms, _, ratio, paired = timing_columns(times, seconds["BatchNorm"], args.batch)
            rows.append((f"{stage}", "x".join(map(str, shape[1:])), key, ms, ratio, paired))
    print(f"\n== one site, forward + backward, batch {args.batch}, {args.reps} repetitions ==")
    print_table(("stage", "C x H x W", "variant", "ms", "x BatchNorm", "paired x"), rows)


def pruning(args: argparse.Namespace, base: nn.Module, device: torch.device) -> None:
    model = copy.deepcopy(base)
    inject_nam(model)
    randomise_gammas(model)
    model.to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    models = {"original": model}
    prune_s, flops = {}, {}
    for round_to in (None, 8):
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        report = prune_channels(pruned, x[:1], flops_target=0.5, round_to=round_to, measure=False)
        prune_s[round_to] = time.perf_counter() - start
        flops[round_to] = report.flops_ratio
        models[f"round_to={round_to}"] = pruned
    passes = {}
    for key, m in models.items():
        fold_nam(m)
        m.to(memory_format=torch.channels_last)

        def forward(m: nn.Module = m) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                m(x)

        passes[key] = forward
    seconds = take_turns(passes, args.reps, args.warmup, timer(device))
    base_s = statistics.median(seconds["original"])
    rows = []
    for round_to in (None, 8):
        median = statistics.median(seconds[f"round_to={round_to}"])
        ratio = median / base_s
        rows.append(
            (
                str(round_to),
                f"{prune_s[round_to]:.1f}",
                f"{flops[round_to]:.3f}",
                f"{base_s * 1e3:.1f} -> {median * 1e3:.1f}",
                f"{ratio:.3f}",
                f"{(1 - ratio) / (1 - flops[round_to]):.2f}",
            )
        )
    print(
        f"\n== pruned to half the FLOPs (random gammas), folded, inference as above, "
        f"{args.reps} repetitions =="
    )
    print_table(
        (
            "round_to",
            "prune s",
            "FLOPs ratio",
            "latency ms",
            "latency ratio",
            "saved / FLOPs saved",
        ),
        rows,
    )


def nam_kernels() -> list[tuple[str, kernels.Kernel]]:
    """nam_lightning's compiled kernels by name (a training gate's pair under its kind)."""
    found = []
    for name, value in vars(functional).items():
        if isinstance(value, kernels.Kernel):
            found.append((name, value))
        elif isinstance(value, functional.TrainingKernels):
            found += [
                (f"{name}.statistics", value.statistics),
                (f"{name}.backward", value.backward),
            ]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (224)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up runs per variant (5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--no-prune", action="store_true", help="skip the pruning table")
    args = parse_args(parser, positive=("batch", "size", "reps", "warmup", "threads"))
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here (use --device cpu for a smoke run)")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")

    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"resnet50, {name}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
        f"autocast bf16, channels_last, {args.batch} x 3 x {args.size} x {args.size}; "
        f"{args.warmup} warm-up runs per variant, then {args.reps} in turns; medians"
    )
    torch.manual_seed(0)
    base = build_resnet50()
    start = time.perf_counter()
    ratio = training(args, base, device)
    sites(args, device)
    inference(args, base, device)
    if not args.no_prune:
        pruning(args, base, device)
    verdict = "met" if ratio <= STEP_RATIO_GOAL else "NOT met"
    eager = [name for name, kernel in nam_kernels() if not kernel.enabled]
    print(
        f"\ngoal: training step ours / no NAM <= {STEP_RATIO_GOAL}: {verdict} ({ratio:.3f})"
        + (
            f"\nNAM kernels run eagerly (compiling off or failed; timings invalid): "
            f"{', '.join(eager)}"
            if eager
            else "\nNAM kernels: all compiled"
        )
        + f"\nall of it took {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
