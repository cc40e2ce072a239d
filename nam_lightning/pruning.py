"""Channel pruning by BatchNorm scale factors (Network Slimming), done by Torch-Pruning.

This is the only module that imports ``torch_pruning``: its dependency graph finds which
layers are coupled (residual additions, concatenations, depthwise and grouped convolutions),
and its pruner removes channels physically. What to remove is decided here:

- ``importance="bn"`` (default): the raw ``|gamma|`` of the backbone BatchNorms that produce a
  channel (mean over the BatchNorms of a coupled group), one threshold for the whole network
  (``scope="global"``, as Network Slimming) or per layer (``"local"``). NAM's own BatchNorms do
  not count: a NAM ``gamma`` near 0 makes that channel's gate a constant 0.5 ("no attention"),
  which says nothing about whether the channel carries information.
- ``importance="nam"``: rank by NAM's ``gamma`` instead; only groups that contain a NAM module
  (the residual streams it gates) are pruned.

Liu et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch_pruning.dependency import index_mapping

from .attention import NAM, NAMChannelAttention
from .prunable import check_channel_tensors
from .record import PRUNING_ATTR, attach_record
from .report import (
    PruneReport,
    as_args,
    count_flops,
    count_params,
    eval_mode,
    layer_channels,
    measure_latency,
)
from .sparsity import non_finite

Importance = Literal["bn", "nam"]
Scope = Literal["global", "local"]


@dataclass
class PruneConfig:
    """Arguments of :func:`prune_channels`, for :class:`~nam_lightning.NAMCallback` and the CLI.

    Attributes:
        amount: fraction of prunable channels to remove (exclusive with ``flops_target``).
        flops_target: fraction of the FLOPs to keep.
        importance: ``"bn"`` (backbone BatchNorm ``|gamma|``) or ``"nam"``.
        scope: ``"global"`` (one threshold) or ``"local"`` (per layer).
        max_layer_amount: the most any layer may lose, a fraction < 1.
        round_to: keep channel counts multiples of this.
    """

    amount: float | None = None
    flops_target: float | None = None
    importance: Importance = "bn"
    scope: Scope = "global"
    max_layer_amount: float = 0.9
    round_to: int | None = None

    def __post_init__(self) -> None:
        _check_arguments(
            self.amount,
            self.flops_target,
            self.importance,
            self.scope,
            self.max_layer_amount,
            self.round_to,
        )

    def apply(self, model: nn.Module, example_inputs: Any, measure: bool = True) -> PruneReport:
        """:func:`prune_channels` with these arguments."""
        return prune_channels(
            model,
            example_inputs,
            self.amount,
            flops_target=self.flops_target,
            importance=self.importance,
            scope=self.scope,
            max_layer_amount=self.max_layer_amount,
            round_to=self.round_to,
            measure=measure,
        )


def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    amount: float | None = None,
    *,
    flops_target: float | None = None,
    importance: Importance = "bn",
    scope: Scope = "global",
    max_layer_amount: float = 0.9,
    round_to: int | None = None,
    ignored_layers: Iterable[nn.Module] | None = None,
    measure: bool = True,
) -> PruneReport:
    """Remove the least important channels of ``model`` physically, in place.

    Args:
        model: a network with BatchNorm layers (NAM injected or not).
        example_inputs: a batch for ``model(...)`` (tensor or tuple), on the model's device;
            used to trace the network, count FLOPs and time it.
        amount: fraction of the prunable channels to remove, in (0, 1).
        flops_target: instead of ``amount``: the fraction of FLOPs to keep, in (0, 1); the
            amount is solved so that the result lands within 2% of it where channel granularity
            allows.
        importance: ``"bn"`` or ``"nam"`` (see the module docstring).
        scope: ``"global"``: one threshold over all layers; ``"local"``: ``amount`` per layer.
        max_layer_amount: no layer loses more than this fraction of its channels.
        round_to: keep every pruned layer's channel count a multiple of this (fast kernels).
            A layer holding the channels of several coupled groups (the output of a
            concatenation, or a layer added to it) can end up off the multiple.
        ignored_layers: modules never pruned. The layer that produces the model's output is
            always kept whole.
        measure: time the model before and after on ``example_inputs``.

    Returns:
        A :class:`~nam_lightning.PruneReport`.

    Raises:
        ValueError: on bad arguments, a model without BatchNorm, or a failed surgery; the model
            is then exactly as it was.
    """
    _check_arguments(amount, flops_target, importance, scope, max_layer_amount, round_to)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(a, torch.Tensor) for a in as_args(example_inputs)):
        raise TypeError("`example_inputs` must be a tensor or a tuple holding tensors")
    if isinstance(ignored_layers, nn.Module):
        raise TypeError(
            f"`ignored_layers` must be a list of modules, got one {type(ignored_layers).__name__}"
            ": pass it in a list, e.g. ignored_layers=[model.fc]"
        )
    ignored = list(ignored_layers or [])
    if not all(isinstance(m, nn.Module) for m in ignored):
        raise TypeError("`ignored_layers` must hold torch.nn.Module objects")
    if not isinstance(measure, bool):
        raise TypeError(f"`measure` must be a bool, got {type(measure).__name__}")
    nam_bns = {id(m.bn) for m in model.modules() if isinstance(m, NAMChannelAttention)}
    if not any(isinstance(m, _BatchNorm) and id(m) not in nam_bns for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer: channel pruning ranks channels by "
            "BatchNorm scale factors, so there is nothing to rank."
        )
    bad = non_finite(model)
    if bad:
        raise ValueError(
            f"BatchNorm scale factors hold NaN or inf ({', '.join(bad[:5])}): channels cannot be "
            "ranked; the training diverged (lower the learning rate or `lambda_`)."
        )
    if importance == "nam" and not nam_bns:
        raise ValueError("`importance='nam'` needs NAM modules in the model (see inject_nam)")

    start = time.perf_counter()
    try:
        flops_before = count_flops(model, example_inputs)  # runs the model in eval mode
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__} cannot run on `example_inputs` "
            f"({type(err).__name__}: {err}); give a batch the model takes. Nothing was changed."
        ) from err
    check_channel_tensors(model, example_inputs)  # layers the surgery could not follow
    params_before = count_params(model)
    channels_before = layer_channels(model)
    latency_before = measure_latency(model, example_inputs) if measure else None
    ignored.append(_output_layer(model, example_inputs))

    snapshot = _Snapshot(model)
    try:
        if flops_target is not None:
            amount = _solve_amount(
                model,
                example_inputs,
                flops_target,
                flops_before,
                snapshot,
                importance,
                scope,
                max_layer_amount,
                round_to,
                ignored,
            )
        assert amount is not None
        history, threshold, removed = _prune(
            model, example_inputs, amount, importance, scope, max_layer_amount, round_to, ignored
        )
        flops_after = count_flops(model, example_inputs)
    except Exception as err:
        snapshot.restore()
        raise ValueError(f"Channel pruning failed, the model is unchanged: {err}") from err

    notes = []
    if removed == 0:
        notes.append(
            "No channel was removed: no layer had channels to spare under "
            f"max_layer_amount={max_layer_amount} and round_to={round_to} (a round_to larger "
            "than the layers, or an amount too small for one channel, does this)."
        )
        warnings.warn(notes[-1], stacklevel=2)
    record = getattr(model, PRUNING_ATTR, None) or {"passes": []}
    shapes = [list(a.shape) for a in as_args(example_inputs) if isinstance(a, torch.Tensor)]
    record["passes"].append({"history": history, "input_shapes": shapes})
    setattr(model, PRUNING_ATTR, record)
    attach_record(model)
    args = as_args(example_inputs)
    return PruneReport(
        params_before=params_before,
        params_after=count_params(model),
        flops_before=flops_before,
        flops_after=flops_after,
        channels_before=channels_before,
        channels_after=layer_channels(model),
        threshold=threshold,
        removed_channels=removed,
        importance=importance,
        scope=scope,
        amount=amount,
        flops_target=flops_target,
        latency_before=latency_before,
        latency_after=measure_latency(model, example_inputs) if measure else None,
        device=str(next(a for a in args if isinstance(a, torch.Tensor)).device),
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def replay_pruning(model: nn.Module, record: dict[str, Any]) -> None:
    """Redo recorded pruning passes on a freshly built model (for loading checkpoints)."""
    for step in record["passes"]:
        inputs = tuple(torch.zeros(shape) for shape in step["input_shapes"])
        with _without_spatial_attention(model), _traceable():
            with eval_mode(model, grad=True):
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
            graph.load_pruning_history([tuple(h) for h in step["history"]])
    setattr(model, PRUNING_ATTR, record)
    attach_record(model)


class _ScaleImportance(tp.importance.Importance):
    """Per-channel ``|gamma|``, the mean over the group's backbone (or NAM) BatchNorms that the
    channel passes through.

    A group scores None, so it is left whole, where a channel passes through none of them
    (nothing ranks it) or where Torch-Pruning would cut it inconsistently at a grouped
    convolution (see :func:`_cuttable`).
    """

    def __init__(self, model: nn.Module, use_nam: bool) -> None:
        self.use_nam = use_nam
        self.nam_bns = {id(m.bn) for m in model.modules() if isinstance(m, NAMChannelAttention)}

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        if not _cuttable(group):
            return None
        # The mean is taken per channel of the group's root. Torch-Pruning's own mean sizes the
        # sum by the first BatchNorm and divides by the number of BatchNorms: wrong (or an
        # IndexError) where a concatenation gives a BatchNorm only part of the root's channels.
        size = len(group[0][1])
        total = torch.zeros(size, dtype=torch.float64)
        count = torch.zeros(size, dtype=torch.float64)
        for i, (dep, idxs) in enumerate(group):
            layer, roots = dep.layer, group[i].root_idxs
            if (
                isinstance(layer, _BatchNorm)
                and layer.weight is not None
                and (id(layer) in self.nam_bns) == self.use_nam
                and None not in roots
            ):
                where = torch.tensor(roots, dtype=torch.long)
                total.index_add_(0, where, layer.weight.detach().abs()[idxs].double().cpu())
                count.index_add_(0, where, torch.ones(len(roots), dtype=torch.float64))
        if not bool((count > 0).all()):
            return None
        return (total / count).float()

    def ranked(self, group: Any) -> torch.Tensor | None:
        """The scores with exact ties broken by relative channel position (< 1e-9).

        Torch-Pruning removes every channel whose score is <= the threshold; with ties at the
        threshold (an untrained model: every gamma is 1) that is the whole layer, which it then
        refuses, so nothing would be pruned.
        """
        scores = self(group)
        if scores is None:
            return None
        position = torch.arange(len(scores), dtype=torch.float64) / len(scores)
        return scores.double() + 1e-9 * position  # tied layers then lose the same fraction


def _cuttable(group: Any) -> bool:
    """Whether Torch-Pruning 1.6.1 cuts ``group`` consistently at its grouped convolutions.

    A grouped conv must lose the same channels in each of its channel groups. Torch-Pruning
    repeats the chosen root indices once per channel group of the group's most-grouped conv,
    which is right only where each grouped conv has exactly the root's channels, all of them in
    the group (a concatenation can split them, or pad them with others), and every grouped
    conv's ``groups`` divides that count. It also traces any conv with
    ``groups == out_channels`` as a depthwise one and cuts its input like its output, which is
    wrong when ``in_channels`` is larger. Otherwise ranking crashes or the surgery fails, so such
    groups are left whole. (Types are those traced: a grouped conv that an earlier cut of the
    same pass leaves with ``groups == out_channels`` is still cut as grouped, correctly.)
    """
    root = len(group[0][1])
    counts = []
    for dep, idxs in group:
        layer = dep.layer
        if not isinstance(layer, nn.modules.conv._ConvNd) or layer.groups == 1:
            continue
        if dep.target.type == tp.ops.OPTYPE.DEPTHWISE_CONV:
            if layer.in_channels != layer.out_channels:
                return False
            continue
        cuts_out = dep.handler == tp.pruner.function.prune_conv_out_channels
        if not len(idxs) == root == (layer.out_channels if cuts_out else layer.in_channels):
            return False
        counts.append(layer.groups)
    return all(max(counts) % count == 0 for count in counts)


@contextlib.contextmanager
def _without_spatial_attention(model: nn.Module) -> Iterator[None]:
    """Take NAM's spatial attention out while the dependency graph is traced and cut.

    It has one scale factor per position, none per channel, so it never needs pruning; but its
    BatchNorm sees the channels folded into the batch by a reshape, which the dependency graph
    cannot follow: left in, it would mark every channel group it touches unprunable.
    """
    held = {nam: nam.spatial for nam in model.modules() if isinstance(nam, NAM)}
    for nam in held:
        nam.spatial = None
    try:
        yield
    finally:
        for nam, spatial in held.items():
            nam.spatial = spatial


@contextlib.contextmanager
def _traceable() -> Iterator[list[Any]]:
    """Mend two gaps of Torch-Pruning 1.6.1 while it builds a dependency graph.

    Active for as long as the graph is used (Torch-Pruning updates its index mappings each time
    it forms a group). Yields the list, filled as graphs are built, of the reshape nodes that
    move channels to new positions (barriers): the caller must keep whole every channel group
    crossing one.

    - ``chunk`` and ``split`` with an int: Torch-Pruning looks for the piece sizes under an
      attribute name older torch versions used, then guesses them from the consumers, wrongly
      when a piece goes straight into a concatenation (ShuffleNet V2's blocks). The sizes are
      set from the autograd node instead.
    - ``split`` with a list of sizes (timm's MixedConv2d keeps them in an attribute): the
      forward splits by the sizes it was built with, whatever the channels left, so such
      splits become barriers.
    - A reshape that is not a flatten, such as ShuffleNet's channel shuffle ((N, C, H, W) ->
      (N, g, C/g, H, W) -> transpose -> back), permutes channels; Torch-Pruning's index mapping
      cannot express that: it divides by zero, or passes indices through unchanged, which would
      cut the wrong channels. Such reshapes become barriers.
    """
    barriers: list[Any] = []
    mended: weakref.WeakSet[Any] = weakref.WeakSet()
    update_all = index_mapping.update_index_mapping
    update_reshape = index_mapping.update_reshape_index_mapping

    def reshape(graph: Any, node: Any) -> None:
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        if sizes is not None and len(sizes) not in (2, 4):
            barriers.append(node.module)
            return
        try:
            update_reshape(graph, node)
        except ZeroDivisionError:
            barriers.append(node.module)

    def update(graph: Any) -> None:  # at the build, and again for every group taken
        if graph not in mended:  # the autograd sizes are those of the trace, so only once
            mended.add(graph)
            for node in graph.module2node.values():
                if node.type == tp.ops.OPTYPE.SPLIT:
                    _split_sizes_from_autograd(node)
                    if hasattr(node.grad_fn, "_saved_split_sizes"):  # sizes fixed in forward
                        barriers.append(node.module)
        update_all(graph)

    index_mapping.update_index_mapping = update
    index_mapping.update_reshape_index_mapping = reshape
    try:
        yield barriers
    finally:
        index_mapping.update_index_mapping = update_all
        index_mapping.update_reshape_index_mapping = update_reshape


def _split_sizes_from_autograd(node: Any) -> None:
    """Channel sizes of a ``chunk``/``split(int)`` node, read from its autograd node."""
    fn = node.grad_fn
    size = getattr(fn, "_saved_split_size", None)
    shape = getattr(fn, "_saved_self_sym_sizes", None)
    if size is None or shape is None or len(shape) < 2 or getattr(fn, "_saved_dim", None) != 1:
        return
    total = int(shape[1])
    sizes = [int(size)] * (total // int(size)) + ([total % int(size)] if total % int(size) else [])
    if len(sizes) != len(node.outputs):  # a piece is unused: leave Torch-Pruning's guess
        return
    node.module.split_sizes = sizes
    node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]


def _crossing(pruner: Any, barriers: list[Any]) -> list[nn.Module]:
    """The layers whose output channels belong to a group that crosses a barrier.

    Ignoring them makes Torch-Pruning skip exactly those groups (it checks ignored layers on
    the output-channel side only), and leaves them out of the count that ``amount`` is a
    fraction of.
    """
    graph = pruner.DG
    layers = set(pruner.model.modules())
    crossing: list[nn.Module] = []
    groups = graph.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    for group in groups:
        nodes = [node for dep, _ in group for node in (dep.source, dep.target)]
        if any(node.module in barriers for node in nodes):
            crossing.extend(
                dep.target.module
                for dep, _ in group
                if dep.target.module in layers and graph.is_out_channel_pruning_fn(dep.handler)
            )
    return crossing


def _prune(
    model: nn.Module,
    example_inputs: Any,
    amount: float,
    importance: str,
    scope: str,
    max_layer_amount: float,
    round_to: int | None,
    ignored: list[nn.Module],
) -> tuple[list[list[Any]], float | None, int]:
    """One pruning pass; returns the history, the threshold used and the channels removed."""
    with _without_spatial_attention(model), _traceable() as barriers:
        scorer = _ScaleImportance(model, use_nam=importance == "nam")
        nam_of_bn = {id(m.bn): m for m in model.modules() if isinstance(m, NAMChannelAttention)}

        def build(ignored: list[nn.Module]) -> Any:
            # tracing needs autograd; eval mode keeps the BatchNorm statistics still
            with eval_mode(model, grad=True):
                return tp.pruner.BasePruner(
                    model,
                    as_args(example_inputs),
                    importance=scorer.ranked,
                    global_pruning=scope == "global",
                    pruning_ratio=amount,
                    max_pruning_ratio=max_layer_amount,
                    round_to=round_to,
                    ignored_layers=ignored,
                )

        try:
            pruner = build(ignored)
            if barriers:  # once more, with the layers whose channels cross a barrier kept whole
                pruner = build(ignored + _crossing(pruner, barriers))
        except (ZeroDivisionError, IndexError, KeyError) as err:
            raise ValueError(
                "Torch-Pruning could not trace the channel dependencies of "
                f"{type(model).__name__} ({type(err).__name__}: {err})."
            ) from err
        threshold: float | None = None
        removed = 0
        # Torch-Pruning drops a group that would lose every channel before we see it; let it through
        # so that _cap trims it to max_layer_amount, and check validity after the trim instead.
        check = pruner.DG.check_pruning_group
        pruner.DG.check_pruning_group = lambda group: True
        for group in pruner.step(interactive=True):
            group, scores = _cap(pruner, group, scorer, max_layer_amount, round_to)
            if group is None or not check(group):
                continue
            idxs = [int(i) for i in group[0][1]]
            if not idxs:
                continue
            if scores is not None:
                # grouped convolutions rank a channel by its mean over the channel groups
                per_base = scores.view(pruner._get_channel_groups(group), -1).mean(0)
                top = float(per_base[[i % len(per_base) for i in idxs]].max())
                threshold = top if threshold is None else max(threshold, top)
            removed += len(idxs)
            for dep, dep_idxs in group:
                nam = nam_of_bn.get(id(dep.layer))
                if nam is not None and nam.bn.weight is not None:
                    mass = nam.bn.weight.detach().abs()[list(dep_idxs)].sum()
                    nam.pruned_mass = nam.pruned_mass + mass.to(nam.pruned_mass.dtype)
            group.prune()
        history = [
            [name, bool(out), [int(i) for i in idxs]]
            for name, out, idxs in pruner.pruning_history()
        ]
        return history, threshold, removed


def _cap(
    pruner: Any, group: Any, scorer: _ScaleImportance, max_amount: float, round_to: int | None
) -> tuple[Any, torch.Tensor | None]:
    """Trim a group so that no layer it cuts loses more than ``max_amount`` of its channels.

    Torch-Pruning's global threshold can otherwise empty a layer in one step. The root layer
    keeps ``1 - max_amount`` of each channel group, and a multiple of ``round_to``; every other
    layer whose output channels the group cuts keeps ``1 - max_amount`` of its own (the inputs
    of a concatenation each hold only some of the root's channels). The least important
    channels are cut first. Returns the (possibly trimmed) group, or None, and the importance
    of every channel of the root.
    """
    dep, idxs = group[0]
    module, fn = dep.target.module, dep.handler
    graph = pruner.DG
    if graph.is_out_channel_pruning_fn(fn):
        total = graph.get_out_channels(module)
    else:
        total = graph.get_in_channels(module)
    full = graph.get_pruning_group(module, fn, list(range(total)))
    scores = scorer(full)
    if scores is None:  # unranked: Torch-Pruning does not offer such a group
        return None, scores
    ch_groups = pruner._get_channel_groups(group)
    group_size = total // ch_groups
    bases = sorted({int(i) % group_size for i in idxs})
    allowed = group_size - _keep_min(group_size, max_amount, round_to)
    held = []  # per layer the group cuts: the root channels it holds, and how many it may lose
    for i, (d, _) in enumerate(full):
        cuts_out = graph.is_out_channel_pruning_fn(d.handler)
        channels = graph.get_out_channels(d.layer) if cuts_out else None
        if channels and None not in full[i].root_idxs:
            held.append((set(full[i].root_idxs), channels - _keep_min(channels, max_amount, None)))
    per_base = scores.view(ch_groups, -1).mean(0)
    chosen: list[int] = []
    lost = [0] * len(held)
    for base in sorted(bases, key=lambda b: float(per_base[b])):
        cut = {base + g * group_size for g in range(ch_groups)}
        hits = [len(cut & roots) for roots, _ in held]
        if len(chosen) < allowed and all(
            n + h <= most for n, h, (_, most) in zip(lost, hits, held, strict=True)
        ):
            chosen.append(base)
            lost = [n + h for n, h in zip(lost, hits, strict=True)]
    while round_to and chosen and (group_size - len(chosen)) % round_to:
        chosen.pop()  # the most important; Torch-Pruning rounds grouped layers per channel
    if len(chosen) == len(bases):
        return group, scores
    if not chosen:
        return None, scores
    trimmed = sorted(b + g * group_size for g in range(ch_groups) for b in chosen)
    return graph.get_pruning_group(module, fn, trimmed), scores


def _keep_min(channels: int, max_amount: float, round_to: int | None) -> int:
    """The fewest channels a layer of ``channels`` keeps under ``max_amount`` and ``round_to``."""
    keep = max(1, math.ceil(channels * (1 - max_amount) - 1e-9))
    if round_to:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return keep


def _solve_amount(
    model: nn.Module,
    example_inputs: Any,
    flops_target: float,
    flops_before: int,
    snapshot: _Snapshot,
    *args: Any,
) -> float:
    """Bisect the amount whose pruned model keeps ``flops_target`` of the FLOPs."""
    low, high = 0.0, args[2]  # max_layer_amount bounds every layer, so the amount too
    best = (math.inf, high)
    for _ in range(14):
        amount = (low + high) / 2
        _prune(model, example_inputs, amount, *args)
        ratio = count_flops(model, example_inputs) / flops_before
        snapshot.restore()
        best = min(best, (abs(ratio - flops_target), amount))
        if abs(ratio - flops_target) <= 0.005:
            break
        if ratio > flops_target:
            low = amount
        else:
            high = amount
    if best[0] > 0.02:
        raise ValueError(
            f"`flops_target={flops_target}` cannot be reached within 2%: the closest is "
            f"{flops_target + best[0]:.3f} or {flops_target - best[0]:.3f} of the FLOPs "
            f"with max_layer_amount={args[2]}"
        )
    return best[1]


def _output_layer(model: nn.Module, example_inputs: Any) -> nn.Module:
    """The last parametrised leaf module that runs in the forward pass (the classifier)."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: order.append(m))
        for m in model.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with eval_mode(model):
            model(*as_args(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} ran no layer with parameters")
    return order[-1]


class _Snapshot:
    """Every module's attributes, parameters, buffers and children, to undo a surgery.

    Torch-Pruning replaces tensors and edits attributes, never writes into existing tensors, so
    keeping the references is enough to restore the model exactly.
    """

    def __init__(self, model: nn.Module) -> None:
        self.states = []
        for module in model.modules():
            state = dict(module.__dict__)
            for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                state[key] = type(state[key])(state[key])
            self.states.append((module, state))

    def restore(self) -> None:
        for module, state in self.states:
            module.__dict__.clear()
            module.__dict__.update(state)
            for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                module.__dict__[key] = type(state[key])(state[key])


def _check_arguments(
    amount: Any,
    flops_target: Any,
    importance: Any,
    scope: Any,
    max_layer_amount: Any,
    round_to: Any,
) -> None:
    if (amount is None) == (flops_target is None):
        raise ValueError(
            f"Give exactly one of `amount` and `flops_target`, got amount={amount!r}, "
            f"flops_target={flops_target!r}"
        )
    for name, value in (
        ("amount", amount),
        ("flops_target", flops_target),
        ("max_layer_amount", max_layer_amount),
    ):
        if value is None and name != "max_layer_amount":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"`{name}` must be a fraction in (0, 1), a float, got {type(value).__name__} "
                f"{value!r}"
            )
        if not 0 < value < 1:  # NaN fails this too
            raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")
    if importance not in ("bn", "nam"):
        raise ValueError(f"`importance` must be 'bn' or 'nam', got {importance!r}")
    if scope not in ("global", "local"):
        raise ValueError(f"`scope` must be 'global' or 'local', got {scope!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int)):
        raise TypeError(
            f"`round_to` must be None or a positive int, got {type(round_to).__name__} {round_to!r}"
        )
    if round_to is not None and round_to < 1:
        raise ValueError(f"`round_to` must be None or a positive int, got {round_to!r}")
    if amount is not None and amount > max_layer_amount and scope == "local":
        raise ValueError(
            f"`amount={amount}` exceeds `max_layer_amount={max_layer_amount}` with scope='local'"
        )
