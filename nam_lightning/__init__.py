"""nam_lightning: NAM attention, its sparsity penalty and channel pruning for PyTorch Lightning.

The core (attention, injection, sparsity, pruning, checkpoints) is plain PyTorch; only
:class:`NAMCallback` needs Lightning and is imported lazily.
"""

from typing import Any

from .attention import NAM, NAMChannelAttention, NAMSite, NAMSpatialAttention
from .autolambda import AutoLambda
from .checkpoint import load_checkpoint, save_pruned
from .fold import FoldedNAM, fold_nam
from .inject import inject_nam, remove_nam
from .pruning import PruneConfig, prune_channels
from .report import PruneReport
from .sites import register_block
from .sparsity import add_l1_subgradient_, l1_penalty, scale_factors, sparsity

__version__ = "0.1.0"

__all__ = [
    "NAM",
    "AutoLambda",
    "FoldedNAM",
    "NAMCallback",
    "NAMChannelAttention",
    "NAMSite",
    "NAMSpatialAttention",
    "PruneConfig",
    "PruneReport",
    "add_l1_subgradient_",
    "fold_nam",
    "inject_nam",
    "l1_penalty",
    "load_checkpoint",
    "prune_channels",
    "register_block",
    "remove_nam",
    "save_pruned",
    "scale_factors",
    "sparsity",
]


def __getattr__(name: str) -> Any:
    if name == "NAMCallback":
        from .callback import NAMCallback

        return NAMCallback
    raise AttributeError(f"module 'nam_lightning' has no attribute {name!r}")
