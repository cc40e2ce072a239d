"""NAM's computation in few passes over memory: training with minimal saved state (plain
PyTorch autograd), and eval mode as one pass.

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

The per-channel coefficients (``C`` values) are computed inside the statistics kernel, and
their derivatives, written out by the chain rule, inside the first backward kernel: gradients
reach ``gamma``, ``beta`` and, through the batch statistics, ``z`` exactly as in the unfused
formula, and a site makes four compiled calls and few small eager operators. Running
statistics are updated as ``nn.BatchNorm2d`` does. On a small feature map the compiled calls'
fixed cost exceeds what they save, and a training step runs PyTorch's operators instead
(:func:`scaled_bn_gate`; :func:`nam_lightning.kernels.choose_path` decides).

In eval mode under no gradient (validation, inference) the BatchNorms are affine maps of their
running statistics, and a site is one pass computing ``x * sigmoid(a * x + b)`` (see the eval
section below; :func:`nam_lightning.fold_nam` bakes the same constants into buffers).

Under mixed precision (autocast: a bfloat16/float16 feature map, float32 BatchNorms) every
kernel reads the low-precision map, computes in float32 and writes the map's dtype, so each
output is rounded once; the statistics and per-channel values stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Kernel


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float32 for a bfloat16/float16 input (as PyTorch's
    BatchNorm does under autocast), else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def _view(t: torch.Tensor) -> torch.Tensor:
    """A per-channel ``(C,)`` vector shaped to broadcast over (N, C, H, W). It keeps its dtype,
    the BatchNorms': under mixed precision a bfloat16/float16 input promotes to its float32."""
    return t.view(1, -1, 1, 1)


def _moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean over (N, H, W), shaped (1, C, 1, 1), in the compute dtype (the
    cast of a low-precision ``z`` fuses into the compiled reduction)."""
    return torch.var_mean(z.to(_compute_dtype(z.dtype)), dim=(0, 2, 3), keepdim=True, correction=0)


def _neg_log2e(t: torch.Tensor) -> torch.Tensor:
    """``-log2(e) * t``, for ``sigmoid(t) = 1 / (1 + 2^(-log2(e) t))``: exp2 costs less than
    sigmoid's exp on a CPU. The constant is a literal: ``torch.compile`` would make a float
    global an input of the kernel."""
    return t * -1.4426950408889634


def _gate_parts(
    z: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``zh``, the gated input ``x = a zh + b`` and the gate ``s = sigmoid(p zh + q)``
    (recomputed in each kernel instead of being kept for backward)."""
    zh = (z - mean) * invstd
    return zh, a * zh + b, 1 / (1 + torch.exp2(_neg_log2e(p * zh + q)))


def gate_forward(z: torch.Tensor, *coefficients: torch.Tensor) -> torch.Tensor:
    """``(a * zh + b) * sigmoid(p * zh + q)``; ``coefficients = (mean, invstd, a, b, p, q)``.
    Computed in the coefficients' dtype (float32 for a low-precision ``z``), returned in z's."""
    _, x, s = _gate_parts(z, *coefficients)
    return (x * s).to(z.dtype)


def _gate_sums(
    dy: torch.Tensor, z: torch.Tensor, *coefficients: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Backward pass 1: the gradient reaching ``zh`` and the per-channel sums that give the
    coefficients' gradients. Writing ``dzh`` here (one store) spares pass 2 the gate's
    recomputation (an exp per element), which costs more on a CPU. ``dzh`` takes dy's dtype (a
    low-precision one halves that store); the sums stay in the compute dtype."""
    _, invstd, a, _, p, _ = coefficients
    zh, x, s = _gate_parts(z, *coefficients)
    dx = dy * s  # through the gated input
    dt = dy * x * s * (1 - s)  # through the gate's argument
    da, db = _channel_sums(dx * zh), _channel_sums(dx)
    dp, dq = _channel_sums(dt * zh), _channel_sums(dt)
    # zh's own gradient is a * dx + p * dt, so its sums follow from the four above
    dmean = -invstd * (a * db + p * dq)  # where mean appears in zh
    dinvstd = (a * da + p * dp) / invstd
    return (a * dx + p * dt).to(dy.dtype), dmean, dinvstd, da, db, dp, dq


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums over (N, H, W), shaped (1, C, 1, 1): over (H, W) first, in the order the
    elementwise work runs, so that Inductor makes one loop of both (not a second pass)."""
    return t.sum((2, 3), keepdim=True).sum(0, keepdim=True)


def gate_input_grad(
    dzh: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    dmean: torch.Tensor,
    dvar: torch.Tensor,
) -> torch.Tensor:
    """Backward pass 2: ``dz``, direct and through the batch statistics (mean, biased var),
    written over ``dzh`` (a fresh activation-sized tensor costs its page faults on a CPU)."""
    count = z.numel() // z.shape[1]
    return dzh.copy_(dzh * invstd + dmean / count + dvar * (2 / count) * (z - mean))


def _alone_statistics(
    z: torch.Tensor, w: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, ...]:
    """NAM on its own input: the batch statistics of ``x = z`` and the gate's coefficients.
    NAM's BatchNorm normalises x, so ``x = zh / invstd + mean``. Returns ``(mean, var, the
    variance NAM's BatchNorm sees, invstd, a, b, p, q)``."""
    var, mean = _moments(z)
    invstd = torch.rsqrt(var + eps)
    return mean, var, var, invstd, 1 / invstd, mean, _view(w * g), _view(w * beta)


def _alone_backward(
    dy: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    *args: Any,
) -> tuple[torch.Tensor, ...]:
    """Backward pass 1 of :func:`_alone_statistics`'s gate: ``dzh``, the gradients reaching
    ``mean`` and ``var`` and those of ``(w, g, beta)``, by the chain rule through
    ``invstd = rsqrt(var + eps)``, ``a = 1 / invstd``, ``b = mean``, ``p = w g``, ``q = w beta``."""
    invstd, a, b, p, q, w, g, beta, _ = args
    dzh, dmean, dinvstd, da, db, dp, dq = _gate_sums(dy, z, mean, invstd, a, b, p, q)
    dvar = -0.5 * invstd**3 * dinvstd + 0.5 * invstd * da
    w, g, beta = _view(w), _view(g), _view(beta)
    dparams = (dp * g + dq * beta, dp * w, dq * w)  # w, g, beta
    return dzh, dmean + db, dvar, *(d.flatten() for d in dparams)


def _fused_statistics(
    z: torch.Tensor,
    w: torch.Tensor,
    g1: torch.Tensor,
    b1: torch.Tensor,
    g2: torch.Tensor,
    b2: torch.Tensor,
    eps1: float,
    eps2: float,
) -> tuple[torch.Tensor, ...]:
    """NAM after a BatchNorm ``x = g1 * zh + b1``: the batch statistics of its input ``z``,
    the variance NAM's BatchNorm sees (``var_x = g1^2 var / (var + eps1)``; its mean is
    ``b1``) and the gate's coefficients ``(invstd, a, b, p, q)``."""
    var, mean = _moments(z)
    g1v = _view(g1)
    var_x = g1v * g1v * (var / (var + eps1))
    p = _view(w * g2) * g1v * torch.rsqrt(var_x + eps2)
    return mean, var, var_x, torch.rsqrt(var + eps1), g1v, _view(b1), p, _view(w * b2)


def _fused_backward(
    dy: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    *args: Any,
) -> tuple[torch.Tensor, ...]:
    """Backward pass 1 of :func:`_fused_statistics`'s gate: ``dzh``, the gradients reaching
    ``mean`` and ``var`` and those of ``(w, g1, b1, g2, b2)``, by the chain rule through
    ``invstd = rsqrt(var + eps1)``, ``a = g1``, ``b = b1``, ``q = w b2`` and
    ``p = w g2 g1 rsqrt(var_x + eps2)`` with ``var_x = g1^2 s``, ``s = var / (var + eps1)``."""
    invstd, a, b, p, q, w, g1, _, g2, b2, eps1, eps2 = args
    dzh, dmean, dinvstd, da, db, dp, dq = _gate_sums(dy, z, mean, invstd, a, b, p, q)
    g1, w, g2, b2 = _view(g1), _view(w), _view(g2), _view(b2)
    s = var / (var + eps1)
    r = torch.rsqrt(g1 * g1 * s + eps2)
    dp_dvar_x = -0.5 * w * g2 * g1 * r * r * r
    dvar_x_dvar = g1 * g1 * eps1 * invstd**4  # d s / d var = eps1 / (var + eps1)^2
    dvar = -0.5 * invstd**3 * dinvstd + dp * dp_dvar_x * dvar_x_dvar
    dg1 = da + dp * (w * g2 * r + dp_dvar_x * 2 * g1 * s)
    dw = dp * g2 * g1 * r + dq * b2
    dparams = (dw, dg1, db, dp * w * g1 * r, dq * w)  # w, g1, b1, g2, b2
    return dzh, dmean, dvar, *(d.flatten() for d in dparams)


@dataclass(frozen=True)
class TrainingKernels:
    """The kernels of one kind of training-mode gate (NAM alone, or fused with the BatchNorm
    before it) for :class:`_NormalizedGate`: its statistics kernel ``(z, *params, *eps) ->
    (mean, var, NAM's var, invstd, a, b, p, q)`` and its first backward kernel ``(dy, z, mean,
    var, invstd, a, b, p, q, *params, *eps) -> (dzh, dmean, dvar, *dparams)``."""

    statistics: Kernel
    backward: Kernel


ALONE_KERNELS = TrainingKernels(Kernel(_alone_statistics), Kernel(_alone_backward))
FUSED_KERNELS = TrainingKernels(Kernel(_fused_statistics), Kernel(_fused_backward))
gate_forward_kernel = Kernel(gate_forward)
gate_input_grad_kernel = Kernel(gate_input_grad)


class _NormalizedGate(torch.autograd.Function):
    """``y = (a * zh + b) * sigmoid(p * zh + q)`` with ``zh = (z - mean) * invstd`` over the
    batch statistics of ``z`` and per-channel coefficients ``(invstd, a, b, p, q)`` computed
    from them and ``params`` by ``kernels``. Two passes over ``z`` forward (statistics, gate) and
    two backward (sums, input gradient), like a BatchNorm; saves ``z`` and per-channel vectors
    only. Each kernel computes its per-channel values too: no small eager operators, no
    autograd graph of its own."""

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        kernels: TrainingKernels,
        eps: tuple[float, ...],
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # detached: torch.compile fixes the shapes of Parameters, one compiled kernel per width
        params = tuple(t.detach() for t in params)
        mean, var, nam_var, *coefficients = kernels.statistics(z, *params, *eps)
        ctx.kernels, ctx.eps = kernels, eps
        ctx.save_for_backward(z, mean, var, *coefficients, *params)
        ctx.mark_non_differentiable(mean, var, nam_var)
        return gate_forward_kernel(z, mean, *coefficients), mean, var, nam_var

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        z, mean, var, *rest = ctx.saved_tensors  # rest: (invstd, a, b, p, q, *params)
        dzh, dmean, dvar, *dparams = ctx.kernels.backward(dy, z, mean, var, *rest, *ctx.eps)
        dz = gate_input_grad_kernel(dzh, z, mean, rest[0], dmean, dvar)
        return (dz, None, None, *dparams)


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


def nam_channel_gate(x: torch.Tensor, nam_bn: nn.BatchNorm2d, w: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(w * nam_bn(x))`` in training mode, saving only ``x``."""
    params = (w, nam_bn.weight, nam_bn.bias)
    y, mean, var, _ = _NormalizedGate.apply(x, ALONE_KERNELS, (nam_bn.eps,), *params)
    _update_running_stats(nam_bn, mean, var, x.numel() // x.shape[1])
    return y


def bn_nam_channel_gate(
    z: torch.Tensor, bn: nn.Module, nam_bn: nn.BatchNorm2d, w: torch.Tensor
) -> torch.Tensor:
    """``x * sigmoid(w * nam_bn(x))`` with ``x = bn(z)``, both BatchNorms in training mode,
    in one statistics pass and one elementwise pass over ``z``."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    params = (w, bn.weight, bn.bias, nam_bn.weight, nam_bn.bias)
    y, mean, var, var_x = _NormalizedGate.apply(z, FUSED_KERNELS, (bn.eps, nam_bn.eps), *params)
    count = z.numel() // z.shape[1]
    _update_running_stats(bn, mean, var, count)
    _update_running_stats(nam_bn, _view(bn.bias.detach()), var_x, count)  # NAM's mean: beta1
    return y


def scaled_bn_gate(x: torch.Tensor, bn: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(w * bn(x))`` with ``bn`` a BatchNorm in training mode, in PyTorch's
    operators: ``w * bn(x)`` is ``bn`` with its affine step scaled by ``w``, one operator instead
    of a pass more each way. Its running statistics are updated as its own forward does."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    factor = 0.0 if bn.momentum is None else bn.momentum
    tracked = bn.track_running_stats
    if tracked and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative moving average
            factor = 1 / float(bn.num_batches_tracked)
    z = F.batch_norm(
        x,
        bn.running_mean if tracked else None,
        bn.running_var if tracked else None,
        bn.weight * w,
        bn.bias * w,
        True,
        factor,
        bn.eps,
    )
    return x * torch.sigmoid(z)


# --- eval mode: the gate from the running statistics, one pass over memory ---------------------
#
# With running statistics a BatchNorm is an affine map per channel, ``BN(x) = A * x + B``, so NAM
# is ``x * sigmoid(a * x + b)`` with ``a = w * A``, ``b = w * B``, and after the site's BatchNorm
# ``x = alpha * z + beta`` it is ``(alpha * z + beta) * sigmoid(p * z + q)`` with
# ``p = a * alpha``, ``q = a * beta + b``: one compiled pass instead of five operators.


def normalised_abs(scale: torch.Tensor, removed: torch.Tensor | None = None) -> torch.Tensor:
    """NAM's weights ``|scale| / (sum |scale| + removed)``, with an all-zero sum giving zeros,
    not NaN."""
    magnitude = scale.abs()
    total = magnitude.sum() if removed is None else magnitude.sum() + removed
    # A heavy L1 penalty can drive every scale factor to exactly zero: dividing by 1 then gives
    # w = 0 (a neutral 0.5 gate) and finite gradients, never 0/0.
    return magnitude / torch.where(total > 0, total, torch.ones_like(total))


def _bn_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``BN(x) = A * x + B`` per feature, from running ``mean`` and ``var``."""
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    return scale, shift


# An eval-mode BatchNorm as kernel arguments: running mean, running variance, eps, weight and
# bias (None where not affine).
BNState = tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, torch.Tensor | None]


def bn_state(bn: nn.Module) -> BNState:
    """``bn``'s eval-mode state as kernel arguments."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    # detached: torch.compile fixes the shapes of Parameters, one compiled kernel per width
    weight = None if bn.weight is None else bn.weight.detach()
    bias = None if bn.bias is None else bn.bias.detach()
    return bn.running_mean, bn.running_var, bn.eps, weight, bias


def eval_nam_constants(removed: torch.Tensor | None, *nam_bn: Any) -> tuple[torch.Tensor, ...]:
    """``(a, b)`` of a NAM gate in eval mode, ``x * sigmoid(a * x + b)``, from its BatchNorm (a
    BNState) and the ``pruned_mass`` of its weights (None for the spatial gate)."""
    scale, shift = _bn_affine(*nam_bn)
    w = normalised_abs(nam_bn[3], removed)
    return w * scale, w * shift


def eval_site_constants(removed: torch.Tensor, *states: Any) -> tuple[torch.Tensor, ...]:
    """``(p, q, alpha, beta)`` of a site in eval mode, ``y = (alpha * z + beta) *
    sigmoid(p * z + q)`` from the site BatchNorm's input ``z``; ``states``: the BNStates of the
    site's BatchNorm and of NAM's."""
    alpha, beta = _bn_affine(*states[:5])
    a, b = eval_nam_constants(removed, *states[5:])
    return a * alpha, a * beta + b, alpha, beta


def eval_channel_gate(x: torch.Tensor, nam_bn: nn.Module, removed: torch.Tensor) -> torch.Tensor:
    """NAM's ``x * sigmoid(w * nam_bn(x))`` with ``nam_bn`` in eval mode and
    ``w = |gamma| / (sum |gamma| + removed)``, in one pass over ``x``."""
    return gate_kernel(x, *eval_nam_constants_kernel(removed, *bn_state(nam_bn)))


def eval_bn_channel_gate(
    z: torch.Tensor, bn: nn.Module, nam_bn: nn.Module, removed: torch.Tensor
) -> torch.Tensor:
    """The same after ``x = bn(z)``, both BatchNorms in eval mode, in one pass over ``z``."""
    constants = eval_site_constants_kernel(removed, *bn_state(bn), *bn_state(nam_bn))
    return bn_gate_kernel(z, *constants)


def _logit_base2(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``-log2(e) * (scale * x + shift)`` per channel, the argument of exp2 in the sigmoid (see
    :func:`_neg_log2e`). The -log2(e) goes into the ``(C,)`` constants."""
    shift, scale = _view(_neg_log2e(shift)), _view(_neg_log2e(scale))
    return torch.addcmul(shift, x, scale)


def _gate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(scale * x + shift)`` per channel, returned in x's dtype."""
    return (x / (1 + torch.exp2(_logit_base2(x, scale, shift)))).to(x.dtype)


def _bn_gate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    bn_scale: torch.Tensor,
    bn_shift: torch.Tensor,
) -> torch.Tensor:
    """``(bn_scale * x + bn_shift) * sigmoid(scale * x + shift)`` per channel."""
    bn = torch.addcmul(_view(bn_shift), x, _view(bn_scale))
    return (bn / (1 + torch.exp2(_logit_base2(x, scale, shift)))).to(x.dtype)


# One fused pass over memory each (compiled), as cheap as the BatchNorm a site replaces; eager
# PyTorch would make a pass and a fresh tensor per operator. Two functions, not one with
# optional arguments: torch.compile keeps a cache per function. Used by the eval path above and
# by nam_lightning.fold.
gate_kernel = Kernel(_gate)
bn_gate_kernel = Kernel(_bn_gate)
# The eval path's per-channel constants: a dozen operators on C values, which as eager calls
# cost more than the pass itself on small feature maps. Compiled apart from the pass: inlined
# into it, Inductor would work them out again for every element.
eval_nam_constants_kernel = Kernel(eval_nam_constants)
eval_site_constants_kernel = Kernel(eval_site_constants)
