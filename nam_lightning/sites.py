"""The block types ``sites="auto"`` knows: a registry users can extend.

NAM belongs at the end of each block; in residual networks at the end of the residual branch,
after the branch's last norm layer and before the skip addition (the slot SE and CBAM use).
Each registered block type names, by attribute path inside the block, either that last norm
itself or a submodule holding the branch, whose last norm (in registration order of its
submodules) is then the site. Naming the norm directly matters where a block registers other
norms after it: timm's ``Bottleneck`` registers ``downsample`` (a shortcut conv and its
BatchNorm) after ``bn3``, so "the block's last BatchNorm" would be the shortcut's.

Every registered block gets its site, whether or not it has a skip connection in this instance
(a strided or widening MobileNet block has none): NAM ends the block's branch either way, as it
does for torchvision's MobileNet and EfficientNet blocks.

torchvision's blocks are listed here, timm's in :mod:`nam_lightning.timm_support` (used once
timm is imported). Register your own with :func:`register_block`; a subclass of a registered
type uses its nearest registered base.
"""

from __future__ import annotations

import re

from torch import nn
from torchvision.models import efficientnet, mobilenetv2, mobilenetv3, regnet, resnet

from .attention import NAMSite
from .norms import is_norm, timm_support

# torchvision's blocks; timm's are in nam_lightning.timm_support, and the user's below.
_TORCHVISION_BLOCKS: dict[type[nn.Module], str] = {
    resnet.BasicBlock: "bn2",
    resnet.Bottleneck: "bn3",
    mobilenetv2.InvertedResidual: "conv",
    mobilenetv3.InvertedResidual: "block",
    efficientnet.MBConv: "block",
    efficientnet.FusedMBConv: "block",
    regnet.ResBottleneckBlock: "f",
}
# The block types register_block added, with their branch ends (tests save and restore it).
USER_BLOCKS: dict[type[nn.Module], str] = {}


def register_block(block_type: type[nn.Module], branch_end: str) -> None:
    """Teach ``sites="auto"`` a block type: NAM goes after the norm at ``branch_end``.

    Args:
        block_type: the block's class. Its subclasses match too, unless registered themselves.
        branch_end: the attribute path, inside the block, of the residual branch's last norm
            layer (``"bn3"``, ``"conv3.bn"``), or of a submodule holding the branch (its last
            norm layer is then the site, e.g. torchvision's MobileNetV2 ``"conv"``).
            Registering a type again replaces its entry (timm's included).

    Example:
        >>> from torch import nn
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        ...     def forward(self, x):
        ...         return x + self.bn(self.conv(x))
        >>> register_block(Block, "bn")
        >>> from nam_lightning import inject_nam
        >>> inject_nam(nn.Sequential(Block(), Block()))
        ['0.bn', '1.bn']
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f"`block_type` must be a torch.nn.Module subclass, got {block_type!r}")
    if not isinstance(branch_end, str):
        raise TypeError(
            f"`branch_end` must be an attribute path such as 'bn3' or 'conv3.bn', got "
            f"{type(branch_end).__name__}"
        )
    if not re.fullmatch(r"\w+(\.\w+)*", branch_end):
        raise ValueError(
            f"`branch_end` must be an attribute path such as 'bn3' or 'conv3.bn' (names joined "
            f"by dots), got {branch_end!r}"
        )
    USER_BLOCKS[block_type] = branch_end


def registered_blocks() -> dict[type[nn.Module], str]:
    """The registry: block type -> attribute path of its branch end; torchvision's entries,
    timm's once timm is imported, and the user's (which replace the others)."""
    blocks = dict(_TORCHVISION_BLOCKS)
    timm = timm_support()
    if timm is not None:
        blocks.update(timm.TIMM_BLOCKS)
    blocks.update(USER_BLOCKS)
    return blocks


def auto_sites(model: nn.Module) -> list[str]:
    """The site of every registered block in ``model``, by module name (see the module doc).

    A site NAM already runs at is its :class:`~nam_lightning.NAMSite`'s name, so a second
    search finds the same names.
    """
    blocks = registered_blocks()
    names = []
    for name, block in model.named_modules():
        if isinstance(block, NAMSite):
            continue
        branch_end = next((blocks[t] for t in type(block).__mro__ if t in blocks), None)
        if branch_end is None:
            continue
        try:
            part = block.get_submodule(branch_end)
        except AttributeError:
            continue  # a variant of the block without that part (e.g. an optional conv)
        prefix = f"{name}.{branch_end}" if name else branch_end
        if isinstance(part, NAMSite) or is_norm(part):
            names.append(prefix)
            continue
        last = None
        inside: list[str] = []
        for sub, module in part.named_modules():
            if not sub or any(sub.startswith(p) for p in inside):
                continue
            if isinstance(module, NAMSite):
                inside.append(sub + ".")
                last = sub
            elif is_norm(module):
                last = sub
        if last is not None:
            names.append(f"{prefix}.{last}")
    return names
