"""NAM's training-time computation with minimal saved state (plain PyTorch autograd).

Written straightforwardly, NAM keeps two extra activation-sized tensors per site for backward
(its BatchNorm's input and the gate). Here one custom autograd function computes

    y = (A * zh + B) * sigmoid(P * zh + Q),   zh = (z - mean) * invstd     (per channel)

saving only its input ``z``, and recomputes the cheap rest in backward. It covers both cases:

- NAM on its own input x (``z = x``): NAM's BatchNorm normalises x, so ``x = zh / invstd +
  mean``: ``A = 1 / invstd``, ``B = mean``, ``P = w * gamma``, ``Q = w * beta``.
- NAM right after a BatchNorm in training mode (the standard site), fused with it: ``z`` is that
  BatchNorm's input, ``x = g1 * zh + b1``, and NAM's batch statistics follow from the first
  BatchNorm's: ``mean_x = b1`` and ``var_x = g1^2 * var_z / (var_z + eps1)``. Then ``A = g1``,
  ``B = b1``, ``P = w * g2 * g1 / sqrt(var_x + eps2)``, ``Q = w * b2``: one statistics pass and
  one elementwise pass serve both BatchNorms, and only ``z`` (which the first BatchNorm keeps
  anyway) is saved.

The per-channel coefficients are computed with ordinary autograd ops (cheap, ``C`` values), so
gradients reach ``gamma``, ``beta`` and, through the batch statistics, ``z`` exactly as in the
unfused formula; running statistics are updated as ``nn.BatchNorm2d`` does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn


def _gate_forward(
    z: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
) -> torch.Tensor:
    zh = (z - mean) * invstd
    return (a * zh + b) * torch.sigmoid(p * zh + q)


def _gate_backward(
    dy: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    zh = (z - mean) * invstd
    s = torch.sigmoid(p * zh + q)
    x = a * zh + b
    dx = dy * s  # through the gated input
    dt = dy * x * s * (1 - s)  # through the gate's argument
    dzh = a * dx + p * dt
    dims = (0, 2, 3)
    return (
        dzh * invstd,  # dz with the statistics held fixed
        -(dzh * invstd).sum(dims, keepdim=True),  # d mean
        (dzh * (z - mean)).sum(dims, keepdim=True),  # d invstd
        (dx * zh).sum(dims, keepdim=True),  # d a
        dx.sum(dims, keepdim=True),  # d b
        (dt * zh).sum(dims, keepdim=True),  # d p
        dt.sum(dims, keepdim=True),  # d q
    )


class _Kernel:
    """``fn`` compiled by ``torch.compile`` into one fused loop (eager PyTorch would make a
    pass over memory per operator: ~4x slower forward, ~10x slower backward on CPU), or
    ``fn`` itself where compiling is off (``NAM_LIGHTNING_COMPILE=0``) or fails (no C++
    compiler): then once a warning, and eager from there on."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.enabled = os.environ.get("NAM_LIGHTNING_COMPILE", "1") != "0"

    def __call__(self, *args: torch.Tensor) -> Any:
        if not self.enabled or torch.compiler.is_compiling():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as err:  # a missing toolchain shows up at the first call
            self.enabled = False
            warnings.warn(
                f"nam_lightning: compiling the NAM kernels failed ({type(err).__name__}); "
                "running them eagerly (exact, but slower).",
                stacklevel=2,
            )
            return self.fn(*args)


_forward_kernel = _Kernel(_gate_forward)
_backward_kernel = _Kernel(_gate_backward)


class _AffineGate(torch.autograd.Function):
    """``(a * zh + b) * sigmoid(p * zh + q)``; saves ``z`` and ``C``-sized vectors only."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, *coefficients: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, *coefficients)
        return _forward_kernel(z, *coefficients)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _backward_kernel(dy, *ctx.saved_tensors)


def _batch_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean over (N, H, W), shaped (1, C, 1, 1) for broadcasting."""
    var, mean = torch.var_mean(z, dim=(0, 2, 3), keepdim=True, correction=0)
    return var, mean


def _update_running_stats(
    bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """What ``F.batch_norm`` does to the running statistics in training mode."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        # momentum None: a cumulative moving average
        factor = (
            bn.momentum
            if bn.momentum is not None
            else 1 / float(cast(torch.Tensor, bn.num_batches_tracked))
        )
        unbiased = var.flatten() * (count / max(count - 1, 1))
        rm, rv = bn.running_mean, bn.running_var
        rm.mul_(1 - factor).add_(mean.flatten().to(rm.dtype), alpha=factor)
        rv.mul_(1 - factor).add_(unbiased.to(rv.dtype), alpha=factor)


def _view(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _plain_bn(bn: nn.Module) -> bool:
    # Lightning turns SyncBatchNorm back into its own `_BatchNormXd` after DDP: same forward.
    return type(bn) is nn.BatchNorm2d or type(bn).__name__ == "_BatchNormXd"


def lean_applies(x: torch.Tensor, bn: nn.Module) -> bool:
    """Whether the lean path reproduces ``bn`` exactly: a plain, affine BatchNorm normalising
    with batch statistics (training mode), on a float32/float64 input. SyncBatchNorm needs its
    cross-device statistics, and low-precision inputs its float32 accumulation: not covered."""
    return (
        _plain_bn(bn)
        and bn.training
        and bool(bn.affine)
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
    )


def fusion_applies(x: torch.Tensor, bn: nn.Module, nam_bn: nn.Module) -> bool:
    """Whether ``bn`` followed by NAM's ``nam_bn`` can run as one fused step."""
    return lean_applies(x, bn) and lean_applies(x, nam_bn)


def nam_channel_gate(x: torch.Tensor, nam_bn: nn.BatchNorm2d, w: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(w * nam_bn(x))`` in training mode, saving only ``x``."""
    var, mean = _batch_moments(x)
    _update_running_stats(nam_bn, mean, var, x.numel() // x.shape[1])
    invstd = torch.rsqrt(var + nam_bn.eps)
    a, b = 1 / invstd, mean
    p, q = _view(w * nam_bn.weight), _view(w * nam_bn.bias)
    return _AffineGate.apply(x, mean, invstd, a, b, p, q)


def bn_nam_channel_gate(
    z: torch.Tensor, bn: nn.Module, nam_bn: nn.BatchNorm2d, w: torch.Tensor
) -> torch.Tensor:
    """``x * sigmoid(w * nam_bn(x))`` with ``x = bn(z)``, both BatchNorms in training mode,
    in one statistics pass and one elementwise pass over ``z``."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    var, mean = _batch_moments(z)
    count = z.numel() // z.shape[1]
    g1, b1 = _view(bn.weight), _view(bn.bias)
    var_x = g1 * g1 * (var / (var + bn.eps))  # NAM's BatchNorm sees this variance ...
    _update_running_stats(bn, mean, var, count)
    _update_running_stats(nam_bn, b1, var_x, count)  # ... and this mean: beta1
    invstd = torch.rsqrt(var + bn.eps)
    p = _view(w * nam_bn.weight) * g1 * torch.rsqrt(var_x + nam_bn.eps)
    q = _view(w * nam_bn.bias)
    return _AffineGate.apply(z, mean, invstd, g1, b1, p, q)


__all__ = ["bn_nam_channel_gate", "fusion_applies", "lean_applies", "nam_channel_gate"]
