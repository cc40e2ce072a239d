"""Which modules are norm layers that NAM follows, and which of them fold into a NAM site.

NAM's site is after a block's last norm layer. Besides PyTorch's BatchNorms, networks use norm
layers of other types: torchvision's ``FrozenBatchNorm2d`` (detection backbones; not a
``_BatchNorm`` subclass, its statistics and affine terms are buffers) and timm's norm layers
with a built-in activation (``BatchNormAct2d``: a ``BatchNorm2d`` subclass whose forward is
the BatchNorm, then ``self.drop``, then ``self.act``).

NAM follows a site's *whole* module. After a timm ``BatchNormAct2d`` that applies an
activation, NAM therefore gates the activated output; the last norms of the residual branches
that ``sites="auto"`` picks in timm's blocks are built without one (``apply_act=False``), so
there NAM sits where the paper puts it: after the norm, before the skip addition.

In eval mode a BatchNorm is an affine map per channel; :func:`eval_affine_state` says when a
module computes exactly that map, so that :func:`~nam_lightning.fold_nam` may fold it into the
site. timm's layers are recognised only when timm is already imported (a model holding them
imported it), so timm stays an optional dependency.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

# An eval-mode norm as the affine map's ingredients: running mean, running variance, eps,
# weight and bias (None where not affine).
AffineState = tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, torch.Tensor | None]

# Forward methods that are exactly F.batch_norm over the module's own state; a subclass that
# overrides forward (timm's BatchNormAct2d, say) computes something else.
_BATCHNORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def timm_support() -> ModuleType | None:
    """``nam_lightning.timm_support`` once timm is imported (a model holding timm modules
    has imported it), else None: timm is optional."""
    if sys.modules.get("timm") is None:
        return None
    from . import timm_support as module

    return module


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm-like norm layer (one scale factor per channel)."""
    if isinstance(module, (_BatchNorm, FrozenBatchNorm2d)):
        return True
    timm = timm_support()
    return timm is not None and isinstance(module, timm.FROZEN_NORMS)


def norm_channels(module: nn.Module) -> int:
    """The channel count of a norm layer (see :func:`is_norm`)."""
    if isinstance(module, _BatchNorm):
        return int(module.num_features)
    return int(module.get_buffer("weight").shape[0])


def eval_affine_state(module: nn.Module) -> AffineState | None:
    """The eval-mode state of ``module`` when its output in eval mode is exactly the BatchNorm
    map ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel, else None
    (another layer, a norm without running statistics, or one with a built-in activation)."""
    if not _plain_affine(module):
        return None
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)):
        return None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        mean,
        var,
        float(module.eps),  # type: ignore[arg-type]
        None if weight is None else weight.detach(),
        None if bias is None else bias.detach(),
    )


def _plain_affine(module: nn.Module) -> bool:
    """Whether ``module``'s forward is the BatchNorm formula and nothing else."""
    if type(module) is FrozenBatchNorm2d:
        return True
    if isinstance(module, _BatchNorm) and type(module).forward in _BATCHNORM_FORWARDS:
        return not any(True for _ in module.children())
    timm = timm_support()
    return timm is not None and bool(timm.is_plain_norm_act(module))
