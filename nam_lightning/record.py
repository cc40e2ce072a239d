"""The architecture record that travels with a model's weights.

A model changed by nam_lightning (NAM injected, channels pruned) no longer matches the class
that built it, so its weights alone cannot be loaded back. The record says what was changed:
the NAM built at each site, and the channels each pruning pass cut. It lives *inside* the state
dict, under the key ``<prefix>_nam_lightning`` of the module that was changed, so every way of
saving weights carries it: ``torch.save(model.state_dict())``, Lightning checkpoints
(weights-only included), DDP and ``ddp_spawn`` weight transfers.

In memory the record is typed (:class:`Record`, :class:`NAMSpec`, :class:`PruningPass`); this
module alone knows its stored layout, plain containers (dicts, lists, str, int, float, bool), so
files load with ``torch.load(weights_only=True)``::

    {"format": 1,
     "nam_sites": {site name: {"spatial_size": [H, W] or None, "detach_weights": bool,
                               "eps": float, "fuse": bool}},
     "pruning": None or {"passes": [{"history": [[layer name, cuts output channels,
                                                  [channel indices]], ...],
                                     "input_shapes": [[N, C, H, W], ...]}, ...]}}

:func:`nam_lightning.load_checkpoint` reads it to rebuild the model before a strict load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .attention import NAMSite

RECORD_KEY = "_nam_lightning"
_FORMAT = 1
_HOOKED = "_nam_lightning_record_hooks"
_PRUNING = "_nam_lightning_pruning"  # the model's pruning passes, a tuple of PruningPass

HistoryStep = tuple[str, bool, tuple[int, ...]]
"""One cut of Torch-Pruning's history: the layer's name, whether its output channels (not its
input channels) were cut, and their indices at the time of the cut."""


@dataclass(frozen=True)
class NAMSpec:
    """How the NAM at a site was built (its channel count comes from the site)."""

    spatial_size: tuple[int, int] | None
    detach_weights: bool
    eps: float
    fuse: bool = True
    identity_init: bool = False


@dataclass(frozen=True)
class PruningPass:
    """One :func:`~nam_lightning.prune_channels` call: every cut in order, and the shapes of
    the example inputs the dependency graph was traced with (to trace it again)."""

    history: tuple[HistoryStep, ...]
    input_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Record:
    """What nam_lightning changed in a module: NAM by site name, then the pruning passes."""

    nam: dict[str, NAMSpec]
    pruning: tuple[PruningPass, ...]


def nam_specs(model: nn.Module) -> dict[str, NAMSpec]:
    """How each NAM of ``model`` was built, by the name of its site."""
    specs = {}
    for name, module in model.named_modules():
        if isinstance(module, NAMSite):
            nam = module.nam
            size = None if nam.spatial is None else nam.spatial.size
            specs[name] = NAMSpec(
                spatial_size=None if size is None else (int(size[0]), int(size[1])),
                detach_weights=nam.channel.detach_weights,
                eps=nam.channel.bn.eps,
                fuse=module.fuse,
                identity_init=nam.channel.identity_init,
            )
    return specs


def pruning_passes(model: nn.Module) -> tuple[PruningPass, ...]:
    """The pruning passes ``model`` went through, oldest first (empty when never pruned)."""
    return vars(model).get(_PRUNING, ())


def add_pruning_pass(model: nn.Module, done: PruningPass) -> None:
    """Record a pruning pass done on ``model``, and make its state dict carry the record."""
    setattr(model, _PRUNING, (*pruning_passes(model), done))
    attach_record(model)


def read_record(stored: Any, where: str) -> Record:
    """The record stored at state-dict key ``where``.

    Raises:
        ValueError: ``stored`` is not a record of the format this version writes.
        KeyError: an entry the format requires is missing (the file is damaged).
    """
    if not isinstance(stored, dict) or stored.get("format") != _FORMAT:
        raise ValueError(f"State-dict entry {where!r} is not a nam_lightning record we can read")
    nam = {
        site: NAMSpec(
            spatial_size=None if spec["spatial_size"] is None else tuple(spec["spatial_size"]),
            detach_weights=spec["detach_weights"],
            eps=spec["eps"],
            fuse=spec.get("fuse", True),  # records written before NAMSite had `fuse`
            identity_init=spec.get("identity_init", False),  # stored only when set
        )
        for site, spec in stored["nam_sites"].items()
    }
    passes = tuple(
        PruningPass(
            history=tuple((name, bool(out), tuple(idxs)) for name, out, idxs in step["history"]),
            input_shapes=tuple(tuple(shape) for shape in step["input_shapes"]),
        )
        for step in (stored.get("pruning") or {"passes": []})["passes"]
    )
    return Record(nam=nam, pruning=passes)


def attach_record(model: nn.Module) -> None:
    """Make ``model.state_dict()`` carry the record, and ``load_state_dict`` check it."""
    if getattr(model, _HOOKED, False):
        return
    handles = []
    try:  # both hooks or neither
        handles.append(model.register_state_dict_post_hook(_save_record))
        handles.append(model.register_load_state_dict_pre_hook(_check_record))
        setattr(model, _HOOKED, True)
    except BaseException:
        for handle in handles:
            handle.remove()
        raise


def _stored(model: nn.Module) -> dict[str, Any] | None:
    """The record of ``model`` in its stored layout, or ``None`` when nam_lightning has not
    changed it."""
    nam = nam_specs(model)
    passes = pruning_passes(model)
    if not nam and not passes:
        return None
    sites = {
        site: {
            "spatial_size": None if spec.spatial_size is None else list(spec.spatial_size),
            "detach_weights": spec.detach_weights,
            "eps": spec.eps,
            "fuse": spec.fuse,
            # only when set, so records of NAM without the option read as before
            **({"identity_init": True} if spec.identity_init else {}),
        }
        for site, spec in nam.items()
    }
    pruning = {
        "passes": [
            {
                "history": [[name, out, list(idxs)] for name, out, idxs in done.history],
                "input_shapes": [list(shape) for shape in done.input_shapes],
            }
            for done in passes
        ]
    }
    return {"format": _FORMAT, "nam_sites": sites, "pruning": pruning if passes else None}


def _save_record(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    record = _stored(module)
    if record is not None:
        state_dict[prefix + RECORD_KEY] = record


def _check_record(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    saved = state_dict.pop(prefix + RECORD_KEY, None)
    if saved is None:
        return
    # a damaged record must not break loading here: only its sites and passes are counted
    saved_sites = sorted(saved.get("nam_sites", {}))
    our_sites = sorted(nam_specs(module))
    saved_passes = len((saved.get("pruning") or {}).get("passes", []))
    our_passes = len(pruning_passes(module))
    if saved_passes != our_passes:
        error_msgs.append(
            f"the weights were saved from a model pruned {saved_passes} time(s), but this model "
            f"was pruned {our_passes} time(s); rebuild it with nam_lightning.load_checkpoint(), "
            "which replays the saved pruning."
        )
    if saved_sites != our_sites:
        error_msgs.append(
            f"the weights were saved from a model with NAM at {len(saved_sites)} site(s) "
            f"{saved_sites[:4]}{'...' if len(saved_sites) > 4 else ''}, but this model has "
            f"NAM at {len(our_sites)} site(s) {our_sites[:4]}"
            f"{'...' if len(our_sites) > 4 else ''}; rebuild it with "
            "nam_lightning.load_checkpoint(), which reads the saved record."
        )
    elif saved_sites:  # same sites: each NAM must be built alike (identity_init changes its gate)
        ours = nam_specs(module)
        theirs = {
            site: bool(spec.get("identity_init", False)) if isinstance(spec, dict) else False
            for site, spec in saved.get("nam_sites", {}).items()
        }
        differ = [site for site in saved_sites if theirs[site] != ours[site].identity_init]
        if differ:
            error_msgs.append(
                f"the weights of the NAM site(s) {differ[:4]}{'...' if len(differ) > 4 else ''} "
                f"were saved with identity_init={theirs[differ[0]]}, but this model's NAM was "
                f"built with identity_init={not theirs[differ[0]]} (its gate is 2 * sigmoid "
                "with the option, sigmoid without); rebuild it with "
                "nam_lightning.load_checkpoint(), which reads the saved record."
            )


def saved_pruning_passes(state_dict: dict[str, Any]) -> int:
    """How many pruning passes the records in a saved ``state_dict`` describe (0 if none)."""
    counts = [
        len(read_record(value, key).pruning)
        for key, value in state_dict.items()
        if key.endswith(RECORD_KEY)
    ]
    return max(counts, default=0)
