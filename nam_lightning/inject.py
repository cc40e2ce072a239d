"""Place NAM in a network, and take it out again.

NAM belongs at the end of each block; in residual networks at the end of the residual branch,
after the branch's last norm and before the skip addition (the slot SE and CBAM use); the block
types ``sites="auto"`` knows are registered in :mod:`nam_lightning.sites`.
``inject_nam`` replaces the module at each site with ``NAMSite(module, NAM(...))``. Modules are
found by type, never through attribute paths of the root, so the same call works on a bare
torchvision model, on a LightningModule holding one, and after SyncBatchNorm conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .attention import NAM, NAMSite
from .checks import check_bool, check_finite_float
from .norms import is_norm, norm_channels
from .record import attach_record
from .sites import auto_sites
from .utils import as_args, eval_mode

# The type of the `sites` argument, a choice of sites: "auto", module names, or a predicate
# (name, module) -> bool.
SiteSelection = Literal["auto"] | Sequence[str] | Callable[[str, nn.Module], bool]

_AUTO_HELP = (
    "`sites='auto'` looks for the block types registered with nam_lightning.register_block "
    "(torchvision's ResNet/ResNeXt/Wide-ResNet BasicBlock and Bottleneck, MobileNetV2/V3 "
    "InvertedResidual, EfficientNet MBConv/FusedMBConv and RegNet ResBottleneckBlock; timm's "
    "ResNet, EfficientNet/MobileNetV3/MixNet, RegNet and ByobNet blocks) and puts NAM after the "
    "residual branch's last norm. For other networks register the block type, or name the "
    "sites: `sites=['layer1.bn', ...]` (NAM after each named module) or "
    "`sites=lambda name, module: ...` (NAM after every module for which it returns True)."
)


def inject_nam(
    model: nn.Module,
    sites: SiteSelection = "auto",
    *,
    spatial: bool = False,
    detach_weights: bool = True,
    eps: float = 1e-5,
    example_inputs: Any = None,
    fuse: bool = True,
    identity_init: bool = False,
) -> list[str]:
    """Put NAM after each site of ``model``, in place. Idempotent.

    Args:
        model: the network (or a module holding it, e.g. a LightningModule).
        sites: ``"auto"`` for the blocks registered with
            :func:`~nam_lightning.register_block` (torchvision's and timm's residual and
            inverted-residual networks; see :mod:`nam_lightning.sites`), a list of module
            names (NAM after each), or a predicate ``(name, module) -> bool``. NAM follows the
            whole named module: after a norm layer with a built-in activation (timm's
            ``BatchNormAct2d``) it gates the activated output.
        spatial: add spatial attention after the channel attention. Needs ``example_inputs``:
            its scale factors are sized from the real feature maps.
        detach_weights: see :class:`~nam_lightning.NAMChannelAttention`.
        eps: the NAM BatchNorms' ``eps``.
        example_inputs: a batch for ``model(...)``: a tensor, a tuple (positional arguments) or
            a dict (keyword arguments), as Lightning's ``example_input_array``; used to measure
            the sites' output shapes. Needed with ``spatial=True`` or when a site's channel count
            cannot be read from the module (a BatchNorm or a conv is read directly). The model
            runs in eval mode without gradients, so nothing it holds changes.
        fuse: in training, run a site's BatchNorm and NAM's BatchNorm as one fused step where
            the math allows (see :class:`~nam_lightning.NAMSite`); exact either way.
        identity_init: for a trained network: each new NAM starts as the identity, so the
            model's outputs right after injection are those before it (see
            :class:`~nam_lightning.NAMChannelAttention` and ``docs/pretrained.md``; the gate
            is then ``2 * sigmoid(...)``, not the paper's ``sigmoid(...)``). The checkpoint
            record keeps it, so :func:`~nam_lightning.load_checkpoint` rebuilds the same NAM.

    Returns:
        The names of all sites where NAM now runs (those added now and those already there).

    Raises:
        TypeError: on an argument of the wrong type.
        ValueError: on a bad value, when no site is found, or when ``model`` fails on
            ``example_inputs``. Every check runs before the model is touched, and the sites are
            swapped all or none, so on any error the model is as it was.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> len(inject_nam(model))
        8
        >>> inject_nam(model) == inject_nam(model)  # a second call adds nothing
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    flags = (
        ("spatial", spatial),
        ("detach_weights", detach_weights),
        ("fuse", fuse),
        ("identity_init", identity_init),
    )
    for flag, value in flags:
        check_bool(flag, value)
    check_finite_float("eps", eps)
    if example_inputs is not None and not isinstance(
        example_inputs, (torch.Tensor, tuple, list, dict)
    ):
        raise TypeError(
            "`example_inputs` must be what model(...) takes: a tensor (or a list) as its one "
            "argument, a tuple of positional arguments or a dict of keyword arguments, got "
            f"{type(example_inputs).__name__}"
        )
    if spatial and example_inputs is None:
        raise ValueError(
            "`spatial=True` needs `example_inputs`: spatial attention has one scale factor per "
            "feature-map position, sized from the real feature maps of a forward pass."
        )
    names = resolve_sites(model, sites)
    new = [n for n in names if not isinstance(model.get_submodule(n), NAMSite)]
    shapes = _probe_shapes(model, new, example_inputs) if example_inputs is not None else {}
    plan = {}
    for name in new:
        channels = shapes[name][0] if name in shapes else read_channels(model, name)
        spatial_size = tuple(shapes[name][1:]) if spatial else None
        plan[name] = {
            "channels": channels,
            "spatial_size": spatial_size,
            "detach_weights": detach_weights,
            "eps": eps,
            "fuse": fuse,
            "identity_init": identity_init,
        }
    apply_plan(model, plan)
    return names


def apply_plan(model: nn.Module, plan: dict[str, dict[str, Any]]) -> None:
    """Wrap each named module with NAM built from its entry: all are built, then swapped in
    all or none (see :func:`replace_modules`)."""
    built = {}
    for name, spec in plan.items():
        site = model.get_submodule(name)
        nam = NAM(
            spec["channels"],
            spatial_size=spec["spatial_size"],
            detach_weights=spec["detach_weights"],
            eps=spec["eps"],
            identity_init=spec.get("identity_init", False),  # absent from older records
        )
        # The site's own tensors tell the device and dtype; a parameterless site (an
        # activation) follows the model's.
        tensor = next(site.parameters(), next(site.buffers(), None))
        if tensor is None:
            tensor = next(model.parameters(), next(model.buffers(), None))
        if tensor is not None:
            nam.to(device=tensor.device, dtype=tensor.dtype if tensor.is_floating_point() else None)
        nam.train(site.training)
        wrapped = NAMSite(site, nam, fuse=spec.get("fuse", True))
        wrapped.training = site.training  # not .train(): that would reach into `site`
        built[name] = wrapped
    if built:
        replace_modules(model, built, then=lambda: attach_record(model))


def remove_nam(model: nn.Module) -> int:
    """Take every NAM out of ``model``, putting the original modules back. Returns the count.

    The model's structure and state-dict keys are those it had before :func:`inject_nam`.
    All sites are put back or none: on an error the model is as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    found = {n: m.module for n, m in model.named_modules() if isinstance(m, NAMSite)}
    if "" in found:
        raise ValueError(
            "`model` is itself a NAMSite: remove_nam takes NAM out of the model holding it; "
            "the wrapped module is `model.module`."
        )
    replace_modules(model, found)
    return len(found)


def replace_modules(
    model: nn.Module, new: Mapping[str, nn.Module], then: Callable[[], None] | None = None
) -> None:
    """Put ``new[name]`` in place of each named submodule of ``model``, then run ``then``.

    All or nothing: when a replacement or ``then`` raises, every module already replaced is put
    back before the error propagates.
    """
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, module in new.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = parent.get_submodule(child)
            setattr(parent, child, module)
            done.append((parent, child, old))
        if then is not None:
            then()
    except BaseException:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        raise


def resolve_sites(model: nn.Module, sites: SiteSelection) -> list[str]:
    """The module names ``sites`` stands for in ``model`` (a NAMSite counts as its module)."""
    check_sites(sites)
    if isinstance(sites, str):
        names = auto_sites(model)
        if not names:
            raise ValueError(f"No NAM site found in {type(model).__name__}. {_AUTO_HELP}")
        return names
    candidates = _candidates(model)
    if callable(sites):
        names = [n for n, m in candidates.items() if sites(n, m)]
        if not names:
            raise ValueError(f"The `sites` predicate matched no module. {_AUTO_HELP}")
        return _check_not_nested(names)
    unknown = [s for s in sites if s not in candidates]
    if unknown:
        raise ValueError(
            f"`sites` names modules that are not in the model (or are inside NAM): {unknown}. "
            f"Valid names are those of model.named_modules(), e.g. {list(candidates)[:5]}."
        )
    return _check_not_nested(list(dict.fromkeys(sites)))


def check_sites(sites: object) -> None:
    """Check the form of ``sites`` (whether the names exist is checked against the model)."""
    valid = (
        "`sites` must be 'auto', a non-empty list of module names or a predicate "
        "(name, module) -> bool"
    )
    if isinstance(sites, str):
        if sites != "auto":
            raise ValueError(
                f"{valid}, got {sites!r}; to name one module pass a list: [{sites!r}]. {_AUTO_HELP}"
            )
    elif callable(sites):
        pass
    elif not isinstance(sites, Sequence) or not all(isinstance(s, str) for s in sites):
        raise TypeError(f"{valid}, got {sites!r}")
    elif not sites:
        raise ValueError(f"{valid}, got an empty list. {_AUTO_HELP}")


def _check_not_nested(names: list[str]) -> list[str]:
    for outer in names:
        inner = [n for n in names if n.startswith(outer + ".")]
        if inner:
            raise ValueError(
                f"`sites` holds {outer!r} and modules inside it ({inner[:3]}): NAM after a "
                "module and inside it at once is ambiguous; name one or the other."
            )
    return names


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Modules NAM may follow: all but the root and the insides of existing NAM sites."""
    inside: list[str] = []
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, NAMSite):
            inside.append(name + ".")
            module = module.module  # a site stands for the module it wraps
        out[name] = module
    return out


def read_channels(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    if is_norm(module):
        return norm_channels(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    raise ValueError(
        f"Cannot tell how many channels site {name!r} ({type(module).__name__}) outputs; "
        "pass `example_inputs` so it can be measured."
    )


def _probe_shapes(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, tuple]:
    """Output shape ``(C, H, W)`` of each named module on ``example_inputs``.

    Runs in eval mode without gradients, so running statistics do not move.
    """
    shapes: dict[str, tuple] = {}
    handles = []
    for name in names:

        def record(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            shapes[name] = tuple(out.shape[1:])

        handles.append(model.get_submodule(name).register_forward_hook(record))
    try:
        with eval_mode(model):
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(*as_args(example_inputs))
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__} failed on `example_inputs`, which are run through it to "
            f"measure the sites' output shapes: {type(err).__name__}: {err}"
        ) from err
    finally:
        for h in handles:
            h.remove()
    for name in names:
        if name not in shapes:
            raise ValueError(f"Site {name!r} did not run on `example_inputs`.")
        if len(shapes[name]) != 3:
            raise ValueError(
                f"NAM needs (N, C, H, W) feature maps, but site {name!r} outputs shape "
                f"(N, {', '.join(map(str, shapes[name]))})."
            )
    return shapes
