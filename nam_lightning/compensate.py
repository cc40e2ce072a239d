"""Function-preserving channel removal: what a removed channel still contributes is kept.

A channel whose BatchNorm scale factor ``gamma`` is 0 does not carry nothing: it outputs its
shift ``beta`` at every position, and after the activation (and NAM's gate) a constant ``c``.
A layer that reads the channel, a convolution or a linear layer, adds ``W[:, ch] * c``
(summed over the kernel) to each of its outputs. Dropping the channel drops that sum, which is
why Network Slimming's pruned networks lose accuracy before fine-tuning. Here the sum is put
back where the layer's output can carry it:

- into the running mean of the BatchNorm that follows the layer (subtracted): in eval mode the
  BatchNorm then normalises exactly as before; in training mode it removes any per-channel
  constant by itself, so nothing is lost either way;
- else into the layer's bias.

The constant is measured, not derived: the mean of the layer's input channel over the example
batch and every position. For a channel that is constant (``gamma = 0``) that is its value,
whatever lies between the BatchNorm and the layer (activations, NAM gates, residual
additions of channels removed together); for a channel with a small ``gamma`` it is the best
constant in the least-squares sense.

How exact: for 1x1 convolutions, linear layers (also after global pooling) and every output
position of a kxk convolution whose window lies inside the input, the outputs are unchanged up
to float rounding. At the borders of a zero-padded kxk convolution the padded taps saw 0, not
the constant, so there the output moves by the padded taps' share of the sum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .utils import run_hooked


def input_means(model: nn.Module, example_inputs: Any) -> dict[nn.Module, torch.Tensor]:
    """Each convolution's and linear layer's input, averaged over all but the channel
    dimension (dimension 1; the last one for a linear layer), on one eval-mode pass."""
    means: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach().double()
        dim = x.dim() - 1 if isinstance(module, nn.Linear) else 1
        means[module] = x.movedim(dim, 0).reshape(x.shape[dim], -1).mean(1)

    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    run_hooked(model, example_inputs, layers, hook, pre=True)
    return means


@torch.no_grad()
def removed_contribution(layer: nn.Module, removed: list[int], mean: torch.Tensor) -> torch.Tensor:
    """What the ``removed`` input channels of ``layer``, each at its constant ``mean``, add to
    each output channel (float64, shape ``(out_channels,)``)."""
    values = torch.zeros_like(mean)
    values[removed] = mean[removed]
    assert isinstance(layer.weight, torch.Tensor)
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return weight @ values.to(weight.device)
    assert isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed
    groups = layer.groups
    summed = weight.flatten(2).sum(2)  # (out, in / groups): the kernel's taps added up
    per_group = values.to(weight.device).view(groups, -1)  # (groups, in / groups)
    group_of_output = torch.arange(weight.shape[0], device=weight.device) // (
        weight.shape[0] // groups
    )
    return (summed * per_group[group_of_output]).sum(1)


@torch.no_grad()
def fold_contribution(
    layer: nn.Module, contribution: torch.Tensor, follower: nn.Module | None
) -> bool:
    """Put ``contribution`` back into ``layer``'s output: the ``follower`` BatchNorm's running
    mean, else the layer's bias. Returns False where neither can carry it.

    New tensors replace the old ones (nothing is written in place), so a snapshot of the
    model's tensors still undoes the change.
    """
    if isinstance(follower, _BatchNorm):
        mean = follower.running_mean
        if mean is not None:
            follower.running_mean = mean - contribution.to(mean.device, mean.dtype)
        return True  # without running statistics the batch mean cancels the constant
    bias = getattr(layer, "bias", None)
    if isinstance(bias, nn.Parameter):
        moved = bias.detach() + contribution.to(bias.device, bias.dtype)
        layer.bias = nn.Parameter(moved, requires_grad=bias.requires_grad)
        return True
    return False


def compensate_cut(
    layer: nn.Module,
    removed: list[int],
    means: dict[nn.Module, torch.Tensor],
    follower: nn.Module | None,
) -> bool:
    """Before ``layer`` loses its input channels ``removed``: fold their contribution at the
    measured ``means[layer]`` into its output (:func:`fold_contribution`), and drop them from
    ``means[layer]`` so that it matches the cut layer. Returns False where nothing could take
    the contribution."""
    done = fold_contribution(layer, removed_contribution(layer, removed, means[layer]), follower)
    keep = torch.ones(len(means[layer]), dtype=torch.bool)
    keep[removed] = False
    means[layer] = means[layer][keep]
    return done
