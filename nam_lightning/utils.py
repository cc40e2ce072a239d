"""Small helpers shared by the modules that run a model on example inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as the positional arguments of ``model(...)``: a tuple is the
    arguments, anything else the one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


class eval_mode:
    """Eval mode, no gradients, and every module's training flag restored afterwards."""

    def __init__(self, model: nn.Module, grad: bool = False) -> None:
        self.model = model
        self.grad = torch.enable_grad() if grad else torch.no_grad()

    def __enter__(self) -> None:
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for module, flag in self.flags.items():
            module.training = flag


def run_hooked(
    model: nn.Module,
    example_inputs: Any,
    modules: Iterable[nn.Module],
    hook: Callable[..., None],
    *,
    pre: bool,
    grad: bool = False,
) -> None:
    """One eval-mode pass of ``model`` on ``example_inputs`` (without gradients unless
    ``grad``) with ``hook`` on each of ``modules``: a forward-pre hook ``hook(module, inputs)``
    with ``pre``, else a forward hook ``hook(module, inputs, output)``. The hooks are removed
    afterwards, also after an error, and every training flag is put back."""
    handles = [
        m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook) for m in modules
    ]
    try:
        with eval_mode(model, grad=grad):
            model(*as_args(example_inputs))
    finally:
        for handle in handles:
            handle.remove()


def on_device_of(example: Any, model: nn.Module) -> Any:
    """``example`` (a tensor, or a tuple holding tensors) on ``model``'s device."""
    device = next(model.parameters()).device
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, tuple):
        return tuple(e.to(device) if isinstance(e, torch.Tensor) else e for e in example)
    return example


@torch.no_grad()
def copy_from_rank_zero(model: nn.Module) -> None:
    """Give every process of ``torch.distributed`` rank 0's parameters and buffers (nothing
    without a process group). After pruning without SyncBatchNorm each rank has its own running
    statistics, so what the removed channels contribute, folded into running means and biases,
    differs a little between ranks; after this the replicas are equal again."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for tensor in (*model.parameters(), *model.buffers()):
        torch.distributed.broadcast(tensor.data, src=0)
