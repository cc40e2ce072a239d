"""The architecture record that travels with a model's weights.

A model changed by nam_lightning (NAM injected, channels pruned) no longer matches the class
that built it, so its weights alone cannot be loaded back. The record says what was changed.
It lives *inside* the state dict, under the key ``<prefix>_nam_lightning`` of the module that
was changed, so every way of saving weights carries it: ``torch.save(model.state_dict())``,
Lightning checkpoints (weights-only included), DDP and ``ddp_spawn`` weight transfers.

The record holds only plain containers (dicts, lists, str, int, float, bool), so files load with
``torch.load(weights_only=True)``. :func:`nam_lightning.load_checkpoint` reads it to rebuild the
model before a strict load.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .attention import NAMSite

RECORD_KEY = "_nam_lightning"
RECORD_FORMAT = 1
_HOOKED = "_nam_lightning_record_hooks"
PRUNING_ATTR = "_nam_lightning_pruning"  # set by nam_lightning.pruning


def nam_sites(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Where NAM runs in ``model`` and how each NAM was built, by site name."""
    sites = {}
    for name, module in model.named_modules():
        if isinstance(module, NAMSite):
            nam = module.nam
            sites[name] = {
                "spatial_size": None if nam.spatial is None else list(nam.spatial.size),
                "detach_weights": nam.channel.detach_weights,
                "eps": nam.channel.bn.eps,
                "fuse": module.fuse,
            }
            if nam.channel.identity_init:  # recorded only when set: older records stay valid
                sites[name]["identity_init"] = True
    return sites


def make_record(model: nn.Module) -> dict[str, Any] | None:
    """The record of ``model``, or ``None`` when nam_lightning has not changed it."""
    sites = nam_sites(model)
    pruning = getattr(model, PRUNING_ATTR, None)
    if not sites and pruning is None:
        return None
    return {"format": RECORD_FORMAT, "nam_sites": sites, "pruning": pruning}


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


def _save_record(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    record = make_record(module)
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
    ours = make_record(module)
    saved_sites = sorted(saved.get("nam_sites", {}))
    our_sites = sorted(ours["nam_sites"]) if ours else []
    saved_passes = len((saved.get("pruning") or {}).get("passes", []))
    our_passes = len(((ours or {}).get("pruning") or {}).get("passes", []))
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
    elif ours:  # same sites: each NAM must be built alike (identity_init changes its gate)
        theirs, mine = saved["nam_sites"], ours["nam_sites"]
        identity = {s: bool(theirs[s].get("identity_init")) for s in saved_sites}
        differ = [s for s in saved_sites if identity[s] != bool(mine[s].get("identity_init"))]
        if differ:
            error_msgs.append(
                f"the weights of the NAM site(s) {differ[:4]}{'...' if len(differ) > 4 else ''} "
                f"were saved with identity_init={identity[differ[0]]}, but this model's NAM was "
                f"built with identity_init={not identity[differ[0]]} (its gate is 2 * sigmoid "
                "with the option, sigmoid without); rebuild it with "
                "nam_lightning.load_checkpoint(), which reads the saved record."
            )
