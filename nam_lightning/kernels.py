"""How NAM's computation runs: the compiled kernels' machinery, and which path a site takes.

:mod:`nam_lightning.functional` holds NAM's math as plain functions; each runs here as a
:class:`Kernel`: the function compiled by ``torch.compile`` into one fused loop (eager PyTorch
makes a pass over memory per operator), with the Inductor options and recompile limit it
needs, and the plain function itself where compiling is off, fails, or something traces it.

:func:`choose_path` decides, at each call, which path a NAM site takes (see :class:`Path`).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

# Inductor stores an intermediate to memory once it is read by several reductions or grows
# past an operation count; in these kernels every intermediate is cheaper to recompute than to
# store and load again. And the C++ compiler may fuse a multiply and an add into one FMA (one
# rounding, not two). Option names and types vary between torch versions, and torch.compile
# refuses one it does not know (the kernels would then run eagerly): each entry lists its
# spellings, newest first, and the first one this torch knows is taken.
_INDUCTOR_WISHES: list[dict[str, str | int | bool]] = [
    {"realize_reads_threshold": 1000},
    {"realize_opusers_threshold": 1000},
    # recent torch has a CPU threshold and an override for every device; older torch has the
    # override alone, which then serves the CPU
    {"realize_cpu_opcount_threshold": 1000, "realize_opcount_threshold": 1000},
    {"realize_cpu_acc_reads_threshold": 1000, "realize_acc_reads_threshold": 1000},
    # a mode ("off", "on", "fast") in recent torch; a bool in older torch, where True leaves out
    # -ffp-contract=off and the compiler contracts
    {"cpp.enable_floating_point_contract_flag": "fast"},
]


def inductor_options(known: dict[str, Any]) -> dict[str, str | int | bool | Callable[..., Any]]:
    """The Inductor options the kernels ask for that an Inductor whose configuration is
    ``known`` (name -> current value) accepts, each under its first known spelling and with a
    value of the type it has there."""
    options: dict[str, str | int | bool | Callable[..., Any]] = {}
    for spellings in _INDUCTOR_WISHES:
        for name, value in spellings.items():
            if name in known:
                current = known[name]
                if isinstance(current, bool) and not isinstance(value, bool):
                    value = True  # the older on/off form of a mode
                options[name] = value
                break
    return options


# Shapes are symbolic, but dtypes, memory layouts, eps values, sizes of 1 and affine or not each
# compile a variant; past torch.compile's default of 8 per function a kernel would run eagerly
# from then on (a process that validates, prunes and exports meets many). Recent versions of
# torch.compile take a per-function limit (RECOMPILE_LIMIT holds it as keyword arguments); older
# ones (torch 2.11, say) only Dynamo's global one, which a kernel then raises while it runs.
_VARIANTS = 64
RECOMPILE_LIMIT: dict[str, Any] = {}
if "recompile_limit" in inspect.signature(torch.compile).parameters:
    RECOMPILE_LIMIT["recompile_limit"] = _VARIANTS


def _variants_scope() -> contextlib.AbstractContextManager[Any]:
    """For a torch.compile that takes no per-function limit: Dynamo's global one raised to
    ``_VARIANTS`` (never lowered) for the duration of a kernel's call."""
    from torch._dynamo import config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(name, max(_VARIANTS, getattr(dynamo_config, name)))


class Kernel:
    """``fn`` compiled by ``torch.compile`` into one fused loop, or ``fn`` itself where
    compiling is off (``NAM_LIGHTNING_COMPILE=0``) or fails (no C++ compiler): then once a
    warning, and eager from there on."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.enabled = os.environ.get("NAM_LIGHTNING_COMPILE", "1") != "0"

    def __call__(self, *args: Any) -> Any:
        # Under torch.compile/export, TorchScript tracing (the older ONNX exporter), FX
        # symbolic tracing (its proxies stand for tensors) and a dispatch mode (FlopCounterMode,
        # fake tensors; torch.compile refuses to run under one) the caller takes the plain
        # operators.
        tracing = (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or is_in_torch_dispatch_mode()
            or any(isinstance(a, torch.fx.Proxy) for a in args)
        )
        if not self.enabled or tracing:
            return self.fn(*args)
        try:
            if self.compiled is None:
                from torch._inductor import config as inductor_config

                self.compiled = torch.compile(
                    self.fn,
                    dynamic=True,
                    fullgraph=True,
                    options=inductor_options(inductor_config.get_config_copy()),
                    **RECOMPILE_LIMIT,
                )
            if RECOMPILE_LIMIT:
                return self.compiled(*args)
            with _variants_scope():
                return self.compiled(*args)
        # torch.compile refuses options it does not know at once; a missing toolchain shows up
        # at the first call
        except Exception as err:
            # Where the plain operators fail as well, the inputs are at fault, not compiling:
            # their error propagates and the kernel stays compiled.
            result = self.fn(*args)
            self.enabled = False
            first_line = next(iter(str(err).strip().splitlines()), "")[:200]
            warnings.warn(
                f"nam_lightning: compiling the NAM kernels failed ({type(err).__name__}: "
                f"{first_line}); running them eagerly (exact, but slower).",
                stacklevel=2,
            )
            return result


# --- which path a site takes --------------------------------------------------------------


class Path(enum.Enum):
    """How NAM runs at one call. "Alone": NAM on its own input ``x`` (its BatchNorm normalises
    ``x``); "fused": NAM together with the BatchNorm before it, from that BatchNorm's input.
    The kernels' training paths keep only their input for backward; the small and plain paths
    keep what PyTorch's operators keep (two more activation-sized tensors per site)."""

    ALONE = "alone"  # training: the gate's kernels, saving only x
    FUSED = "fused"  # training: both BatchNorms and the gate in the kernels, saving only z
    SMALL = "small"  # training, small map: PyTorch's operators (a site: its module, then NAM)
    EVAL_ALONE = "eval alone"  # no gradient: the gate from running statistics, one pass
    EVAL_FUSED = "eval fused"  # the same with the BatchNorm before it folded in
    PLAIN = "plain"  # PyTorch's operators (for a site: its module, then NAM on its own)


# A feature map of at most this many elements (float32/float64) runs PyTorch's operators, in a
# training step (Path.SMALL) and in inference (Path.PLAIN): each compiled call has a fixed cost
# (Dynamo's guards, the wrappers around the compiled code) which, on maps this small, exceeds what
# its fewer passes over memory save, while the two extra activations the operators keep for
# backward are small. docs/performance.md has the measurements.
SMALL_MAP = 2**17

# Under torch.compile(model) the training function is traced into the model's graph. torch
# 2.14 traces it exactly (tests/test_functional.py); Dynamo of torch 2.11 mis-wires its saved
# tensors (a fused site's gradients come out wrong, NAM alone fails to trace). Before 2.14 a
# model being compiled takes the plain operators, which Inductor fuses itself.
TRACEABLE = torch.__version__ >= "2.14"  # a TorchVersion: compares as a version


def choose_path(x: torch.Tensor, nam_bn: nn.Module, bn: nn.Module | None = None) -> Path:
    """The path of NAM's channel gate with BatchNorm ``nam_bn`` on input ``x``; with ``bn``,
    of the site where ``bn`` comes first and ``x`` is its input.

    The kernels reproduce PyTorch's BatchNorm for an (N, C, H, W) input of a dtype they take
    (:func:`_kernel_dtypes`), in two cases: every BatchNorm plain, affine and in training mode
    under autograd (SyncBatchNorm needs its cross-device statistics: not covered), or every
    BatchNorm normalising with running statistics under no gradient (under autograd in eval
    mode the plain operators run, so gradients stay PyTorch's). On a float32/float64 map of at
    most :data:`SMALL_MAP` elements, training takes :attr:`Path.SMALL` instead and inference
    :attr:`Path.PLAIN` (a low-precision map keeps the kernels, which round once). Anything else
    is :attr:`Path.PLAIN`.
    """
    norms = (nam_bn,) if bn is None else (bn, nam_bn)
    compiling = torch.compiler.is_compiling()
    small = not compiling and _small(x)
    if torch.is_grad_enabled():
        applies = (TRACEABLE or not compiling) and all(map(_trains, norms))
        path = Path.SMALL if small else Path.ALONE if bn is None else Path.FUSED
    else:  # on a small map the operators are the faster way here too: Path.PLAIN
        applies = not small and all(map(_uses_running_stats, norms))
        path = Path.EVAL_ALONE if bn is None else Path.EVAL_FUSED
    if applies and x.dim() == 4 and all(_kernel_dtypes(x, m) for m in norms):
        return path
    return Path.PLAIN


def _small(x: torch.Tensor) -> bool:
    """A float32/float64 map of at most :data:`SMALL_MAP` elements (under torch.compile(model)
    the rule is not applied: a size test would add a guard to the model's graph)."""
    return x.numel() <= SMALL_MAP and x.dtype in (torch.float32, torch.float64)


def _plain_bn(bn: nn.Module) -> bool:
    # Lightning turns SyncBatchNorm back into its own `_BatchNormXd` after DDP: same forward.
    return type(bn) is nn.BatchNorm2d or type(bn).__name__ == "_BatchNormXd"


def _trains(bn: nn.Module) -> bool:
    """A plain, affine BatchNorm normalising with batch statistics."""
    return _plain_bn(bn) and bn.training and bool(getattr(bn, "affine", False))


def _uses_running_stats(bn: nn.Module) -> bool:
    """A BatchNorm (SyncBatchNorm included: the same in eval mode) in eval mode with running
    statistics."""
    return (
        (_plain_bn(bn) or type(bn) is nn.SyncBatchNorm)
        and not bn.training
        and getattr(bn, "running_mean", None) is not None
        and getattr(bn, "running_var", None) is not None
    )


def _kernel_dtypes(x: torch.Tensor, bn: nn.Module) -> bool:
    """A float32/float64 input, or a bfloat16/float16 one to a BatchNorm whose parameters and
    statistics are float32 (mixed precision, autocast): the kernels then compute in float32 and
    return x's dtype. A model cast to low precision as a whole takes the plain operators."""
    if x.dtype in (torch.float32, torch.float64):
        return True
    state = (getattr(bn, name, None) for name in ("weight", "bias", "running_mean", "running_var"))
    return x.dtype in (torch.bfloat16, torch.float16) and all(
        t.dtype == torch.float32 for t in state if t is not None
    )
