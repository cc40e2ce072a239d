"""Helpers the test modules share: reference formulas written out with PyTorch's operators."""

from __future__ import annotations

import torch
from torch import nn

from nam_lightning import NAM


def reference(bn1: nn.BatchNorm2d, nam: NAM, x: torch.Tensor) -> torch.Tensor:
    """BN, then NAM written out: z = BN2(x1); w = |g2| / (sum|g2| + pruned); x1 * sigmoid(w z)."""
    x1 = bn1(x)
    bn2 = nam.channel.bn
    z = bn2(x1)
    g = bn2.weight.detach() if nam.channel.detach_weights else bn2.weight
    w = g.abs() / (g.abs().sum() + nam.channel.pruned_mass)
    return x1 * torch.sigmoid(z * w.view(1, -1, 1, 1))
