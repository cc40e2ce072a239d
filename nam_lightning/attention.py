"""The Normalization-based Attention Module (NAM) as plain PyTorch modules.

Liu et al., "NAM: Normalization-based Attention Module", arXiv:2111.12419.

Channel attention re-uses the scale factors of a BatchNorm as channel importances::

    z = BN(x);  w_c = |gamma_c| / sum_j |gamma_j|;  y = x * sigmoid(w * z)

Spatial attention ("pixel normalisation") does the same with one scale factor per spatial
position. Both gate their *input* ``x`` and return a tensor of its shape, so they drop in after
any layer that produces ``(N, C, H, W)`` feature maps.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional, kernels
from .checks import check_bool, check_finite_float
from .kernels import Path

# The scale factors a NAM built with ``identity_init=True`` starts from. Not 0: the attention
# weights ``|gamma| / sum |gamma|`` would be 0 and no gradient would reach gamma or beta. Any
# positive constant gives w = 1/C and the paper's gradients; this one makes every logit
# ``w * gamma * x_hat = 1e-8 * x_hat / C`` so small that ``2 * sigmoid`` of it is 1 within
# 1e-8 * |x_hat| / (2 C), which float32 rounds to exactly 1 unless |x_hat| exceeds a few times C;
# and it is a normal float32 and bfloat16 number.
IDENTITY_GAMMA = 1e-8


class NAMChannelAttention(nn.Module):
    """NAM channel attention: ``x * sigmoid(w * BN(x))`` with ``w = |gamma| / sum |gamma|``.

    The channel count is only used to build the BatchNorm; the forward pass derives every shape
    from the tensors, so the module keeps working after channel pruning shrinks its BatchNorm.
    Pruning adds the ``|gamma|`` of the channels it removes to the buffer ``pruned_mass``, which
    stays in the denominator: the remaining channels keep exactly the weights they had.

    Args:
        channels: number of input channels ``C``.
        detach_weights: compute ``w`` from ``gamma`` without gradient, as the reference code
            does (``gamma`` then learns only through the BatchNorm's affine step). ``False``
            makes ``w`` differentiable too.
        eps: the BatchNorm's ``eps``.
        identity_init: start as the identity, for a network that is already trained: the
            gate becomes ``2 * sigmoid(w * BN(x))`` (range (0, 2), centred on 1 instead of
            0.5) and ``gamma`` starts at :data:`IDENTITY_GAMMA` instead of 1, so that every
            logit ``w * BN(x)`` is ~1e-8 times the normalised input and the gate rounds to
            exactly 1 (see ``docs/pretrained.md``).

    Example:
        >>> nam = NAMChannelAttention(8)
        >>> nam(torch.randn(2, 8, 5, 7)).shape
        torch.Size([2, 8, 5, 7])
    """

    pruned_mass: torch.Tensor

    def __init__(
        self,
        channels: int,
        *,
        detach_weights: bool = True,
        eps: float = 1e-5,
        identity_init: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("channels", channels)
        check_bool("detach_weights", detach_weights)
        check_finite_float("eps", eps)  # 0 or less divides by zero on constant input
        check_bool("identity_init", identity_init)
        self.detach_weights = detach_weights
        self.identity_init = identity_init
        self.bn = nn.BatchNorm2d(channels, eps=eps)
        if identity_init:
            nn.init.constant_(self.bn.weight, IDENTITY_GAMMA)
        self.register_buffer("pruned_mass", torch.zeros(()))

    def weights(self) -> torch.Tensor:
        """The attention weights ``w = |gamma| / (sum |gamma| + pruned_mass)``, shape (C,)."""
        gamma = self.bn.weight.detach() if self.detach_weights else self.bn.weight
        return functional.normalised_abs(gamma, self.pruned_mass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        path = kernels.choose_path(x, self.bn)
        if path is Path.ALONE:
            y = functional.nam_channel_gate(x, self.bn, self.weights())
        elif path is Path.SMALL:
            y = functional.scaled_bn_gate(x, self.bn, self.weights())
        elif path is Path.EVAL_ALONE:
            y = functional.eval_channel_gate(x, self.bn, self.pruned_mass)
        else:
            z = self.bn(x)
            y = x * torch.sigmoid(z * self.weights().to(z.dtype).view(1, -1, 1, 1))
        return self.rescale(y)

    def rescale(self, y: torch.Tensor) -> torch.Tensor:
        """``y = x * sigmoid(...)`` as this module's output: doubled with ``identity_init``
        (exact: a power of two)."""
        return y * 2 if self.identity_init else y


class NAMSpatialAttention(nn.Module):
    """NAM spatial attention: one scale factor ``lambda`` per position of an ``H x W`` map.

    A BatchNorm over the ``H * W`` positions normalises each position over batch and channels;
    ``W_lambda = |lambda| / sum |lambda|`` and ``y = x * sigmoid(W_lambda * BN_pixel(x))``.

    Args:
        size: ``(H, W)`` of the feature maps this module will see (``H != W`` is fine). The
            scale factors belong to positions, so any other resolution is rejected.
        detach_weights: as in :class:`NAMChannelAttention`.
        eps: the BatchNorm's ``eps``.
        identity_init: as in :class:`NAMChannelAttention`: gate ``2 * sigmoid(...)``, ``lambda``
            starting at :data:`IDENTITY_GAMMA`.

    Example:
        >>> nam = NAMSpatialAttention((4, 6))
        >>> nam(torch.randn(2, 3, 4, 6)).shape
        torch.Size([2, 3, 4, 6])
    """

    def __init__(
        self,
        size: tuple[int, int],
        *,
        detach_weights: bool = True,
        eps: float = 1e-5,
        identity_init: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise ValueError(f"`size` must be a pair (H, W) of positive ints, got {size!r}")
        _check_positive_int("size[0]", size[0])
        _check_positive_int("size[1]", size[1])
        check_bool("detach_weights", detach_weights)
        check_finite_float("eps", eps)
        check_bool("identity_init", identity_init)
        self.size = (int(size[0]), int(size[1]))
        self.detach_weights = detach_weights
        self.identity_init = identity_init
        self.bn = nn.BatchNorm1d(self.size[0] * self.size[1], eps=eps)
        if identity_init:
            nn.init.constant_(self.bn.weight, IDENTITY_GAMMA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        n, c, h, w = x.shape
        if (h, w) != self.size:
            raise ValueError(
                f"NAMSpatialAttention was built for {self.size[0]}x{self.size[1]} feature maps "
                f"but got {h}x{w}: its scale factors belong to positions, so the input "
                "resolution must stay the one the model was built with. Inject NAM again at "
                "the new resolution, or use channel attention only (spatial=False)."
            )
        z = self.bn(x.reshape(n * c, h * w))  # each position normalised over N x C
        lam = self.bn.weight.detach() if self.detach_weights else self.bn.weight
        gate = torch.sigmoid(z * functional.normalised_abs(lam).to(z.dtype))  # (N*C, H*W)
        if self.identity_init:
            gate = gate * 2
        return x * gate.view(n, c, h, w)


class NAM(nn.Module):
    """NAM: channel attention, then spatial attention when ``spatial_size`` is given.

    Args:
        channels: number of input channels.
        spatial_size: ``(H, W)`` of the input feature maps to add spatial attention; ``None``
            (the default) for channel attention only.
        detach_weights: see :class:`NAMChannelAttention`.
        eps: the BatchNorms' ``eps``.
        identity_init: start as the identity (see :class:`NAMChannelAttention`).

    Example:
        >>> nam = NAM(16, spatial_size=(8, 8))
        >>> nam(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        *,
        spatial_size: tuple[int, int] | None = None,
        detach_weights: bool = True,
        eps: float = 1e-5,
        identity_init: bool = False,
    ) -> None:
        super().__init__()
        if spatial_size is not None and not (
            isinstance(spatial_size, (tuple, list))
            and len(spatial_size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in spatial_size)
        ):
            raise ValueError(
                "`spatial_size` must be None or a pair (H, W) of positive ints, "
                f"got {spatial_size!r}"
            )
        self.channel = NAMChannelAttention(
            channels, detach_weights=detach_weights, eps=eps, identity_init=identity_init
        )
        self.spatial = (
            None
            if spatial_size is None
            else NAMSpatialAttention(
                spatial_size, detach_weights=detach_weights, eps=eps, identity_init=identity_init
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x)
        if self.spatial is not None:
            x = self.spatial(x)
        return x


class NAMSite(nn.Module):
    """A module followed by NAM: what :func:`nam_lightning.inject_nam` puts in its place.

    Keeping the original module as a child (instead of hooking it) means wrappers that swap
    modules, such as ``SyncBatchNorm.convert_sync_batchnorm``, convert it and keep NAM running.

    When ``module`` is a BatchNorm and both it and NAM train with batch statistics, the two
    BatchNorms share one statistics pass and one elementwise pass
    (:func:`~nam_lightning.functional.bn_nam_channel_gate`); in eval mode under no gradient
    (validation, inference) both apply their running statistics in one pass
    (:func:`~nam_lightning.functional.eval_bn_channel_gate`). ``fuse=False`` turns both off.
    Training on a small feature map runs PyTorch's operators
    (:func:`~nam_lightning.kernels.choose_path` decides).
    """

    def __init__(self, module: nn.Module, nam: NAM, *, fuse: bool = True) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(nam, NAM):
            raise TypeError(f"`nam` must be a nam_lightning.NAM, got {type(nam).__name__}")
        check_bool("fuse", fuse)
        self.module = module
        self.nam = nam
        self.fuse = fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = self.nam.channel
        path = kernels.choose_path(x, channel.bn, self.module) if self.fuse else Path.PLAIN
        if path is Path.FUSED:
            y = functional.bn_nam_channel_gate(x, self.module, channel.bn, channel.weights())
        elif path is Path.SMALL:
            y = functional.scaled_bn_gate(self.module(x), channel.bn, channel.weights())
        elif path is Path.EVAL_FUSED:
            y = functional.eval_bn_channel_gate(x, self.module, channel.bn, channel.pruned_mass)
        else:
            return self.nam(self.module(x))
        y = channel.rescale(y)
        return y if self.nam.spatial is None else self.nam.spatial(y)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
