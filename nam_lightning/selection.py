"""Which channels one pruning pass removes, decided on plain data before anything is cut.

:mod:`nam_lightning.surgery` reads each coupled channel group of the dependency graph once into
a :class:`GroupData` (its channel scores, the layers it cuts, how much each may lose). From
those, :func:`select` gives the channels every group loses for an ``amount``, and
:func:`predict_flops` the FLOPs the network keeps then, both without touching the model: a
FLOPs target is solved on them, and the surgery runs once.

:func:`select` follows Torch-Pruning's own rule (``BasePruner._prune`` of 1.6.1), so that the
result is the one its pruner gives: a global threshold on the ranked scores of all groups
(``scope="global"``) or ``amount`` of each group (``"local"``), then ``round_to``; then
:func:`_cap` holds every layer to ``max_layer_amount`` (Torch-Pruning does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerData:
    """A convolution or linear layer whose channels a group cuts; its FLOPs are proportional
    to its weight's size, ``out * (inputs // groups)`` (times the kernel, which stays)."""

    module: nn.Module
    out: int
    inputs: int
    groups: int
    depthwise: bool  # groups == out: cutting a channel cuts its input and the group with it


@dataclass(frozen=True)
class GroupData:
    """One coupled channel group as it stands before the pass: what ranks its channels and
    which layers lose what. A "root" channel is a channel of the group's root layer; a grouped
    convolution's root has ``channel_groups`` groups of ``group_size`` channels, and a "base"
    channel is a position within a channel group (it goes from every channel group at once).
    """

    ranked: torch.Tensor  # (group_size,) float64: Torch-Pruning's score of each base channel
    order: torch.Tensor  # (group_size,) the base channels, least important first
    per_base: torch.Tensor  # (group_size,) the raw |gamma| score of each base channel
    channel_groups: int
    channels: int  # the root layer's channels
    held: list[tuple[torch.Tensor, int]]  # per layer whose output channels the group cuts:
    # the root channels it holds, and how many of them it may lose
    cuts: list[tuple[LayerData, bool, torch.Tensor]]  # (layer, its outputs (or inputs) are
    # cut, the root channels of the cut dimension it holds, one entry per channel it holds)

    @property
    def group_size(self) -> int:
        return len(self.ranked)


def select(
    groups: Sequence[GroupData],
    amount: float,
    scope: str,
    max_layer_amount: float,
    round_to: int | None,
) -> list[torch.Tensor]:
    """The root channels each group loses (sorted; empty: left whole) for ``amount``."""
    if scope == "global":
        ranked = torch.cat([g.ranked for g in groups]) if groups else torch.zeros(0)
        n = len(ranked) - int(len(ranked) * (1 - amount))
        if n <= 0:
            return [torch.zeros(0, dtype=torch.long) for _ in groups]
        threshold = torch.topk(ranked, k=n, largest=False)[0][-1]
        counts = [int((g.ranked <= threshold).sum()) for g in groups]
    else:
        counts = [max(0, g.group_size - int(g.group_size * (1 - amount))) for g in groups]
    chosen = []
    for group, count in zip(groups, counts, strict=True):
        if count and round_to:  # Torch-Pruning rounds against the root's channel count
            kept = group.channels - count
            count = group.channels - (kept - kept % round_to)
        bases = _cap(group, group.order[:count].sort().values, max_layer_amount, round_to)
        chosen.append(_expand(group, bases))
    return chosen


def predict_flops(
    groups: Sequence[GroupData],
    chosen: Sequence[torch.Tensor],
    layer_flops: dict[nn.Module, int],
    total: int,
) -> int:
    """The FLOPs of the network after cutting ``chosen`` (as :func:`select` gives it), from its
    ``total`` before and the FLOPs counted inside each layer (``layer_flops``).

    A layer's FLOPs scale with its weight's size; FLOPs outside the layers are taken to stay.
    """
    lost_out: dict[LayerData, int] = {}
    lost_in: dict[LayerData, int] = {}
    for group, channels in zip(groups, chosen, strict=True):
        if not len(channels):
            continue
        cut = torch.zeros(group.channels, dtype=torch.bool)
        cut[channels] = True
        for layer, outputs, roots in group.cuts:
            lost = lost_out if outputs else lost_in
            lost[layer] = lost.get(layer, 0) + int(cut[roots].sum())
    after = total
    for layer in lost_out.keys() | lost_in.keys():
        flops = layer_flops.get(layer.module, 0)
        out = layer.out - lost_out.get(layer, 0)
        per_group = layer.inputs // layer.groups
        if not layer.depthwise:  # a depthwise layer's input per group stays 1
            per_group = (layer.inputs - lost_in.get(layer, 0)) // layer.groups
        after -= flops - flops * out * per_group // (layer.out * (layer.inputs // layer.groups))
    return after


def _cap(
    group: GroupData, bases: torch.Tensor, max_amount: float, round_to: int | None
) -> torch.Tensor:
    """``bases`` (sorted) trimmed so that no layer the group cuts loses more than
    ``max_amount`` of its channels.

    Torch-Pruning's global threshold can otherwise empty a layer in one step. The root layer
    keeps ``1 - max_amount`` of each channel group, and a multiple of ``round_to``; every other
    layer whose output channels the group cuts keeps ``1 - max_amount`` of its own (the inputs
    of a concatenation each hold only some of the root's channels). The least important
    channels are cut first.
    """
    if not len(bases):
        return bases
    size = group.group_size
    allowed = size - keep_min(size, max_amount, round_to)
    order = bases[torch.argsort(group.per_base[bases], stable=True)]  # least important first
    cut = torch.zeros(group.channels, dtype=torch.bool)
    cut[_expand(group, bases)] = True
    if len(bases) <= allowed and all(int(cut[roots].sum()) <= most for roots, most in group.held):
        chosen = order  # all within the limits: no need to choose one by one
    else:
        held = [(set(roots.tolist()), most) for roots, most in group.held]
        taken: list[int] = []
        lost = [0] * len(held)
        for base in order.tolist():
            cuts = {base + g * size for g in range(group.channel_groups)}
            hits = [len(cuts & roots) for roots, _ in held]
            if len(taken) < allowed and all(
                n + h <= most for n, h, (_, most) in zip(lost, hits, held, strict=True)
            ):
                taken.append(base)
                lost = [n + h for n, h in zip(lost, hits, strict=True)]
        chosen = torch.tensor(taken, dtype=torch.long)
    if round_to:  # drop the most important until the root keeps a multiple of round_to
        drop = min(len(chosen), (len(chosen) - size) % round_to)
        chosen = chosen[: len(chosen) - drop]
    return chosen.sort().values


def _expand(group: GroupData, bases: torch.Tensor) -> torch.Tensor:
    """The root channels of ``bases``: each base channel in every channel group, sorted."""
    offsets = torch.arange(group.channel_groups) * group.group_size
    return (bases[None, :] + offsets[:, None]).flatten().sort().values


def keep_min(channels: int, max_amount: float, round_to: int | None) -> int:
    """The fewest channels a layer of ``channels`` keeps under ``max_amount`` and ``round_to``."""
    keep = max(1, math.ceil(channels * (1 - max_amount) - 1e-9))
    if round_to:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return keep
