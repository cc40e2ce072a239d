"""Channel pruning by BatchNorm scale factors (Network Slimming): what to remove, and how much.

Torch-Pruning finds which layers are coupled (residual additions, concatenations, depthwise
and grouped convolutions) and removes channels physically; :mod:`nam_lightning.surgery` is the
only module that talks to it. What to remove is decided here:

- ``importance="bn"`` (default): the raw ``|gamma|`` of the backbone BatchNorms that produce a
  channel (mean over the BatchNorms of a coupled group), one threshold for the whole network
  (``scope="global"``, as Network Slimming) or per layer (``"local"``). NAM's own BatchNorms do
  not count: a NAM ``gamma`` near 0 makes that channel's gate a constant 0.5 ("no attention"),
  which says nothing about whether the channel carries information.
- ``importance="nam"``: rank by NAM's ``gamma`` instead; only groups that contain a NAM module
  (the residual streams it gates) are pruned.

The arguments are checked before any work, and a failed call leaves the model as it was
(:class:`_Snapshot`).

Liu et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .attention import NAMChannelAttention
from .checks import (
    check_bool,
    check_choice,
    check_fraction,
    check_module,
    check_optional_positive_int,
)
from .compensate import input_means
from .prunable import check_channel_tensors
from .record import PruningPass, add_pruning_pass
from .report import (
    ForwardCount,
    PruneReport,
    count_flops,
    count_forward,
    count_params,
    layer_channels,
    measure_latency,
)
from .selection import predict_flops
from .sparsity import non_finite
from .surgery import PassResult, Plan, planned_pass, replay
from .utils import as_args

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
        compensate: fold what removed channels still output (a constant where their
            ``gamma`` is 0) into the layers that read them (:mod:`nam_lightning.compensate`).
    """

    amount: float | None = None
    flops_target: float | None = None
    importance: Importance = "bn"
    scope: Scope = "global"
    max_layer_amount: float = 0.9
    round_to: int | None = None
    compensate: bool = True

    def __post_init__(self) -> None:
        _check_config(self)

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
            compensate=self.compensate,
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
    compensate: bool = True,
    ignored_layers: Iterable[nn.Module] | None = None,
    measure: bool = True,
) -> PruneReport:
    """Remove the least important channels of ``model`` physically, in place.

    Args:
        model: a network with BatchNorm layers (NAM injected or not).
        example_inputs: a batch for ``model(...)`` (tensor or tuple), on the model's device;
            used to trace the network, count FLOPs and time it. The network is traced and its
            FLOPs counted on the first sample, the FLOPs then scaled by the batch size (the
            same count for networks that treat samples independently); on the whole batch where
            the tensors do not share a leading size or the output is not one row per sample.
        amount: fraction of the prunable channels to remove, in (0, 1).
        flops_target: instead of ``amount``: the fraction of FLOPs to keep, in (0, 1); the
            amount is solved on the FLOPs predicted for each amount, so that the result lands
            within 2% of it where channel granularity allows, and the model is cut once.
        importance: ``"bn"`` or ``"nam"`` (see the module docstring).
        scope: ``"global"``: one threshold over all layers; ``"local"``: ``amount`` per layer.
        max_layer_amount: no layer loses more than this fraction of its channels.
        round_to: keep every pruned layer's channel count a multiple of this (fast kernels).
            A layer holding the channels of several coupled groups (the output of a
            concatenation, or a layer added to it) can end up off the multiple.
        ignored_layers: modules never pruned. The layer that produces the model's output is
            always kept whole.
        compensate: fold what the removed channels still contribute into the layers that
            read them, so that channels with ``gamma = 0`` go without changing the outputs
            (exact for 1x1 and linear consumers and away from zero-padded borders; see
            :mod:`nam_lightning.compensate`). ``False`` drops it, as Network Slimming does.
        measure: time the model before and after on ``example_inputs``.

    Returns:
        A :class:`~nam_lightning.PruneReport`.

    Raises:
        ValueError: on bad arguments, a model without BatchNorm, or a failed surgery; the model
            is then exactly as it was.
    """
    check_bool("compensate", compensate)
    config = PruneConfig(
        amount, flops_target, importance, scope, max_layer_amount, round_to, compensate
    )
    check_module("model", model)
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
    check_bool("measure", measure)
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
    # FLOPs and the dependency graph are the same for every sample of the batch, so they are
    # counted and traced on the first sample alone, and the FLOPs scaled by the batch size.
    sample, batch = _first_sample(example_inputs)
    try:
        before = count_forward(model, sample)  # runs the model in eval mode
        if batch > 1 and before.output_batch != 1:  # the output is not one row per sample
            sample, batch = example_inputs, 1
            before = count_forward(model, sample)
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__} cannot run on `example_inputs` "
            f"({type(err).__name__}: {err}); give a batch the model takes. Nothing was changed."
        ) from err
    if before.last_layer is None:
        raise ValueError(f"{type(model).__name__} ran no layer with parameters")
    check_channel_tensors(model, example_inputs)  # layers the surgery could not follow
    ignored.append(before.last_layer)  # the output layer is always kept whole
    params_before = count_params(model)
    channels_before = layer_channels(model)
    latency_before = latency_after = None
    timed = 0.0  # seconds spent timing the model
    if measure:
        started = time.perf_counter()
        latency_before = measure_latency(model, example_inputs)
        timed = time.perf_counter() - started

    snapshot = _Snapshot(model)
    try:
        # what each layer reads, over the whole batch, before anything is cut
        means = input_means(model, example_inputs) if config.compensate else None
        done, amount, flops_after = _cut(model, sample, config, ignored, before, snapshot, means)
        traced = tuple(tuple(a.shape) for a in as_args(sample) if isinstance(a, torch.Tensor))
        add_pruning_pass(model, PruningPass(history=done.history, input_shapes=traced))
    except Exception as err:
        snapshot.restore()
        raise ValueError(f"Channel pruning failed, the model is unchanged: {err}") from err

    notes = []
    if done.removed == 0:
        notes.append(
            "No channel was removed: no layer had channels to spare under "
            f"max_layer_amount={max_layer_amount} and round_to={round_to} (a round_to larger "
            "than the layers, or an amount too small for one channel, does this)."
        )
        warnings.warn(notes[-1], stacklevel=2)
    if done.uncompensated:
        notes.append(
            "What the removed channels output could not be kept for "
            f"{', '.join(done.uncompensated[:5])}: neither a following BatchNorm nor a bias "
            "to take it (fine-tuning recovers it)."
        )
    surgery = time.perf_counter() - start - timed
    if measure:
        started = time.perf_counter()
        latency_after = measure_latency(model, example_inputs)
        timed += time.perf_counter() - started
    args = as_args(example_inputs)
    return PruneReport(
        params_before=params_before,
        params_after=count_params(model),
        flops_before=before.flops * batch,
        flops_after=flops_after * batch,
        channels_before=channels_before,
        channels_after=layer_channels(model),
        threshold=done.threshold,
        removed_channels=done.removed,
        importance=importance,
        scope=scope,
        amount=amount,
        flops_target=flops_target,
        latency_before=latency_before,
        latency_after=latency_after,
        device=str(next(a for a in args if isinstance(a, torch.Tensor)).device),
        seconds=time.perf_counter() - start,
        surgery_seconds=surgery,
        measure_seconds=timed,
        notes=notes,
    )


def replay_pruning(model: nn.Module, passes: Sequence[PruningPass]) -> None:
    """Redo recorded pruning passes on a freshly built model (for loading checkpoints)."""
    for done in passes:
        replay(model, done.history, done.input_shapes)
        add_pruning_pass(model, done)


def removal_plan(
    model: nn.Module, example_inputs: Any, config: PruneConfig, amount: float | None = None
) -> tuple[dict[str, list[int]], float]:
    """The channels ``config.apply(model, example_inputs)`` would remove now, without removing
    them: for each BatchNorm that ranks channels (the backbone's, or NAM's with
    ``importance="nam"``) and would lose some, its weight's name and the indices lost.

    A dry run of the real pruning: every ranking BatchNorm's bias is replaced by its channel
    indices (the bias takes no part in the ranking, and the surgery cuts it like the weight),
    the model is cut, the surviving indices are read back, and the model is restored exactly.
    Returns the plan and the amount pruned: ``config``'s own, the one solved for its
    ``flops_target``, or ``amount`` when given (which skips solving a FLOPs target again).
    """
    ranking = {id(m.bn) for m in model.modules() if isinstance(m, NAMChannelAttention)}
    use_nam = config.importance == "nam"
    marked: dict[str, tuple[_BatchNorm, int]] = {}
    snapshot = _Snapshot(model)
    try:
        for name, module in model.named_modules():
            ranks = (id(module) in ranking) == use_nam  # the BatchNorms whose gamma ranks
            if isinstance(module, _BatchNorm) and module.bias is not None and ranks:
                bias = module.bias
                index = torch.arange(bias.shape[0], dtype=torch.float64, device=bias.device)
                module.bias = nn.Parameter(index.to(bias.dtype), requires_grad=False)
                marked[name] = (module, bias.shape[0])
        sample, _ = _first_sample(example_inputs)
        before = count_forward(model, sample)
        assert before.last_layer is not None
        dry = replace(config, compensate=False)
        if amount is not None:
            dry = replace(dry, amount=amount, flops_target=None)
        _, amount, _ = _cut(model, sample, dry, [before.last_layer], before, _Snapshot(model))
        plan = {}
        for name, (bn, count) in marked.items():
            assert bn.bias is not None
            kept = {int(i) for i in bn.bias.detach().round().tolist()}
            lost = [i for i in range(count) if i not in kept]
            if lost:
                plan[f"{name}.weight" if name else "weight"] = lost
        return plan, amount
    finally:
        snapshot.restore()


def _cut(
    model: nn.Module,
    sample: Any,
    config: PruneConfig,
    ignored: list[nn.Module],
    before: ForwardCount,
    snapshot: _Snapshot,
    means: dict[nn.Module, torch.Tensor] | None = None,
) -> tuple[PassResult, float, int]:
    """One pass at ``config.amount``, or at the amount whose predicted FLOPs come closest to
    ``config.flops_target``; returns the pass, the amount and the FLOPs after it.

    The FLOPs after a cut are predicted from those counted inside each convolution and linear
    layer (:func:`~nam_lightning.selection.predict_flops`). Where every FLOP is counted inside
    one, the prediction is exact and the FLOPs are not counted again. Otherwise they are; for
    a FLOPs target, a count off the target corrects the prediction, and the model is restored
    and cut again (at most three times).
    """
    layers: dict[nn.Module, int] = {
        m: flops
        for m, flops in before.layer_flops.items()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }
    exact = sum(layers.values()) == before.flops
    target = config.flops_target
    miss = 0  # what the prediction left out, as the last count found
    for _ in range(3):
        with planned_pass(model, sample, config, ignored) as plan:
            predict = functools.partial(_predict, plan, layers, before.flops + miss)
            amount = config.amount if target is None else _solve_amount(predict, config, before)
            assert amount is not None
            predicted = predict(amount)
            # each try gets its own copy: the cut consumes the means it compensates with
            done = plan.cut(plan.select(amount), None if means is None else dict(means))
        flops = predicted if exact else count_flops(model, sample)
        if target is None or flops == predicted or abs(flops / before.flops - target) <= 0.02:
            return done, amount, flops
        snapshot.restore()
        miss += flops - predicted
    raise ValueError(
        f"`flops_target={target}` cannot be reached within 2%: the cuts chosen for it kept "
        f"{flops / before.flops:.3f} of the FLOPs"
    )


def _predict(plan: Plan, layer_flops: dict[nn.Module, int], total: int, amount: float) -> int:
    """The FLOPs after cutting ``amount``, as ``plan`` predicts them from ``total`` before."""
    return predict_flops(plan.groups, plan.select(amount), layer_flops, total)


def _solve_amount(
    predict: Callable[[float], int], config: PruneConfig, before: ForwardCount
) -> float:
    """Bisect the amount whose predicted FLOPs are ``config.flops_target`` of those before."""
    target = config.flops_target
    assert target is not None
    low, high = 0.0, config.max_layer_amount  # it bounds every layer, so the amount too
    best = (math.inf, high)
    for _ in range(20):
        amount = (low + high) / 2
        ratio = predict(amount) / before.flops
        best = min(best, (abs(ratio - target), amount))
        if abs(ratio - target) <= 0.001:
            break
        if ratio > target:
            low = amount
        else:
            high = amount
    if best[0] > 0.02:
        raise ValueError(
            f"`flops_target={target}` cannot be reached within 2%: the closest is "
            f"{target + best[0]:.3f} or {target - best[0]:.3f} of the FLOPs "
            f"with max_layer_amount={config.max_layer_amount}"
        )
    return best[1]


def _first_sample(example_inputs: Any) -> tuple[Any, int]:
    """``example_inputs`` cut to the first sample, and the batch size; unchanged (and 1) where
    its tensors do not share one leading size."""
    args = as_args(example_inputs)
    sizes = {a.shape[0] if a.dim() else None for a in args if isinstance(a, torch.Tensor)}
    if len(sizes) != 1 or None in sizes:
        return example_inputs, 1
    batch = sizes.pop()
    assert batch is not None
    first = tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in args)
    return (first if isinstance(example_inputs, tuple) else first[0]), batch


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


def _check_config(config: PruneConfig) -> None:
    amount, flops_target = config.amount, config.flops_target
    if (amount is None) == (flops_target is None):
        raise ValueError(
            f"Give exactly one of `amount` and `flops_target`, got amount={amount!r}, "
            f"flops_target={flops_target!r}"
        )
    if amount is not None:
        check_fraction("amount", amount)
    if flops_target is not None:
        check_fraction("flops_target", flops_target)
    check_fraction("max_layer_amount", config.max_layer_amount)
    check_choice("importance", config.importance, get_args(Importance))
    check_choice("scope", config.scope, get_args(Scope))
    check_optional_positive_int("round_to", config.round_to)
    check_bool("compensate", config.compensate)
    if amount is not None and amount > config.max_layer_amount and config.scope == "local":
        raise ValueError(
            f"`amount={amount}` exceeds `max_layer_amount={config.max_layer_amount}` with "
            "scope='local'"
        )
