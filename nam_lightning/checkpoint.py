"""Load weights saved from a model that nam_lightning changed.

``Module.load_from_checkpoint`` builds the class as written (no NAM) and then loads strictly, so
it fails on a checkpoint trained with :class:`~nam_lightning.NAMCallback` ("Unexpected key(s)
... nam ..."). :func:`load_checkpoint` builds the class, reapplies the changes described by the
record stored in the state dict (see :mod:`nam_lightning.record`), and then loads strictly.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from .checks import check_module
from .inject import apply_plan, read_channels
from .pruning import replay_pruning
from .record import RECORD_KEY, read_record

_M = TypeVar("_M", bound=nn.Module)


def load_checkpoint(
    factory: Callable[..., _M],
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    **kwargs: Any,
) -> _M:
    """Rebuild a model from a checkpoint written by a run that used nam_lightning.

    Works like ``cls.load_from_checkpoint(path, **kwargs)``: the hyperparameters saved in the
    checkpoint (overridden by ``kwargs``) build the module, ``configure_model`` and
    ``on_load_checkpoint`` run when the module has them, then NAM is put back where the record
    says and the weights load strictly. The file is read with ``torch.load(weights_only=True)``.

    Args:
        factory: what builds the bare model: the LightningModule (or any ``nn.Module``) class
            the checkpoint was written from, or any callable returning an ``nn.Module``, such
            as ``timm.create_model``.
        path: a Lightning checkpoint (full or weights-only) or a file holding
            ``{"state_dict": ...}`` (see :func:`save_pruned`).
        map_location: passed to ``torch.load``.
        **kwargs: arguments of ``factory`` that override the saved hyperparameters.

    Returns:
        The module, in training mode like a freshly built one.

    Raises:
        TypeError: ``factory`` is neither a module class nor a callable returning a module,
            ``path`` or ``map_location`` has the wrong type, or ``kwargs`` names an argument
            ``factory`` does not take.
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file cannot be read (truncated, not written by ``torch.save``), holds no
            ``state_dict``, or its weights or record do not fit the model (another
            architecture). The file is only read, never written.

    Example::

        model = load_checkpoint(MyLitModel, "last.ckpt")
        model = load_checkpoint(timm.create_model, "pruned.pt", model_name="resnet50d",
                                num_classes=10)
    """
    what = _factory_name(factory)
    parameters = _factory_parameters(factory)
    takes_any = parameters is None or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in kwargs if parameters is not None and k not in parameters]
    if unknown and not takes_any:
        assert parameters is not None
        raise TypeError(
            f"{unknown} {'is not an argument' if len(unknown) == 1 else 'are not arguments'} of "
            f"{what}: the keyword arguments of load_checkpoint override the saved "
            f"hyperparameters and must be among {list(parameters)}."
        )
    checkpoint = _read_checkpoint(path, map_location)
    name = os.fspath(path)
    hparams_key = getattr(factory, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")
    saved = checkpoint.get(hparams_key) or {}
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"{name!r} holds {hparams_key!r} of type {type(saved).__name__}, not a dict of "
            "constructor arguments: it was not written by Lightning or save_pruned."
        )
    init_kwargs = {**saved, **kwargs}
    if not takes_any:
        assert parameters is not None
        init_kwargs = {k: v for k, v in init_kwargs.items() if k in parameters}
    try:
        model = factory(**init_kwargs)
    except TypeError as err:  # e.g. a required argument neither saved nor given
        raise TypeError(
            f"Cannot build {what} with the arguments {sorted(init_kwargs)} (the "
            f"hyperparameters saved in {name!r}, overridden by the keyword arguments): {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`factory` must return a torch.nn.Module, but {what} returned {type(model).__name__}"
        )
    what = type(model).__name__
    hooks: Any = model  # LightningModule hooks, when the model is one
    if callable(getattr(hooks, "configure_model", None)):
        hooks.configure_model()
    state_dict = checkpoint["state_dict"]
    try:
        _rebuild(model, state_dict)
    except ValueError as err:
        raise ValueError(f"Cannot load {name!r}: {err}") from err
    except Exception as err:  # a record that does not fit this model's modules
        raise ValueError(
            f"Cannot rebuild {what} as the record in {name!r} describes it: it comes "
            f"from another architecture (or other constructor arguments), or the file is "
            f"damaged. {type(err).__name__}: {err}"
        ) from err
    if callable(getattr(hooks, "on_load_checkpoint", None)):
        hooks.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"The weights in {name!r} do not fit {what}: the checkpoint comes from "
            f"another architecture (or other constructor arguments). {err}"
        ) from err
    return model


def _factory_name(factory: object) -> str:
    """How errors name ``factory``; raises the TypeError for one that cannot build a model."""
    if isinstance(factory, type):
        if not issubclass(factory, nn.Module):
            raise TypeError(
                f"`factory` must be a torch.nn.Module subclass or a callable returning a "
                f"module (such as timm.create_model), got the class {factory.__name__}"
            )
        return factory.__name__
    if not callable(factory):
        raise TypeError(
            f"`factory` must be a torch.nn.Module subclass or a callable returning a module "
            f"(such as timm.create_model), got {type(factory).__name__} {factory!r}"
        )
    return getattr(factory, "__qualname__", None) or repr(factory)


def _factory_parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    """The keyword arguments ``factory`` takes, or None where its signature cannot be read."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return None
    return {
        k: p
        for k, p in signature.parameters.items()
        if p.kind not in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)
    }


def _read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors for missing or foreign files."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    _check_map_location(map_location)
    name = os.fspath(path)
    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "missing"
        raise FileNotFoundError(f"`path` {name!r} is not a file ({what})")
    if os.path.getsize(path) == 0:
        raise ValueError(f"Cannot read {name!r} as a checkpoint: the file is empty")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Cannot read {name!r} as a checkpoint (truncated, not written by torch.save, or "
            f"holding objects other than tensors and plain containers): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        hint = ""
        if (
            isinstance(checkpoint, dict)
            and checkpoint
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        ):
            hint = " It looks like a bare state dict: load it with model.load_state_dict()."
        raise ValueError(
            f"{name!r} holds no 'state_dict' entry: it is not a Lightning checkpoint "
            f"or a file written by nam_lightning.save_pruned.{hint}"
        )
    return checkpoint


def _check_map_location(map_location: Any) -> None:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(
            "`map_location` must be a device (str or torch.device), a dict or a callable, as "
            f"torch.load takes it, got {type(map_location).__name__}"
        )
    try:
        torch.device(map_location)
    except RuntimeError as err:
        raise ValueError(f"`map_location` {map_location!r} is not a device: {err}") from err


def _rebuild(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Reapply to ``model`` the changes recorded in ``state_dict``: NAM sites, then pruning."""
    for key, stored in state_dict.items():
        if not key.endswith(RECORD_KEY):
            continue
        prefix = key[: -len(RECORD_KEY)]
        record = read_record(stored, key)
        try:
            root = model.get_submodule(prefix.rstrip("."))
        except AttributeError as err:
            raise ValueError(
                f"The checkpoint was changed by nam_lightning at {prefix.rstrip('.')!r}, which "
                f"{type(model).__name__} does not have: it comes from another architecture."
            ) from err
        plan = {}
        for site, spec in record.nam.items():
            try:
                root.get_submodule(site)
            except AttributeError as err:
                raise ValueError(
                    f"The checkpoint has NAM at {prefix + site!r}, which "
                    f"{type(model).__name__} does not have: it comes from another architecture."
                ) from err
            try:
                channels = read_channels(root, site)
            except ValueError:
                channels = int(state_dict[f"{prefix}{site}.nam.channel.bn.weight"].shape[0])
            plan[site] = {**dataclasses.asdict(spec), "channels": channels}
        apply_plan(root, plan)
        if record.pruning:
            replay_pruning(root, record.pruning)


def save_pruned(model: nn.Module, path: str | os.PathLike[str], **extra: Any) -> None:
    """Save ``model``'s weights with its architecture record, for :func:`load_checkpoint`.

    The file holds ``{"state_dict": ..., **extra}`` (pass ``hyper_parameters={...}`` for the
    constructor arguments) and loads with ``torch.load(weights_only=True)``. It is written to a
    temporary file first and renamed, so an existing file is never left half-written.

    Raises:
        TypeError: ``model`` is not a module, ``path`` not a str or path, or an ``extra`` value
            would not load with ``weights_only=True`` (only tensors and plain containers do).
        ValueError: ``extra`` holds ``state_dict`` (the model's is written).
        FileNotFoundError / IsADirectoryError: ``path``'s folder does not exist / ``path`` is
            a folder. Nothing is written then.
    """
    check_module("model", model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"`path` {path!r} is a directory; give a file name in it")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"`path` {path!r}: the folder {folder!r} does not exist")
    if "state_dict" in extra:
        raise ValueError(
            "`state_dict` cannot be passed to save_pruned: the file's 'state_dict' is the model's"
        )
    if extra:
        _check_loadable(extra)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save({**extra, "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_loadable(extra: dict[str, Any]) -> None:
    """Refuse ``extra`` entries that ``torch.load(weights_only=True)`` would not read back."""
    buffer = io.BytesIO()
    try:
        torch.save(extra, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as err:
        raise TypeError(
            f"The extra entries {sorted(extra)} of save_pruned must hold only tensors and plain "
            "containers (dict, list, tuple, str, int, float, bool, None), so that the file "
            f"loads with torch.load(weights_only=True): {err}"
        ) from err
