"""Load weights saved from a model that nam_lightning changed.

``Module.load_from_checkpoint`` builds the class as written (no NAM) and then loads strictly, so
it fails on a checkpoint trained with :class:`~nam_lightning.NAMCallback` ("Unexpected key(s)
... nam ..."). :func:`load_checkpoint` builds the class, reapplies the changes described by the
record stored in the state dict (see :mod:`nam_lightning.record`), and then loads strictly.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, TypeVar

import torch
from torch import nn

from .inject import _read_channels, apply_plan
from .pruning import replay_pruning
from .record import RECORD_FORMAT, RECORD_KEY

M = TypeVar("M", bound=nn.Module)


def load_checkpoint(
    cls: type[M],
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    **kwargs: Any,
) -> M:
    """Rebuild ``cls`` from a checkpoint written by a run that used nam_lightning.

    Works like ``cls.load_from_checkpoint(path, **kwargs)``: the hyperparameters saved in the
    checkpoint (overridden by ``kwargs``) build the module, ``configure_model`` and
    ``on_load_checkpoint`` run when the class has them, then NAM is put back where the record
    says and the weights load strictly. The file is read with ``torch.load(weights_only=True)``.

    Args:
        cls: the LightningModule (or any ``nn.Module``) class the checkpoint was written from.
        path: a Lightning checkpoint (full or weights-only) or a file holding
            ``{"state_dict": ...}``.
        map_location: passed to ``torch.load``.
        **kwargs: constructor arguments that override the saved hyperparameters.

    Returns:
        The module, in training mode like a freshly built one.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be a torch.nn.Module subclass, got {cls!r}")
    checkpoint = read_checkpoint(path, map_location)
    hparams_key = getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")
    init_kwargs = {**dict(checkpoint.get(hparams_key) or {}), **kwargs}
    signature = inspect.signature(cls.__init__)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        init_kwargs = {k: v for k, v in init_kwargs.items() if k in signature.parameters}
    model = cls(**init_kwargs)
    hooks: Any = model  # LightningModule hooks, when ``cls`` is one
    if callable(getattr(hooks, "configure_model", None)):
        hooks.configure_model()
    state_dict = checkpoint["state_dict"]
    rebuild(model, state_dict)
    if callable(getattr(hooks, "on_load_checkpoint", None)):
        hooks.on_load_checkpoint(checkpoint)
    model.load_state_dict(state_dict, strict=True)
    return model


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors for missing or foreign files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`path` {os.fspath(path)!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Cannot read {os.fspath(path)!r} as a checkpoint (truncated, or not written by "
            f"torch.save with plain containers): {err}"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(
            f"{os.fspath(path)!r} holds no 'state_dict' entry: it is not a Lightning checkpoint "
            "or a file written by nam_lightning."
        )
    return checkpoint


def rebuild(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Reapply to ``model`` the changes recorded in ``state_dict``: NAM sites, then pruning."""
    for key, record in state_dict.items():
        if not key.endswith(RECORD_KEY):
            continue
        prefix = key[: -len(RECORD_KEY)]
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise ValueError(f"State-dict entry {key!r} is not a nam_lightning record we can read")
        try:
            root = model.get_submodule(prefix.rstrip("."))
        except AttributeError as err:
            raise ValueError(
                f"The checkpoint was changed by nam_lightning at {prefix.rstrip('.')!r}, which "
                f"{type(model).__name__} does not have: it comes from another architecture."
            ) from err
        plan = {}
        for site, spec in record["nam_sites"].items():
            try:
                root.get_submodule(site)
            except AttributeError as err:
                raise ValueError(
                    f"The checkpoint has NAM at {prefix + site!r}, which "
                    f"{type(model).__name__} does not have: it comes from another architecture."
                ) from err
            try:
                channels = _read_channels(root, site)
            except ValueError:
                channels = int(state_dict[f"{prefix}{site}.nam.channel.bn.weight"].shape[0])
            plan[site] = {**spec, "channels": channels}
            if spec["spatial_size"] is not None:
                plan[site]["spatial_size"] = tuple(spec["spatial_size"])
        apply_plan(root, plan)
        if record.get("pruning"):
            replay_pruning(root, record["pruning"])


def save_pruned(model: nn.Module, path: str | os.PathLike[str], **extra: Any) -> None:
    """Save ``model``'s weights with its architecture record, for :func:`load_checkpoint`.

    The file holds ``{"state_dict": ..., **extra}`` (pass ``hyper_parameters={...}`` for the
    constructor arguments) and loads with ``torch.load(weights_only=True)``. It is written to a
    temporary file first and renamed, so an existing file is never left half-written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save({**extra, "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
