"""Properties of injection, the L1 penalty and channel pruning over generated CNNs (hypothesis).

A strategy draws a printable :class:`NetSpec` (a plain conv-BN-ReLU stem, then plain units,
residual blocks with an identity or 1x1-projection skip, DenseNet/Inception-like
concatenations and pooling; dense, grouped and depthwise convolutions; BatchNorm left out of
some units) and :func:`build` turns it into an ``nn.Module``. NAM goes after BatchNorms named in
the spec (the last BatchNorm of residual branches first), by a list of names or by a predicate.

The CI profile is small and derandomised (the same examples on every run)::

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_properties.py

The long profile draws a few hundred fresh examples per test, to hunt for bugs by hand::

    HYPOTHESIS_PROFILE=long OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_properties.py
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch
import torch_pruning as tp
from helpers import assert_unchanged, conv_channels, nam_bns, randomise_bns, snapshot
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nam_lightning import NAM, NAMChannelAttention, inject_nam, l1_penalty, prune_channels
from nam_lightning.report import count_flops, count_params, layer_channels
from nam_lightning.surgery import ScaleImportance

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,  # derandomised: a failure replays from the test itself
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("long", settings.get_profile("ci"), max_examples=300, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the spec -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """``conv(inp -> out, kernel, groups, stride)``, then BatchNorm if ``bn``, then ReLU if
    ``act``. ``groups == inp == out`` is a depthwise convolution."""

    inp: int
    out: int
    kernel: int = 3
    groups: int = 1
    stride: int = 1
    bn: bool = True
    act: bool = True


@dataclass(frozen=True)
class Plain:
    unit: Unit


@dataclass(frozen=True)
class Residual:
    """``relu(branch(x) + skip(x))``; the skip is the identity or a ``projection`` unit."""

    branch: tuple[Unit, ...]
    projection: Unit | None = None


@dataclass(frozen=True)
class Concat:
    """``cat(([x] if keep_input else []) + [branch(x) for branch in branches])`` on channels."""

    branches: tuple[tuple[Unit, ...], ...]
    keep_input: bool = False


@dataclass(frozen=True)
class Pool:
    kind: Literal["max", "avg"] = "max"


Block = Plain | Residual | Concat | Pool


@dataclass(frozen=True)
class NetSpec:
    """A network, its input and where NAM goes (``nam_by=None``: nowhere)."""

    in_channels: int
    size: int
    batch: int
    blocks: tuple[Block, ...]
    head: Literal["linear", "conv"] = "linear"
    classes: int = 3
    nam_sites: tuple[str, ...] = ()
    nam_by: Literal["names", "predicate"] | None = None
    spatial: bool = False


# --- the model ------------------------------------------------------------------------------


class ConvUnit(nn.Sequential):
    def __init__(self, u: Unit) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            u.inp, u.out, u.kernel, u.stride, u.kernel // 2, groups=u.groups, bias=not u.bn
        )
        if u.bn:
            layers["bn"] = nn.BatchNorm2d(u.out)
        if u.act:
            layers["act"] = nn.ReLU()
        super().__init__(layers)


class ResidualBlock(nn.Module):
    def __init__(self, spec: Residual) -> None:
        super().__init__()
        self.branch = nn.Sequential(*(ConvUnit(u) for u in spec.branch))
        self.shortcut: nn.Module = ConvUnit(spec.projection) if spec.projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


class ConcatBlock(nn.Module):
    def __init__(self, spec: Concat) -> None:
        super().__init__()
        self.keep_input = spec.keep_input
        self.branches = nn.ModuleList(
            nn.Sequential(*(ConvUnit(u) for u in branch)) for branch in spec.branches
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x] if self.keep_input else []
        return torch.cat(parts + [branch(x) for branch in self.branches], dim=1)


class GeneratedNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(build_block(b) for b in spec.blocks))
        width = channels_after(spec.in_channels, spec.blocks)
        self.head = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, spec.classes))
            if spec.head == "linear"
            else nn.Sequential(
                nn.Conv2d(width, spec.classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def build_block(block: Block) -> nn.Module:
    if isinstance(block, Plain):
        return ConvUnit(block.unit)
    if isinstance(block, Residual):
        return ResidualBlock(block)
    if isinstance(block, Concat):
        return ConcatBlock(block)
    return nn.MaxPool2d(2) if block.kind == "max" else nn.AvgPool2d(2)


def block_out(channels: int, block: Block) -> int:
    if isinstance(block, Plain):
        return block.unit.out
    if isinstance(block, Residual):
        return block.branch[-1].out
    if isinstance(block, Concat):
        return channels * block.keep_input + sum(b[-1].out for b in block.branches)
    return channels


def channels_after(channels: int, blocks: Sequence[Block]) -> int:
    for block in blocks:
        channels = block_out(channels, block)
    return channels


def build(spec: NetSpec) -> tuple[GeneratedNet, torch.Tensor, torch.Tensor]:
    """The model with NAM injected as the spec says, a batch and its labels."""
    for feature in features(spec):
        event(feature)
    model = GeneratedNet(spec)
    x = torch.randn(spec.batch, spec.in_channels, spec.size, spec.size)
    y = torch.randint(spec.classes, (spec.batch,))
    if spec.nam_by is not None:
        names = set(spec.nam_sites)
        sites: Sequence[str] | Callable[[str, nn.Module], bool] = (
            list(spec.nam_sites) if spec.nam_by == "names" else lambda n, _m: n in names
        )
        found = inject_nam(
            model, sites, spatial=spec.spatial, example_inputs=x if spec.spatial else None
        )
        assert sorted(found) == sorted(names)
    note(repr(model))
    return model, x, y


# --- the strategies -------------------------------------------------------------------------

WIDTH = st.integers(2, 16)
HEADS: tuple[Literal["linear", "conv"], ...] = ("linear", "conv")
NAM_BY: tuple[Literal["names", "predicate"] | None, ...] = (None, "names", "predicate")
SOME_BN = st.sampled_from([True, True, True, False])  # shrinks towards "with BatchNorm"


def out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # kernel 3 padding 1 and kernel 1 padding 0 alike


@st.composite
def units(
    draw: st.DrawFn,
    inp: int,
    size: int,
    *,
    out: int | None = None,
    act: bool = True,
    stride: bool = True,
    bn: bool = True,
) -> Unit:
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "depthwise" and out in (None, inp):
        out = groups = inp
    else:
        out = draw(WIDTH) if out is None else out
        # every common divisor, including groups == inp < out (a channel multiplier) and
        # groups == out < inp, which Torch-Pruning mistakes for a depthwise conv
        common = [g for g in range(2, min(inp, out) + 1) if inp % g == 0 and out % g == 0]
        groups = draw(st.sampled_from(common)) if kind == "grouped" and common else 1
    return Unit(
        inp,
        out,
        kernel=draw(st.sampled_from([3, 1])),
        groups=groups,
        stride=draw(st.sampled_from([1, 2])) if stride and size >= 4 else 1,
        bn=draw(SOME_BN) if bn else False,
        act=act,
    )


@st.composite
def chains(
    draw: st.DrawFn, inp: int, size: int, out: int, *, act: bool, stride: bool, bn: bool
) -> tuple[Unit, ...]:
    """1-3 units from ``inp`` to ``out`` channels; only the first may stride."""
    n = draw(st.integers(1, 3))
    widths = [draw(WIDTH) for _ in range(n - 1)] + [out]
    chain = []
    for i, width in enumerate(widths):
        chain.append(
            draw(units(inp, size, out=width, act=act or i < n - 1, stride=stride and i == 0, bn=bn))
        )
        inp = width
    return tuple(chain)


@st.composite
def residuals(draw: st.DrawFn, inp: int, size: int, bn: bool) -> Residual:
    if not draw(st.booleans()):  # identity skip: same width, same size
        return Residual(draw(chains(inp, size, inp, act=False, stride=False, bn=bn)))
    out = draw(WIDTH)
    branch = draw(chains(inp, size, out, act=False, stride=True, bn=bn))
    stride = branch[0].stride
    projection = Unit(inp, out, 1, 1, stride, draw(SOME_BN) if bn else False, act=False)
    return Residual(branch, projection)


@st.composite
def concats(draw: st.DrawFn, inp: int, size: int, bn: bool) -> Concat:
    keep_input = draw(st.booleans())
    n = draw(st.integers(2 - keep_input, 3))
    branches = tuple(
        draw(chains(inp, size, draw(WIDTH), act=True, stride=False, bn=bn)) for _ in range(n)
    )
    return Concat(branches, keep_input)


def bn_sites(blocks: Sequence[Block]) -> tuple[list[str], list[str]]:
    """Names of the BatchNorms: those ending a residual branch, and all others."""
    last, other = [], []
    for i, block in enumerate(blocks):
        chains_: list[tuple[str, Sequence[Unit]]] = []
        if isinstance(block, Plain):
            chains_ = [(f"blocks.{i}.", [block.unit])]
        elif isinstance(block, Residual):
            *init, end = block.branch
            if end.bn:
                last.append(f"blocks.{i}.branch.{len(init)}.bn")
            chains_ = [(f"blocks.{i}.branch.{j}.", [u]) for j, u in enumerate(init)]
            if block.projection is not None:
                chains_.append((f"blocks.{i}.shortcut.", [block.projection]))
        elif isinstance(block, Concat):
            chains_ = [
                (f"blocks.{i}.branches.{j}.{k}.", [u])
                for j, branch in enumerate(block.branches)
                for k, u in enumerate(branch)
            ]
        other += [prefix + "bn" for prefix, us in chains_ for u in us if u.bn]
    return last, other


@st.composite
def nets(draw: st.DrawFn, bn: bool = True) -> NetSpec:
    in_channels = draw(st.sampled_from([3, 1]))
    size = draw(st.sampled_from([8, 12, 16]))
    stem = Unit(in_channels, draw(WIDTH), 3, 1, 1, bn=draw(SOME_BN) if bn else False)
    blocks: list[Block] = [Plain(stem)]
    channels, spatial = stem.out, size
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["plain", "residual", "concat", "pool"]))
        block: Block
        if kind == "plain":
            block = Plain(draw(units(channels, spatial, bn=bn)))
            spatial = out_size(spatial, block.unit.stride)
        elif kind == "residual":
            block = draw(residuals(channels, spatial, bn))
            spatial = out_size(spatial, block.branch[0].stride)
        elif kind == "concat":
            block = draw(concats(channels, spatial, bn))
        elif spatial >= 4:
            block = Pool(draw(st.sampled_from(["max", "avg"])))
            spatial //= 2
        else:
            continue
        blocks.append(block)
        channels = block_out(channels, block)
    last, other = bn_sites(blocks)
    nam_by = draw(st.sampled_from(NAM_BY)) if last + other else None
    sites = (
        tuple(draw(st.lists(st.sampled_from(last + other), min_size=1, unique=True)))
        if nam_by
        else ()
    )
    return NetSpec(
        in_channels,
        size,
        batch=draw(st.integers(2, 4)),
        blocks=tuple(blocks),
        head=draw(st.sampled_from(HEADS)),
        nam_sites=sites,
        nam_by=nam_by,
        spatial=bool(nam_by) and draw(st.booleans()),
    )


def features(spec: NetSpec) -> set[str]:
    """What a spec exercises, for ``--hypothesis-show-statistics``."""
    found = {f"{len(spec.blocks)} blocks", f"{spec.head} head"}
    all_units: list[Unit] = []
    for block in spec.blocks:
        found.add(type(block).__name__)
        if isinstance(block, Plain):
            all_units.append(block.unit)
        elif isinstance(block, Residual):
            found.add("projection" if block.projection else "identity skip")
            all_units += [*block.branch, *([block.projection] if block.projection else [])]
        elif isinstance(block, Concat):
            found.add("concat with its input" if block.keep_input else "concat of branches")
            all_units += [u for branch in block.branches for u in branch]
    for u in all_units:
        if u.groups == u.inp == u.out:
            found.add("depthwise conv")
        elif u.groups > 1:
            found.add("grouped conv")
        if not u.bn:
            found.add("unit without BatchNorm")
        if u.stride > 1:
            found.add("stride 2")
    if spec.nam_by:
        found.add(f"NAM by {spec.nam_by}" + (", spatial" if spec.spatial else ""))
    return found


def has_bn(spec: NetSpec) -> bool:
    return any(isinstance(m, _BatchNorm) for m in GeneratedNet(spec).modules())


def output_layer(model: GeneratedNet) -> nn.Linear | nn.Conv2d:
    return next(m for m in reversed(model.head) if isinstance(m, (nn.Linear, nn.Conv2d)))


# --- 1. train, prune, train on -------------------------------------------------------------


# Nets that failed, minimised, with their round_to and amount. Pruning raised (the model
# restored) where Torch-Pruning 1.6.1 ranked or cut a group inconsistently: a grouped conv whose
# channels are not exactly the group's, a conv it takes for depthwise, mismatched channel
# groups, a mean over BatchNorms that hold different parts of the group. Such groups are now
# ranked per channel, or left whole. Its round_to counts a grouped layer's channels but cuts
# channel groups, missing the multiple; now the cut is rounded per channel group. The last one
# kept a conv holding a concatenation's channels off the multiple, which no per-group cut can
# ensure; see `whole` in the test.
REGRESSIONS: dict[str, tuple[NetSpec, int | None, float]] = {
    "grouped conv whose channels a concatenation splits": (
        NetSpec(
            3,
            8,
            2,
            blocks=(
                Plain(Unit(3, 2)),
                Concat(((Unit(2, 2),), (Unit(2, 10),))),
                Residual((Unit(12, 3), Unit(3, 12, groups=3, act=False))),
            ),
        ),
        None,
        0.5,
    ),
    "grouped conv whose channels a concatenation pads with others": (
        NetSpec(
            3,
            8,
            2,
            blocks=(
                Plain(Unit(3, 2)),
                Concat(((Unit(2, 3),), (Unit(2, 4), Unit(4, 4, groups=2)))),
                Residual((Unit(7, 7, act=False),)),
                Plain(Unit(7, 7, groups=7)),
            ),
        ),
        None,
        0.5,
    ),
    "groups == out_channels < in_channels, taken for depthwise": (
        NetSpec(3, 8, 2, blocks=(Plain(Unit(3, 4)), Plain(Unit(4, 2, groups=2)))),
        None,
        0.5,
    ),
    "groups 2 and 3 on one 6-channel tensor": (
        NetSpec(
            3,
            8,
            2,
            blocks=(Plain(Unit(3, 6)), Plain(Unit(6, 6, groups=2)), Plain(Unit(6, 6, groups=3))),
        ),
        None,
        0.5,
    ),
    "concatenation under a residual conv without BatchNorm": (
        NetSpec(
            3,
            8,
            2,
            blocks=(
                Plain(Unit(3, 2)),
                Concat(((Unit(2, 2),), (Unit(2, 2),))),
                Residual((Unit(4, 4, bn=False, act=False),)),
            ),
        ),
        None,
        0.5,
    ),
    "round_to=4 on a conv with 2 channel groups of 9": (
        NetSpec(3, 8, 2, blocks=(Plain(Unit(3, 18)), Plain(Unit(18, 18, groups=2)))),
        4,
        0.1,
    ),
    "round_to after a concatenation with its input": (
        NetSpec(
            3,
            8,
            2,
            blocks=(
                Plain(Unit(3, 9)),
                Concat(((Unit(9, 2), Unit(2, 3)),), keep_input=True),
                Residual((Unit(12, 12, act=False),)),
                Residual((Unit(12, 12, act=False),)),
            ),
        ),
        2,
        0.5,
    ),
}


def regressions(test: Callable[..., None]) -> Callable[..., None]:
    for spec, round_to, amount in REGRESSIONS.values():
        test = example(
            spec=spec,
            amount=amount,
            scope="global",
            use_nam=False,
            max_layer_amount=0.9,
            round_to=round_to,
            lambda_=1e-4,
            seed=0,
        )(test)
    return test


@pytest.mark.filterwarnings("ignore:No channel was removed")  # small nets, small amounts
@regressions
@given(
    spec=nets(),
    amount=st.floats(0.1, 0.7),  # never above max_layer_amount, which scope="local" refuses
    scope=st.sampled_from(["global", "local"]),
    use_nam=st.booleans(),
    max_layer_amount=st.sampled_from([0.9, 0.7]),
    round_to=st.sampled_from([None, 2, 4]),
    lambda_=st.sampled_from([1e-4, 0.0, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_a_trained_generated_net_prunes_into_a_smaller_working_net(
    spec: NetSpec,
    amount: float,
    scope: Literal["global", "local"],
    use_nam: bool,
    max_layer_amount: float,
    round_to: int | None,
    lambda_: float,
    seed: int,
) -> None:
    """Inject (maybe), one SGD step on ``loss + lambda * l1_penalty``, prune: the result runs
    forward and backward with the same output shape, and has fewer parameters when anything was
    removed (the same number otherwise). No conv loses more than ``max_layer_amount`` of its
    channels, the output layer none, and with ``round_to`` a conv whose channels are exactly one
    coupled group's keeps a multiple of it (or all its channels)."""
    assume(has_bn(spec))
    torch.manual_seed(seed)
    model, x, y = build(spec)
    randomise_bns(model, seed=seed)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = nn.functional.cross_entropy(model(x), y) + lambda_ * l1_penalty(model)
    loss.backward()
    optimizer.step()
    params_before, convs_before = count_params(model), conv_channels(model)
    # round_to can hold only where a conv's channels are one group's: a conv holding a
    # concatenation's channels takes cuts from several groups, each rounded on its own
    whole = set().union(*(g.whole for g in coupled_groups(model, x)))
    flags = {n: m.training for n, m in model.named_modules()}
    importance: Literal["bn", "nam"] = "nam" if use_nam and spec.nam_by else "bn"

    report = prune_channels(
        model,
        x,
        amount,
        importance=importance,
        scope=scope,
        max_layer_amount=max_layer_amount,
        round_to=round_to,
        measure=False,
    )

    assert {n: m.training for n, m in model.named_modules()} == flags
    assert report.params_before == params_before
    assert report.params_after == count_params(model)
    assert report.channels_after == layer_channels(model)
    assert report.flops_after == count_flops(model, x)  # predicted from the layers' FLOPs
    if report.removed_channels:
        assert report.params_after < params_before
        assert report.flops_after < report.flops_before
    else:
        assert report.params_after == params_before
        assert conv_channels(model) == convs_before
    for name, channels in conv_channels(model).items():
        assert math.ceil(convs_before[name] * (1 - max_layer_amount) - 1e-9) <= channels
        assert channels <= convs_before[name]
        if round_to and name in whole:
            assert channels == convs_before[name] or channels % round_to == 0, name
    assert output_layer(model).weight.shape[0] == spec.classes

    out = model(x)  # training on with a new optimizer: the parameters are new tensors
    assert out.shape == (spec.batch, spec.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    (nn.functional.cross_entropy(out, y) + lambda_ * l1_penalty(model)).backward()
    assert all(
        p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters()
    )
    optimizer.step()
    assert model.eval()(x).shape == (spec.batch, spec.classes)


# --- 2. removing channels that carry nothing is exact ---------------------------------------


@dataclass
class CoupledGroup:
    """A Torch-Pruning group of channels that must go together, read from a traced copy."""

    root: str  # the conv (or linear layer) whose output channels define the group
    ranked: bool  # importance="bn" scores it (Torch-Pruning skips the others)
    channel_groups: int  # > 1: a grouped conv takes the same base channel from each group
    bases: int  # channels per channel group: what the global ranking counts
    exact: bool  # every conv whose output channels are in the group feeds only a BatchNorm
    graph: Any  # the traced copy's tp.DependencyGraph, and the root as it knows it
    module: nn.Module
    handler: Any
    names: dict[int, str]  # id of a module of the traced copy -> its name
    held: list[tuple[set[int], int]]  # per layer whose output channels the group cuts: the
    # root channels it holds and its channel count (a concatenation's input holds only some)
    whole: set[str]  # convs whose output channels are exactly the root's

    def within_limits(self, bases: list[int]) -> list[int]:
        """``bases`` (in order) but those that would make a layer of the group lose more than
        ``max_layer_amount`` of its channels: the root per channel group, all others in all."""
        kept: list[int] = []
        lost = [0] * len(self.held)
        for base in bases:
            cut = {base + g * self.bases for g in range(self.channel_groups)}
            hits = [len(cut & roots) for roots, _ in self.held]
            if len(kept) < lose_at_most(self.bases) and all(
                n + h <= lose_at_most(channels)
                for n, h, (_, channels) in zip(lost, hits, self.held, strict=True)
            ):
                kept.append(base)
                lost = [n + h for n, h in zip(lost, hits, strict=True)]
        return kept


def lose_at_most(channels: int, max_layer_amount: float = 0.9) -> int:
    """The most channels a layer may lose: ``max_layer_amount`` of them, and never the last."""
    return min(channels - 1, math.floor(channels * max_layer_amount + 1e-9))


def coupled_groups(model: GeneratedNet, x: torch.Tensor) -> list[CoupledGroup]:
    """Torch-Pruning's coupled groups of ``model`` (the output layer's channels are kept)."""
    clone = copy.deepcopy(model)
    for m in clone.modules():  # the pruner traces without spatial attention; so do we
        if isinstance(m, NAM):
            m.spatial = None
    followed_by_bn = {
        id(unit.conv): "bn" in unit._modules
        for unit in clone.modules()
        if isinstance(unit, ConvUnit)
    }
    names = {id(m): n for n, m in clone.named_modules()}
    scorer = ScaleImportance(clone, use_nam=False)
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            clone.eval(),
            x,
            importance=tp.importance.BNScaleImportance(),
            ignored_layers=[output_layer(clone)],
        )
    graph = pruner.DG
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        layers = [(dep.layer, dep.handler) for dep, _ in group]
        root, handler = group[0][0].target.module, group[0][0].handler
        held = [
            (set(item.root_idxs), graph.get_out_channels(m))
            for item, (m, fn) in zip(group, layers, strict=True)
            if graph.is_out_channel_pruning_fn(fn) and graph.get_out_channels(m)
        ]
        size = len(group[0][1])
        whole = {
            names[id(m)]
            for (m, fn), (_, idxs) in zip(layers, group, strict=True)
            if isinstance(m, nn.Conv2d) and graph.is_out_channel_pruning_fn(fn)
            if len(idxs) == m.out_channels == size
        }
        ch = pruner._get_channel_groups(group)
        groups.append(
            CoupledGroup(
                root=names[id(root)],
                ranked=scorer(group) is not None,
                channel_groups=ch,
                bases=graph.get_out_channels(root) // ch,
                exact=all(
                    followed_by_bn.get(id(m), False)
                    for m, fn in layers
                    if isinstance(m, nn.Conv2d) and graph.is_out_channel_pruning_fn(fn)
                ),
                graph=graph, module=root, handler=handler,  # the traced copy's
                names=names, held=held, whole=whole,
            )
        )
    return groups


def zero_channels(model: nn.Module, group: CoupledGroup, bases: list[int]) -> dict[str, list[int]]:
    """Zero gamma and beta of ``bases`` (in every channel group) in every backbone BatchNorm of
    the group; returns the channels each NAM BatchNorm of the group loses, by module name."""
    idxs = [b + g * group.bases for g in range(group.channel_groups) for b in bases]
    names = group.names
    skip = nam_bns(model)
    nam_loses: dict[str, list[int]] = {}
    for dep, dep_idxs in group.graph.get_pruning_group(group.module, group.handler, idxs):
        if not isinstance(dep.layer, _BatchNorm):
            continue
        bn = model.get_submodule(names[id(dep.layer)])
        assert isinstance(bn, _BatchNorm) and bn.weight is not None and bn.bias is not None
        if id(bn) in skip:
            nam_loses.setdefault(names[id(dep.layer)], []).extend(int(i) for i in dep_idxs)
        else:
            with torch.no_grad():
                bn.weight[list(dep_idxs)] = 0
                bn.bias[list(dep_idxs)] = 0
    return nam_loses


@given(spec=nets(), seed=st.integers(0, 2**16), data=st.data())
def test_removing_channels_that_carry_nothing_leaves_outputs_unchanged(
    spec: NetSpec, seed: int, data: st.DataObject
) -> None:
    """In eval mode, zero gamma and beta of chosen channels and prune exactly that many: the
    outputs do not change.

    What makes this true: a channel is zeroed in *every* backbone BatchNorm of its coupled group
    (all the BatchNorms Torch-Pruning removes it from: across residual additions, through
    depthwise convs, at its offset after a concatenation, and in the same position of every
    channel group of a grouped conv). In eval mode such a BatchNorm outputs exactly 0 there, and
    ReLU, pooling, additions of zeros, concatenation and NAM's gate ``x * sigmoid(...)`` keep it
    0, so every consumer conv or linear layer gets an input channel of zeros whose removal
    changes nothing. NAM keeps the removed channels' ``|gamma|`` in ``pruned_mass``, so its
    remaining weights, and with eval-mode statistics its spatial gate, are unchanged. This holds
    only where *every* conv whose output channels are in the group feeds a BatchNorm: a conv
    without one (it has a bias) writes a non-zero value into the channel, so such groups are
    never zeroed (``CoupledGroup.exact``). Zeroed channels rank first (score 0 against gammas in
    [0.5, 1]), and all of them go as long as no layer of a group would lose more than
    ``max_layer_amount`` (0.9) of its channels, which the choice respects
    (``CoupledGroup.within_limits``; a concatenation's input can hold few of a group's channels).
    """
    assume(has_bn(spec))
    torch.manual_seed(seed)
    model, x, _ = build(spec)
    randomise_bns(model, seed=seed).eval()
    groups = [g for g in coupled_groups(model, x) if g.ranked]
    eligible = [g for g in groups if g.exact and g.bases > 1]
    assume(eligible)
    first = data.draw(st.sampled_from(eligible), label="a group that surely loses a channel")

    nam_loses: dict[str, list[int]] = {}
    zeroed = removed = 0
    for group in eligible:
        drawn = st.lists(
            st.integers(0, group.bases - 1),
            min_size=group is first,
            max_size=group.bases - 1,
            unique=True,
        )
        bases = group.within_limits(
            data.draw(drawn, label=f"zeroed channels of the group of {group.root}")
        )
        for name, idxs in zero_channels(model, group, bases).items():
            nam_loses.setdefault(name, []).extend(idxs)
        zeroed += len(bases)
        removed += len(bases) * group.channel_groups
        if bases and group.channel_groups > 1:
            event("zeroed in every channel group of a grouped conv")
        if bases and any(n != group.bases * group.channel_groups for _, n in group.held):
            event("zeroed in a group that a concatenation splits or joins")
    assume(zeroed)
    if nam_loses:
        event("zeroed under NAM")
    ranked = sum(g.bases for g in groups)  # the global ranking's denominator
    expected = model(x).detach()
    nams = {n: m for n, m in model.named_modules() if isinstance(m, NAMChannelAttention)}
    weights = {n: m.weights().clone() for n, m in nams.items()}
    gammas = {n: m.bn.weight.detach().abs().clone() for n, m in nams.items()}

    report = prune_channels(model, x, (zeroed - 0.5) / ranked, measure=False)

    skip = nam_bns(model)
    assert all(
        bool((m.weight != 0).all())
        for m in model.modules()
        if isinstance(m, _BatchNorm) and id(m) not in skip and m.weight is not None
    ), "a zeroed channel survived"
    assert report.removed_channels == removed
    assert report.threshold == 0
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    for name, nam in nams.items():
        lost = sorted(set(nam_loses.get(name + ".bn", [])))
        kept = [i for i in range(len(weights[name])) if i not in lost]
        torch.testing.assert_close(nam.weights(), weights[name][kept])
        torch.testing.assert_close(nam.pruned_mass, gammas[name][lost].sum())


def test_no_layer_of_a_concatenated_group_loses_more_than_max_layer_amount() -> None:
    """The depthwise conv couples all 8 channels of the concatenation into one group; its 4
    least important channels are all 4 of the 5 of the first branch. Only the group's root
    (8 channels, may lose 4) was capped, so that branch lost 80% at ``max_layer_amount=0.5``."""
    spec = NetSpec(
        3,
        8,
        2,
        blocks=(
            Plain(Unit(3, 8)),
            Concat(((Unit(8, 5),), (Unit(8, 3),))),
            Plain(Unit(8, 8, groups=8)),
        ),
    )
    model, x = GeneratedNet(spec), torch.randn(2, 3, 8, 8)
    randomise_bns(model)
    with torch.no_grad():
        for name in ("blocks.1.branches.0.0.bn", "blocks.2.bn"):
            bn = model.get_submodule(name)
            assert isinstance(bn, nn.BatchNorm2d)
            bn.weight[:4] = 0.01
    prune_channels(model, x, 0.3, max_layer_amount=0.5, measure=False)
    after = conv_channels(model)
    assert after["blocks.1.branches.0.0.conv"] == 3  # 2 of the 4 went, not all 4
    assert after["blocks.2.conv"] == 6
    assert model(x).shape == (2, 3)


# --- 3. no BatchNorm, nothing to rank -------------------------------------------------------


@given(spec=nets(bn=False), nam_after_a_conv=st.booleans())
def test_a_net_without_batchnorm_is_refused_untouched(
    spec: NetSpec, nam_after_a_conv: bool
) -> None:
    """No backbone BatchNorm, no ranking: a clear ValueError, the model as it was. NAM's own
    BatchNorms do not count."""
    model, x, _ = build(spec)
    if nam_after_a_conv:
        inject_nam(model, ["blocks.0.conv"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        prune_channels(model, x, 0.5, measure=False)
    assert_unchanged(model, before)
