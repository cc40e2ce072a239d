"""Helpers shared by the test files: models, BatchNorm set-ups, the model snapshot that
"a failed operation leaves the model as it was" is checked against, and reference formulas
written out with PyTorch's operators."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock

from nam_lightning import NAM, NAMChannelAttention
from nam_lightning.norms import is_norm, norm_channels


class Net(torchvision.models.ResNet):
    """A resnet18 as a class of its own, so that a checkpoint can name it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def nam_bns(model: nn.Module) -> set[int]:
    """The ids of NAM's own BatchNorms in ``model``."""
    return {id(m.bn) for m in model.modules() if isinstance(m, NAMChannelAttention)}


@torch.no_grad()
def randomise_bns(model: nn.Module, zero: int = 0, seed: int = 0) -> nn.Module:
    """Random affine parameters and statistics in every BatchNorm (NAM's too); then gamma and
    beta of channels ``[0, zero)`` set to 0 in every backbone BatchNorm (not NAM's)."""
    g = torch.Generator().manual_seed(seed)
    skip = nam_bns(model)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if zero and id(m) not in skip:
                m.weight[:zero] = 0
                m.bias[:zero] = 0
    return model


@torch.no_grad()
def randomise_norms(
    model: nn.Module, seed: int = 0, *, signs: bool = False, shift: float = 0.25
) -> nn.Module:
    """A trained network's ranges in every norm layer (see ``nam_lightning.norms.is_norm``):
    scale factors in [0.25, 1] (each of random sign with ``signs``), shifts in [-shift, shift],
    running means ~ N(0, 0.25^2), running variances in [0.5, 2]. A layer without affine
    parameters or without running statistics keeps what it lacks and draws nothing for it."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if is_norm(m):
            n = norm_channels(m)
            sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1 if signs else 1
            if m.weight is not None and m.bias is not None:
                m.weight.copy_(torch.empty(n).uniform_(0.25, 1.0, generator=g) * sign)
                m.bias.copy_(torch.empty(n).uniform_(-shift, shift, generator=g))
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.25)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
    return model


def conv_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution, by name."""
    return {
        n: m.out_channels
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    }


def hooks(module: nn.Module) -> tuple[int, ...]:
    """How many forward, forward-pre, state-dict and load-state-dict hooks ``module`` has."""
    return (
        len(module._forward_hooks),
        len(module._forward_pre_hooks),
        len(module._state_dict_hooks),
        len(module._load_state_dict_pre_hooks),
    )


def snapshot(model: nn.Module, inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Everything that must survive a failed or refused operation untouched; with ``inputs``,
    also the eval-mode output on them (the training flags are put back afterwards)."""
    flags = {n: m.training for n, m in model.named_modules()}
    output = None
    if inputs is not None:
        with torch.no_grad():
            output = model.eval()(inputs)
        for name, m in model.named_modules():
            m.training = flags[name]
    return {
        "repr": repr(model),
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "modules": dict(model.named_modules()),
        "params": dict(model.named_parameters()),
        "buffers": dict(model.named_buffers()),
        "state": {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()},
        "training": flags,
        "hooks": {n: hooks(m) for n, m in model.named_modules()},
        "attrs": sorted(vars(model)),
        "inputs": inputs,
        "output": output,
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """``model`` is as :func:`snapshot` saw it: the same module tree of the very same module,
    parameter and buffer objects (an optimizer or a reference held elsewhere stays valid), the
    same values, state-dict keys, training flags, hooks and attributes, and the same output."""
    after = snapshot(model, before["inputs"])
    assert after["repr"] == before["repr"]
    assert after["types"] == before["types"]
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][k] is m for k, m in before["modules"].items())
    assert after["params"].keys() == before["params"].keys()
    assert all(after["params"][k] is p for k, p in before["params"].items())
    assert after["buffers"].keys() == before["buffers"].keys()
    assert all(after["buffers"][k] is b for k, b in before["buffers"].items())
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        if torch.is_tensor(value):
            assert after["state"][key].shape == value.shape, key
            assert torch.equal(after["state"][key], value), key
        else:
            assert after["state"][key] == value, key
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"]
    if before["output"] is not None:
        assert torch.equal(after["output"], before["output"])


def reference(bn1: nn.BatchNorm2d, nam: NAM, x: torch.Tensor) -> torch.Tensor:
    """BN, then NAM written out: z = BN2(x1); w = |g2| / (sum|g2| + pruned); x1 * sigmoid(w z)."""
    x1 = bn1(x)
    bn2 = nam.channel.bn
    z = bn2(x1)
    g = bn2.weight.detach() if nam.channel.detach_weights else bn2.weight
    w = g.abs() / (g.abs().sum() + nam.channel.pruned_mass)
    return x1 * torch.sigmoid(z * w.view(1, -1, 1, 1))
