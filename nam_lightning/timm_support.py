"""timm's blocks and norm layers, for ``sites="auto"`` and folding (needs the ``timm`` extra).

Imported only once timm is: :mod:`nam_lightning.sites` and :mod:`nam_lightning.norms` import
this module when ``"timm"`` is in ``sys.modules`` (a model holding timm modules has imported
it). ``sites="auto"`` knows timm's residual blocks from :data:`TIMM_BLOCKS` (an entry
registered with :func:`~nam_lightning.register_block` replaces timm's). The site of each is
the residual branch's last norm, which timm builds without its activation
(``apply_act=False``), so NAM sits after the norm and before the skip addition, as in the
paper:

- ResNet, ResNet-D, SE-ResNet(X) ``BasicBlock`` / ``Bottleneck``: ``bn2`` / ``bn3``, named
  directly because the block registers ``downsample`` (the shortcut and its norm) after them;
- EfficientNet, MobileNetV3 and MixNet ``InvertedResidual`` (and ``CondConvResidual``):
  ``bn3``; ``DepthwiseSeparableConv`` and ``EdgeResidual``: ``bn2``;
- RegNet ``Bottleneck``: the norm of ``conv3``;
- ByobNet (GENet and other "bring your own blocks" networks) ``BasicBlock``,
  ``BottleneckBlock``, ``DarkBlock`` and ``EdgeBlock``: the norm of their last conv.
"""

from __future__ import annotations

from timm.layers import norm_act
from timm.models import _efficientnet_blocks as efficientnet
from timm.models import byobnet, regnet, resnet
from torch import nn

# Norm layers that are no torch _BatchNorm but keep one scale factor per channel.
FROZEN_NORMS: tuple[type[nn.Module], ...] = (norm_act.FrozenBatchNormAct2d,)

_NORM_ACTS = (norm_act.BatchNormAct2d, norm_act.SyncBatchNormAct, norm_act.FrozenBatchNormAct2d)


def is_plain_norm_act(module: nn.Module) -> bool:
    """Whether ``module`` is one of timm's BatchNorm-with-activation layers built without an
    activation or dropout: its forward (the BatchNorm, ``self.drop``, ``self.act``) is then
    the BatchNorm alone."""
    return (
        isinstance(module, _NORM_ACTS)
        and isinstance(getattr(module, "drop", None), nn.Identity)
        and isinstance(getattr(module, "act", None), nn.Identity)
    )


# timm's residual blocks -> the attribute path of the residual branch's last norm (or of the
# conv-norm-activation module ending the branch, whose norm is then the site).
TIMM_BLOCKS: dict[type[nn.Module], str] = {
    resnet.BasicBlock: "bn2",
    resnet.Bottleneck: "bn3",
    efficientnet.InvertedResidual: "bn3",
    efficientnet.DepthwiseSeparableConv: "bn2",
    efficientnet.EdgeResidual: "bn2",
    regnet.Bottleneck: "conv3",
    byobnet.BasicBlock: "conv2_kxk",
    byobnet.BottleneckBlock: "conv3_1x1",
    byobnet.DarkBlock: "conv2_kxk",
    byobnet.EdgeBlock: "conv2_1x1",
}
