"""The L1 sparsity penalty on BatchNorm scale factors, in plain PyTorch.

NAM's loss is ``sum loss(f(x), y) + p * sum |gamma| + p * sum |lambda|`` over the NAM scale
factors; Network Slimming (Liu et al. 2017) puts the same penalty on every backbone BatchNorm
``gamma`` so that whole channels become prunable. The penalty's gradient is ``p * sign(gamma)``,
which :func:`add_l1_subgradient_` adds to existing gradients in one multi-tensor pass, exactly
as if ``p * l1_penalty(model)`` had been added to the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .attention import NAMChannelAttention, NAMSpatialAttention
from .checks import check_finite_float

Targets = Literal["nam", "bn", "all"]
TARGETS: tuple[str, ...] = get_args(Targets)


def scale_factors(model: nn.Module, targets: Targets = "all") -> list[torch.Tensor]:
    """The scale factors the penalty acts on, found by module type.

    Args:
        model: any module (wrappers such as DDP are fine: modules are found by type).
        targets: ``"nam"``: NAM channel ``gamma`` and spatial ``lambda`` (the NAM paper);
            ``"bn"``: the ``gamma`` of every other BatchNorm (Network Slimming); ``"all"``: both.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    check_targets(targets)
    nam_bns: set[int] = set()
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, (NAMChannelAttention, NAMSpatialAttention)):
            nam_bns.add(id(module.bn))
            if targets != "bn" and module.bn.weight is not None:
                found[id(module.bn.weight)] = module.bn.weight
        elif (
            isinstance(module, _BatchNorm)
            and id(module) not in nam_bns
            and targets != "nam"
            and module.weight is not None
        ):
            found[id(module.weight)] = module.weight
    return list(found.values())


def l1_penalty(model: nn.Module, targets: Targets = "all") -> torch.Tensor:
    """``sum |gamma|`` over the targeted scale factors, differentiable (no lambda applied).

    Example:
        >>> bn = nn.BatchNorm2d(3)
        >>> _ = bn.weight.data.copy_(torch.tensor([1.0, -2.0, 0.5]))
        >>> l1_penalty(nn.Sequential(bn)).item()
        3.5
    """
    return l1_norm(scale_factors(model, targets))


def l1_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """``sum |p|`` over a list of tensors, in one multi-tensor pass (0 for an empty list)."""
    if not params:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(params, 1)).sum()


@torch.no_grad()
def add_l1_subgradient_(params: Iterable[torch.Tensor], lambda_: float) -> None:
    """``p.grad += lambda_ * sign(p)`` for every ``p`` that has a gradient, in one pass.

    This is the gradient of ``lambda_ * sum |p|`` (``sign(0) = 0``, as autograd's ``abs``).
    Parameters without a gradient (unused this step, or frozen) are left alone.

    Args:
        params: the scale factors (e.g. :func:`scale_factors`), or one tensor.
        lambda_: the penalty's weight, a finite float >= 0.
    """
    params = _tensors(params)
    check_finite_float("lambda_", lambda_, zero_ok=True)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad or lambda_ == 0:
        return
    grads = [p.grad for p in with_grad if p.grad is not None]
    torch._foreach_add_(grads, torch._foreach_sign(with_grad), alpha=lambda_)


@torch.no_grad()
def add_masked_decay_(
    params: Sequence[torch.Tensor], lambda_: float, masks: Sequence[torch.Tensor]
) -> None:
    """``p.grad += lambda_ * p * mask`` for every ``p`` that has a gradient: the gradient of
    ``lambda_ / 2 * sum (p * mask)^2``, which shrinks the masked entries geometrically.

    Args:
        params: the scale factors.
        lambda_: the decay's weight, a finite float >= 0.
        masks: one tensor of ``p``'s shape per parameter, 1 where the decay applies, else 0.
    """
    check_finite_float("lambda_", lambda_, zero_ok=True)
    if len(masks) != len(params):
        raise ValueError(
            f"`masks` must hold one tensor per parameter ({len(params)}), got {len(masks)}"
        )
    keep = [i for i, p in enumerate(params) if p.grad is not None]
    if not keep or lambda_ == 0:
        return
    grads = [params[i].grad for i in keep]
    decay = torch._foreach_mul([params[i].detach() for i in keep], [masks[i] for i in keep])
    torch._foreach_add_(grads, decay, alpha=lambda_)  # type: ignore[arg-type]


@torch.no_grad()
def masked_share(params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> float:
    """``sum |p * mask| / sum |p|``: the share of the ``|gamma|`` mass the masked entries hold
    (0 for parameters that are all zero)."""
    total = l1_norm(list(params))
    part = l1_norm(list(torch._foreach_mul([p.detach() for p in params], list(masks))))
    return float(part / total) if float(total) > 0 else 0.0


@torch.no_grad()
def sparsity(params: Iterable[torch.Tensor], threshold: float = 1e-2) -> torch.Tensor:
    """Fraction of the elements of ``params`` with ``|value| < threshold``, as a 0-dim tensor.

    Stays on the parameters' device (no host sync), so it is cheap to log every step.

    Args:
        params: the scale factors (e.g. :func:`scale_factors`), or one tensor.
        threshold: a finite float > 0.
    """
    check_finite_float("threshold", threshold)
    flat = [p.detach().reshape(-1) for p in _tensors(params)]
    if sum(f.numel() for f in flat) == 0:
        return torch.zeros(())
    return (torch.cat(flat).abs() < threshold).float().mean()


def non_finite(model: nn.Module, targets: Targets = "all") -> list[str]:
    """Names of the targeted scale factors holding NaN or inf (one host sync in all)."""
    params = scale_factors(model, targets)
    if not params or bool(torch.isfinite(l1_norm(params).detach())):
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "?") for p in params if not bool(torch.isfinite(p).all())]


def _tensors(params: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """``params`` as a list of tensors (one tensor counts as a list of one)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, nn.Module):
        raise TypeError(
            "`params` must be tensors, not a module: pass scale_factors(model) (or "
            "model.parameters())"
        )
    try:
        items = list(params)
    except TypeError:
        raise TypeError(
            f"`params` must be a tensor or an iterable of tensors, got {type(params).__name__}"
        ) from None
    wrong = next((p for p in items if not isinstance(p, torch.Tensor)), None)
    if wrong is not None:
        raise TypeError(f"`params` must hold only tensors, got a {type(wrong).__name__}")
    return items


def check_targets(targets: object) -> None:
    if targets not in TARGETS:
        raise ValueError(f"`targets` must be one of {TARGETS}, got {targets!r}")
