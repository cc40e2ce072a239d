"""Layers channel pruning cannot follow, found before any surgery.

Torch-Pruning cuts the layers it knows (convolutions, linear layers, norms, PReLU, embeddings,
attention and LSTM layers: ``torch_pruning.ops.TORCH_*``) and, in other modules, the parameters
it sees the forward pass use through autograd. A module of another type that keeps one value
per channel in a buffer, or in a parameter it uses outside autograd, is left as it is while the
channels around it shrink. Network Slimming's ``channel_selection`` is the known case: a
parameter ``indexes`` of length C, read through ``.data`` as the channels to keep. After
pruning such a layer fails ("index 10 is out of bounds ...") or, worse, picks the wrong
channels. :func:`check_channel_tensors` finds these layers in one forward pass, run only when
the model holds a module with a per-channel tensor of its own that is of no known type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_leaves

from .utils import run_hooked

# The layer types whose tensors Torch-Pruning 1.6.1 cuts itself (torch_pruning.ops.TORCH_*).
_CUT_LAYERS = (
    _ConvNd,
    _BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    _InstanceNorm,
    nn.PReLU,
    nn.Linear,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.LSTM,
)


def check_channel_tensors(model: nn.Module, example_inputs: Any) -> None:
    """Raise a ValueError naming each module whose per-channel tensors pruning cannot follow.

    A tensor is per-channel when its first dimension larger than 1 has as many entries as the
    module's input has channels (dim 1), and that input was computed by the network (it has
    an autograd history; the model's own inputs are never pruned). It cannot be followed when
    it is a buffer, or a parameter that does not reach the module's output through autograd.
    The model runs once in eval mode, so nothing it holds changes.
    """
    candidates = {
        module: (name, tensors)
        for name, module in model.named_modules()
        if not isinstance(module, _CUT_LAYERS) and (tensors := dict(_own_tensors(module)))
    }
    if not candidates:
        return
    found: list[str] = []

    def check(module: nn.Module, inputs: Any, output: Any) -> None:
        x = next((t for t in tree_leaves(inputs) if _feature_map(t)), None)
        if x is None:
            return
        name, tensors = candidates[module]
        reached = _parameters_reached(output, stop=x.grad_fn)
        for tensor_name, tensor in tensors.items():
            if _channel_count(tensor) != x.shape[1]:
                continue
            if isinstance(tensor, nn.Parameter) and id(tensor) in reached:
                continue  # Torch-Pruning sees it in the traced graph and cuts it
            kind = "parameter" if isinstance(tensor, nn.Parameter) else "buffer"
            found.append(
                f"{name or type(model).__name__!r} ({type(module).__name__}): its {kind} "
                f"{tensor_name!r} of shape {tuple(tensor.shape)} has one entry per channel "
                f"of its {x.shape[1]}-channel input"
            )

    run_hooked(model, example_inputs, candidates, check, pre=False, grad=True)
    if found:
        raise ValueError(
            f"Channel pruning cannot follow {'; '.join(dict.fromkeys(found))}. Torch-Pruning "
            "cuts the layers it knows and the parameters it sees the forward pass use through "
            "autograd; this tensor is a buffer or is used outside autograd (as an index or "
            "mask, like Network Slimming's channel_selection), so it would keep its length "
            "while the channels shrink, and the layer would fail or pick the wrong channels. "
            "Remove the layer before pruning (prune_channels removes channels itself), or "
            "merge what it does into the layer before it. The model is unchanged."
        )


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own parameters and buffers (not its children's) that could be per-channel."""
    for name, tensor in (
        *module.named_parameters(recurse=False),
        *module.named_buffers(recurse=False),
    ):
        if tensor is not None and _channel_count(tensor) is not None:
            yield name, tensor


def _channel_count(tensor: torch.Tensor) -> int | None:
    """The size of the first dimension larger than 1 (None for a scalar or a single value)."""
    return next((int(s) for s in tensor.shape if s > 1), None)


def _feature_map(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.grad_fn is not None


def _parameters_reached(output: Any, stop: Any) -> set[int]:
    """Ids of the parameters whose values reach ``output`` through autograd, walking back from
    it no further than ``stop`` (the autograd node that made the module's input)."""
    reached: set[int] = set()
    seen: set[Any] = {stop}
    todo = [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf tensor
        if isinstance(variable, torch.Tensor):
            reached.add(id(variable))
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached
