"""What pruning gained: parameters, FLOPs (``torch.utils.flop_counter``) and measured latency."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .utils import as_args, eval_mode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one eval-mode forward pass, as counted by ``torch.utils.flop_counter``.

    The counter covers convolutions and matrix products (a multiply-add is 2 FLOPs);
    elementwise work such as BatchNorm, activations and NAM's gating is not counted.
    """
    return count_forward(model, example_inputs).flops


@dataclass
class ForwardCount:
    """One eval-mode forward pass as :func:`count_flops` counts it, layer by layer."""

    flops: int
    layer_flops: dict[nn.Module, int]  # the FLOPs counted inside each leaf with parameters
    last_layer: nn.Module | None  # the last leaf with parameters to run (the classifier)
    output_batch: int | None  # the leading size of the output (its first tensor)


def count_forward(model: nn.Module, example_inputs: Any) -> ForwardCount:
    """:func:`count_flops`, with the FLOPs of each leaf module that has parameters and the
    order in which they ran."""
    leaves = [
        m
        for m in model.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    layer_flops: dict[nn.Module, int] = {}
    ran: list[nn.Module] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        counter = stack.enter_context(FlopCounterMode(display=False))
        started: dict[nn.Module, int] = {}

        def before(module: nn.Module, args: Any) -> None:
            started[module] = counter.get_total_flops()

        def after(module: nn.Module, args: Any, output: Any) -> None:
            flops = counter.get_total_flops() - started.pop(module)
            layer_flops[module] = layer_flops.get(module, 0) + flops
            ran.append(module)

        for leaf in leaves:
            stack.enter_context(leaf.register_forward_pre_hook(before))
            stack.enter_context(leaf.register_forward_hook(after))
        output = model(*as_args(example_inputs))
    first = next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor)), None)
    return ForwardCount(
        flops=int(counter.get_total_flops()),
        layer_flops=layer_flops,
        last_layer=ran[-1] if ran else None,
        output_batch=int(first.shape[0]) if first is not None and first.dim() else None,
    )


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 5) -> float:
    """Median seconds of an eval-mode forward pass (after one warm-up), CUDA-synchronised."""
    return measure_latencies([model], example_inputs, repeats)[0]


def measure_latencies(models: list[nn.Module], example_inputs: Any, repeats: int) -> list[float]:
    """:func:`measure_latency` of each model, the models taking turns in every repetition so
    that a slow spell of a shared machine hits all of them alike."""
    args = as_args(example_inputs)
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    times: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(eval_mode(model))
        for i in range(repeats + 1):
            for model, samples in zip(models, times, strict=True):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(*args)
                if cuda:
                    torch.cuda.synchronize()
                if i:  # the first round warms up
                    samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of each convolution and linear layer, by name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            out[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            out[name] = int(module.out_features)
    return out


@dataclass
class PruneReport:
    """The outcome of :func:`~nam_lightning.prune_channels`.

    ``threshold`` is the largest importance among the removed channels (with
    ``importance="bn"``, a raw ``|gamma|``); ``latency_*`` are median seconds of an eval-mode
    forward pass on the example batch, measured side by side, or ``None`` when not measured.
    ``seconds`` is the whole call: ``surgery_seconds`` counting FLOPs, tracing, choosing and
    cutting channels, ``measure_seconds`` timing the model (``latency_*``).
    """

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    threshold: float | None
    removed_channels: int
    importance: str
    scope: str
    amount: float | None = None
    flops_target: float | None = None
    latency_before: float | None = None
    latency_after: float | None = None
    device: str = "cpu"
    seconds: float = 0.0
    surgery_seconds: float = 0.0
    measure_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        """FLOPs after / before."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def speedup(self) -> float | None:
        if self.latency_before is None or not self.latency_after:
            return None
        return self.latency_before / self.latency_after

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain numbers, strings, lists and dicts)."""
        out = asdict(self)
        out.update(flops_ratio=self.flops_ratio, params_ratio=self.params_ratio)
        out["speedup"] = self.speedup
        return out

    def table(self) -> str:
        """A readable summary table."""

        def ms(s: float | None) -> str:
            return "-" if s is None else f"{s * 1e3:.2f} ms"

        speedup = "-" if self.speedup is None else f"{self.speedup:.2f}x faster"
        rows = [
            ("", "before", "after", "change"),
            (
                "params",
                f"{self.params_before:,}",
                f"{self.params_after:,}",
                f"{1 / self.params_ratio:.2f}x fewer" if self.params_ratio else "-",
            ),
            (
                "FLOPs",
                f"{self.flops_before:,}",
                f"{self.flops_after:,}",
                f"{1 / self.flops_ratio:.2f}x fewer" if self.flops_ratio else "-",
            ),
            (f"latency ({self.device})", ms(self.latency_before), ms(self.latency_after), speedup),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        threshold = "-" if self.threshold is None else f"{self.threshold:.3g}"
        lines.append(
            f"removed {self.removed_channels} channels ({self.importance} importance, "
            f"{self.scope} threshold {threshold}) in {self.seconds:.2f} s (surgery "
            f"{self.surgery_seconds:.2f} s, timing {self.measure_seconds:.2f} s)"
        )
        changed = [
            (n, self.channels_before[n], c)
            for n, c in self.channels_after.items()
            if n in self.channels_before and c != self.channels_before[n]
        ]
        for name, before, after in changed:
            lines.append(f"  {name}: {before} -> {after}")
        return "\n".join(lines + self.notes)

    def __str__(self) -> str:
        return self.table()
