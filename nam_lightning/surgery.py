"""The adapter to Torch-Pruning 1.6.1, the only module that imports ``torch_pruning``.

Torch-Pruning traces a model's dependency graph (which layers are coupled: residual additions,
concatenations, depthwise and grouped convolutions) and removes channels physically. Here a
model is traced once (:func:`planned_pass`), its coupled channel groups are read into plain
data (:class:`Plan`, ranked by BatchNorm scale factors: :class:`ScaleImportance`), from which
:mod:`nam_lightning.selection` chooses the channels, and :meth:`Plan.cut` removes them. A
recorded pass is replayed on a freshly built model by :func:`replay`. What to remove, and how
much, is decided by :mod:`nam_lightning.pruning`.

Gaps of Torch-Pruning 1.6.1 mended here, each where it is mended:

1. ``chunk`` and ``split`` with an int: the piece sizes are looked up under an attribute name
   older torch versions used, then guessed from the consumers, wrongly when a piece goes
   straight into a concatenation (ShuffleNet V2's blocks). They are read from the autograd node
   instead (:func:`_traceable`, :func:`_split_sizes_from_autograd`). ``split`` with a list of
   sizes fixed in the forward (timm's MixedConv2d keeps them in an attribute) splits by those
   sizes whatever the channels left, so such splits become barriers (item 2).
2. A reshape that permutes channels (ShuffleNet's channel shuffle): the index mapping cannot
   express it and divides by zero, or passes the indices through unchanged, which would cut
   the wrong channels. Such reshapes become barriers, and every channel group crossing one is
   kept whole (:func:`_traceable`, :func:`_crossing`).
3. Group importance: its mean is sized by the group's first BatchNorm and divided by the
   number of BatchNorms, wrong (or an IndexError) where a concatenation gives a BatchNorm only
   part of the root's channels. :class:`ScaleImportance` means per root channel.
4. Ties at the threshold: every channel scoring <= the threshold goes; tied scores (a fresh
   model, every gamma 1) make that a whole layer, which is then refused, so nothing is pruned.
   :meth:`ScaleImportance.ranked` breaks exact ties by channel position.
5. Grouped convolutions: the chosen indices are repeated per channel group of the group's
   most-grouped conv, right only in some layouts, and a conv with ``groups == out_channels``
   is cut like a depthwise one even when ``in_channels`` is larger. Groups that would be cut
   inconsistently are left whole (:func:`_cuttable`).
6. Per-layer limits: the global threshold can empty a layer, ``check_pruning_group`` then
   drops the whole group, and ``max_pruning_ratio`` is not held for every layer of a group.
   Each group is trimmed first (:func:`nam_lightning.selection.select`), then checked
   (:meth:`Plan.cut`).
7. The pruning step (``BasePruner.step``) chooses and cuts in one go, so a FLOPs target could
   only be met by cutting again and again. :class:`Plan` reads the groups once and
   :mod:`nam_lightning.selection` follows the step's rule to choose, for any amount, without
   cutting; the step itself is not used.
8. No public API gives a group's channel groups or the pruner's check of a group against its
   ratio limits: ``BasePruner._get_channel_groups`` and ``_check_pruning_ratio`` are used
   (:class:`Plan`).

Not a gap of Torch-Pruning, but of tracing NAM: the spatial attention's BatchNorm sees the
channels folded into the batch by a reshape; it is taken out while tracing
(:func:`_without_spatial_attention`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch_pruning.dependency import index_mapping

from .attention import NAM, NAMChannelAttention
from .compensate import compensate_cut
from .record import HistoryStep
from .selection import GroupData, LayerData, keep_min, select
from .utils import as_args, eval_mode

# Input cuts whose removed channels reach other outputs (a depthwise conv loses both at once).
_IN_CHANNEL_CUTS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


class PassSettings(Protocol):
    """How a pass chooses channels (:class:`nam_lightning.PruneConfig` is one)."""

    @property
    def importance(self) -> str: ...  # "bn" or "nam"
    @property
    def scope(self) -> str: ...  # "global" or "local"
    @property
    def max_layer_amount(self) -> float: ...
    @property
    def round_to(self) -> int | None: ...
    @property
    def compensate(self) -> bool: ...  # fold removed channels' constant output into consumers


class PassResult(NamedTuple):
    """What one pruning pass did."""

    history: tuple[HistoryStep, ...]  # every cut, in order, for replay
    threshold: float | None  # the largest importance among the removed channels
    removed: int  # channels removed, counted at each group's root layer
    uncompensated: tuple[str, ...] = ()  # consumers that could not take a removed constant


@contextlib.contextmanager
def planned_pass(
    model: nn.Module,
    example_inputs: Any,
    settings: PassSettings,
    ignored: Sequence[nn.Module],
) -> Iterator[Plan]:
    """Trace ``model`` on ``example_inputs`` and read its coupled channel groups, never those
    of the ``ignored`` layers, into a :class:`Plan`, valid while the context is open (gaps 1 and
    2 stay mended while the graph is used)."""
    with _without_spatial_attention(model), _traceable() as barriers:
        scorer = ScaleImportance(model, use_nam=settings.importance == "nam")

        def build(ignored: list[nn.Module]) -> Any:
            # tracing needs autograd; eval mode keeps the BatchNorm statistics still
            with eval_mode(model, grad=True):
                return tp.pruner.BasePruner(
                    model, as_args(example_inputs), importance=scorer.ranked, ignored_layers=ignored
                )

        try:
            pruner = build(list(ignored))
            if barriers:  # once more, with the layers whose channels cross a barrier kept whole
                pruner = build([*ignored, *_crossing(pruner, barriers)])
        except (ZeroDivisionError, IndexError, KeyError) as err:
            raise ValueError(
                "Torch-Pruning could not trace the channel dependencies of "
                f"{type(model).__name__} ({type(err).__name__}: {err})."
            ) from err
        yield Plan(model, pruner, scorer, settings)


class Plan:
    """The coupled channel groups of a traced model, read before anything is cut: what
    :func:`selection.select` and :func:`selection.predict_flops` work on, and :meth:`cut`."""

    def __init__(
        self, model: nn.Module, pruner: Any, scorer: ScaleImportance, settings: PassSettings
    ) -> None:
        self.settings = settings
        self._pruner = pruner
        self._nam_of_bn = {
            id(m.bn): m for m in model.modules() if isinstance(m, NAMChannelAttention)
        }
        self.groups: list[GroupData] = []
        self._roots: list[tuple[nn.Module, Any]] = []  # each group's root layer and handler
        graph = pruner.DG
        layers: dict[nn.Module, LayerData] = {}
        groups = graph.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        )
        for group in groups:  # in Torch-Pruning's order, and skipping what it skips
            if not pruner._check_pruning_ratio(group):
                continue
            ranked = scorer.ranked(group)
            scores = scorer(group)
            if ranked is None or scores is None:
                continue
            channel_groups = pruner._get_channel_groups(group)
            if channel_groups > 1:  # a base channel's score is its mean over the channel groups
                ranked = ranked.view(channel_groups, -1).mean(0)
            ranked = ranked.cpu()
            root, handler = group[0].dep.target.module, group[0].dep.handler
            held, cuts = [], []
            for i, (dep, _) in enumerate(group):
                roots = group[i].root_idxs
                outputs = graph.is_out_channel_pruning_fn(dep.handler)
                channels = graph.get_out_channels(dep.layer) if outputs else None
                if channels and None not in roots:
                    most = channels - keep_min(channels, settings.max_layer_amount, None)
                    held.append((torch.tensor(sorted(set(roots)), dtype=torch.long), most))
                if isinstance(dep.layer, (nn.modules.conv._ConvNd, nn.Linear)) and (
                    outputs or graph.is_in_channel_pruning_fn(dep.handler)
                ):
                    if dep.layer not in layers:
                        layers[dep.layer] = _layer_data(dep.layer)
                    known = torch.tensor([r for r in roots if r is not None], dtype=torch.long)
                    cuts.append((layers[dep.layer], outputs, known))
            self.groups.append(
                GroupData(
                    ranked=ranked,
                    order=torch.argsort(ranked),
                    per_base=scores.view(channel_groups, -1).mean(0),
                    channel_groups=channel_groups,
                    channels=len(group[0][1]),
                    held=held,
                    cuts=cuts,
                )
            )
            self._roots.append((root, handler))

    def select(self, amount: float) -> list[torch.Tensor]:
        """The root channels each group loses for ``amount`` (:func:`selection.select`)."""
        s = self.settings
        return select(self.groups, amount, s.scope, s.max_layer_amount, s.round_to)

    def cut(
        self,
        chosen: Sequence[torch.Tensor],
        means: dict[nn.Module, torch.Tensor] | None = None,
    ) -> PassResult:
        """Remove the ``chosen`` root channels of each group (as :meth:`select` gives them).
        With ``means`` (:func:`~nam_lightning.compensate.input_means`, measured before), what
        the removed channels contribute is folded into the layers that read them."""
        graph = self._pruner.DG
        threshold: float | None = None
        removed = 0
        uncompensated: list[nn.Module] = []
        for data, (root, handler), channels in zip(self.groups, self._roots, chosen, strict=True):
            if not len(channels):
                continue
            group = graph.get_pruning_group(root, handler, channels.tolist())
            if not graph.check_pruning_group(group):  # it would empty a layer
                continue
            idxs = [int(i) for i in group[0][1]]
            top = float(data.per_base[[i % data.group_size for i in idxs]].max())
            threshold = top if threshold is None else max(threshold, top)
            removed += len(idxs)
            _keep_pruned_nam_mass(group, self._nam_of_bn)
            if means is not None:
                uncompensated += _compensate(graph, group, means)
            group.prune()
        history = tuple(
            (str(name), bool(out), tuple(int(i) for i in idxs))
            for name, out, idxs in self._pruner.pruning_history()
        )
        names = {m: n for n, m in self._pruner.model.named_modules()}
        missed = tuple(sorted({names[m] for m in uncompensated}))
        return PassResult(history, threshold, removed, missed)


def _layer_data(layer: nn.Module) -> LayerData:
    if isinstance(layer, nn.Linear):
        return LayerData(layer, layer.out_features, layer.in_features, 1, depthwise=False)
    assert isinstance(layer, nn.modules.conv._ConvNd)
    depthwise = layer.groups == layer.out_channels > 1  # Torch-Pruning's test
    return LayerData(layer, layer.out_channels, layer.in_channels, layer.groups, depthwise)


def replay(model: nn.Module, history: Sequence[HistoryStep], input_shapes: Sequence[Any]) -> None:
    """Cut ``model`` as ``history`` says, tracing it on zeros of ``input_shapes``."""
    inputs = tuple(torch.zeros(tuple(shape)) for shape in input_shapes)
    with _without_spatial_attention(model), _traceable():
        with eval_mode(model, grad=True):
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
        graph.load_pruning_history([(name, out, list(idxs)) for name, out, idxs in history])


def _compensate(graph: Any, group: Any, means: dict[nn.Module, torch.Tensor]) -> list[nn.Module]:
    """Before ``group`` is cut: :func:`~nam_lightning.compensate.compensate_cut` for every
    convolution and linear layer that reads its removed channels (the BatchNorm right after
    it, if any, takes the contribution). Returns the layers where nothing could take it."""
    missed = []
    for dep, idxs in group:
        if dep.handler in _IN_CHANNEL_CUTS and dep.layer in means:
            outputs = graph.module2node[dep.layer].outputs
            follower = outputs[0].module if len(outputs) == 1 else None
            follower = follower if isinstance(follower, _BatchNorm) else None
            if not compensate_cut(dep.layer, [int(i) for i in idxs], means, follower):
                missed.append(dep.layer)
    return missed


def _keep_pruned_nam_mass(group: Any, nam_of_bn: dict[int, NAMChannelAttention]) -> None:
    """Add the ``|gamma|`` a NAM BatchNorm of ``group`` is about to lose to its ``pruned_mass``,
    so that its remaining channel weights (``|gamma| / sum |gamma|``) do not change."""
    for dep, idxs in group:
        nam = nam_of_bn.get(id(dep.layer))
        if nam is not None and nam.bn.weight is not None:
            mass = nam.bn.weight.detach().abs()[list(idxs)].sum()
            nam.pruned_mass = nam.pruned_mass + mass.to(nam.pruned_mass.dtype)


class ScaleImportance(tp.importance.Importance):
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
        # The mean is taken per channel of the group's root (gap 3 of the module docstring).
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
    """Mend gaps 1 and 2 (see the module docstring) while Torch-Pruning builds and uses a
    dependency graph.

    Active for as long as the graph is used (Torch-Pruning updates its index mappings each time
    it forms a group). Yields the list, filled as graphs are built, of the reshape nodes that
    move channels to new positions (barriers): the caller must keep whole every channel group
    crossing one. A reshape that is not a flatten (to 2 or 4 dimensions), such as ShuffleNet's
    channel shuffle ((N, C, H, W) -> (N, g, C/g, H, W) -> transpose -> back), is one.
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
