"""NAM folded for inference: each NAM site becomes a few per-channel constants.

Liu et al., "NAM: Normalization-based Attention Module", arXiv:2111.12419.

In eval mode a BatchNorm is an affine map per feature, ``BN(x) = A * x + B`` with
``A = gamma / sqrt(running_var + eps)`` and ``B = beta - A * running_mean``. NAM's channel
attention ``x * sigmoid(w * BN(x))`` is therefore ``x * sigmoid(a * x + b)`` per channel with
``a = w * A`` and ``b = w * B``; its spatial attention is the same per position. At the usual
site, right after the residual branch's last BatchNorm ``x = alpha * z + beta``, that BatchNorm
folds in too: the site computes, from the BatchNorm's input ``z``::

    y = (alpha * z + beta) * sigmoid(p * z + q)      p = a * alpha,  q = a * beta + b
    y = y * sigmoid(pixel_scale * y + pixel_shift)   (spatial attention, if present)

The module folded in must compute exactly its BatchNorm map in eval mode: a plain BatchNorm,
torchvision's ``FrozenBatchNorm2d`` or timm's ``BatchNormAct2d`` built without activation (see
:func:`nam_lightning.norms.eval_affine_state`). Any other module, a norm with a built-in
activation included, stays in front of the folded NAM. A NAM built with ``identity_init`` gates
with ``2 * sigmoid(...)``: the factor 2 goes into ``alpha`` and ``beta`` (``alpha = 2``,
``beta = 0`` where no BatchNorm is folded), for spatial attention into ``pixel_scale`` too.

:func:`fold_nam` swaps every :class:`~nam_lightning.NAMSite` for such a :class:`FoldedNAM`: no
parameters, a handful of elementwise passes, plain tensor ops that ``torch.export``, the ONNX
exporter and ``torch.compile`` take as they are.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .attention import NAMSite
from .functional import (
    BNState,
    bn_gate_kernel,
    bn_state,
    eval_nam_constants,
    eval_site_constants,
    gate_kernel,
)
from .inject import replace_modules
from .norms import eval_affine_state


class FoldedNAM(nn.Module):
    """Eval-mode NAM, and the BatchNorm before it when there is one, as constant buffers.

    ``y = (bn_scale * x + bn_shift) * sigmoid(gate_scale * x + gate_shift)`` per channel (without
    a folded BatchNorm: ``y = x * sigmoid(...)``), then, with spatial attention,
    ``y * sigmoid(pixel_scale * y + pixel_shift)`` per position. Built by :func:`fold_nam`.

    Args:
        gate_scale: ``(C,)`` slope of the channel gate's logit.
        gate_shift: ``(C,)`` offset of the channel gate's logit.
        bn_scale: ``(C,)`` scale of the folded BatchNorm, or ``None``. A NAM built with
            ``identity_init`` doubles it (and ``bn_shift``), or sets it to 2 where no
            BatchNorm is folded.
        bn_shift: ``(C,)`` shift of the folded BatchNorm, or ``None``.
        pixel_scale: ``(H, W)`` slope of the spatial gate's logit, or ``None``.
        pixel_shift: ``(H, W)`` offset of the spatial gate's logit, or ``None``.

    Example:
        >>> folded = FoldedNAM(torch.ones(4), torch.zeros(4))
        >>> folded(torch.zeros(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """

    gate_scale: torch.Tensor
    gate_shift: torch.Tensor
    bn_scale: torch.Tensor | None
    bn_shift: torch.Tensor | None
    pixel_scale: torch.Tensor | None
    pixel_shift: torch.Tensor | None

    def __init__(
        self,
        gate_scale: torch.Tensor,
        gate_shift: torch.Tensor,
        *,
        bn_scale: torch.Tensor | None = None,
        bn_shift: torch.Tensor | None = None,
        pixel_scale: torch.Tensor | None = None,
        pixel_shift: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _check_pair("gate", gate_scale, gate_shift, dims=1, optional=False)
        _check_pair("bn", bn_scale, bn_shift, dims=1, optional=True)
        _check_pair("pixel", pixel_scale, pixel_shift, dims=2, optional=True)
        if bn_scale is not None and bn_scale.shape != gate_scale.shape:
            raise ValueError(
                f"`bn_scale` has shape {tuple(bn_scale.shape)} but `gate_scale` has "
                f"{tuple(gate_scale.shape)}: both hold one value per channel"
            )
        self.register_buffer("gate_scale", gate_scale)
        self.register_buffer("gate_shift", gate_shift)
        self.register_buffer("bn_scale", bn_scale)
        self.register_buffer("bn_shift", bn_shift)
        self.register_buffer("pixel_scale", pixel_scale)
        self.register_buffer("pixel_shift", pixel_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        if self.pixel_scale is not None and x.shape[-2:] != self.pixel_scale.shape:
            raise ValueError(
                f"This folded NAM has spatial attention for {self.pixel_scale.shape[0]}x"
                f"{self.pixel_scale.shape[1]} feature maps but got {x.shape[-2]}x{x.shape[-1]}: "
                "its scale factors belong to positions, so the input resolution must stay the "
                "one NAM was built with."
            )
        if torch.compiler.is_exporting():
            y = self._exported_gate(x)
        # the (C,) buffers go to the kernel as they are: reshaping them there costs nothing,
        # here it costs a few eager operator calls per site
        elif self.bn_scale is not None and self.bn_shift is not None:
            y = bn_gate_kernel(x, self.gate_scale, self.gate_shift, self.bn_scale, self.bn_shift)
        else:
            y = gate_kernel(x, self.gate_scale, self.gate_shift)
        if self.pixel_scale is not None and self.pixel_shift is not None:
            pixel_gate = torch.addcmul(
                self.pixel_shift.to(y.dtype), y, self.pixel_scale.to(y.dtype)
            )
            y = y * pixel_gate.sigmoid()
        return y

    def _exported_gate(self, z: torch.Tensor) -> torch.Tensor:
        """The channel part as ``torch.export`` (and so the ONNX exporter) records it: the
        folded BatchNorm as a batch norm, ``x = bn_scale * z + bn_shift``, and the gate's logit
        as a depthwise 1x1 convolution of ``x``, then ``x * sigmoid(logit)``.

        Written so, an inference runtime fuses the batch norm into the convolution before the
        site and the sigmoid into the depthwise one (onnxruntime does; see
        ``benchmarks/inference.py``); the kernel's formula exports as separate elementwise
        operators, one pass each. The same function of ``z`` up to float rounding: the logit
        ``p * z + q`` is ``(p / bn_scale) * x + q - (p / bn_scale) * bn_shift``; where
        ``bn_scale`` is 0, ``p`` is 0 too (``p = a * bn_scale``) and the logit is ``q``.
        """
        channels = self.gate_scale.numel()
        x, slope, offset = z, self.gate_scale, self.gate_shift
        if self.bn_scale is not None and self.bn_shift is not None:
            x = nn.functional.batch_norm(
                z,
                torch.zeros_like(self.bn_shift),
                torch.ones_like(self.bn_scale),
                self.bn_scale,
                self.bn_shift,
                training=False,
                eps=0.0,
            )
            kept = self.bn_scale != 0
            slope = torch.where(kept, slope / torch.where(kept, self.bn_scale, 1), 0)
            offset = offset - slope * self.bn_shift
        weight = slope.to(x.dtype).view(channels, 1, 1, 1)
        logit = nn.functional.conv2d(x, weight, offset.to(x.dtype), groups=channels)
        return x * torch.sigmoid(logit)

    def extra_repr(self) -> str:
        text = f"channels={self.gate_scale.numel()}, bn_folded={self.bn_scale is not None}"
        if self.pixel_scale is not None:
            text += f", spatial_size={tuple(self.pixel_scale.shape)}"
        return text


def fold_nam(model: nn.Module) -> int:
    """Replace every NAM site of ``model`` by its eval-mode equivalent, in place.

    Each :class:`~nam_lightning.NAMSite` becomes a :class:`FoldedNAM` computing the same output
    from the running statistics. When the site wraps a BatchNorm2d with running statistics (the
    standard site, see :func:`~nam_lightning.inject_nam`; also torchvision's FrozenBatchNorm2d
    and timm's BatchNormAct2d without activation), that BatchNorm is folded in as well; any
    other wrapped module (a norm with a built-in activation included) is kept, as
    ``nn.Sequential(module, FoldedNAM(...))``. The result
    is for inference only: the folded modules have no parameters, NAM can no longer be trained,
    pruned or removed, and the weights no longer load into an unfolded model.

    Args:
        model: a network with NAM injected, in eval mode.

    Returns:
        The number of sites folded.

    Raises:
        ValueError: when the model (or a NAM site) is in training mode, when it holds no NAM
            site (also on a second call: folding is done once), or when a NAM BatchNorm keeps
            no running statistics. Every replacement is built before any is put in place, and
            they go in all or none, so on any error the model is unchanged.

    Example:
        >>> import torchvision
        >>> from nam_lightning import inject_nam
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> len(inject_nam(model))
        8
        >>> fold_nam(model.eval())
        8
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    sites = [(name, m) for name, m in model.named_modules() if isinstance(m, NAMSite)]
    if not sites:
        hint = (
            "it is already folded (fold_nam runs once)"
            if any(isinstance(m, FoldedNAM) for m in model.modules())
            else "inject_nam puts NAM in a model"
        )
        raise ValueError(f"Nothing to fold: {type(model).__name__} holds no NAM site; {hint}.")
    in_sites = {id(m) for _, site in sites for m in site.modules()}
    training = [
        name or "the model"
        for name, m in model.named_modules()
        if m.training and (m is model or id(m) in in_sites)
    ]
    if training:
        raise ValueError(
            f"fold_nam needs the model in eval mode, but {training[:3]} "
            f"{'is' if len(training) == 1 else 'are'} in training mode: folding uses the "
            "BatchNorm running statistics, which only eval mode uses. Call model.eval() first."
        )
    if sites[0][0] == "":
        raise ValueError(
            "`model` is itself a NAMSite: fold_nam replaces sites inside a model, so pass the "
            "module that holds it."
        )

    replacements = {name: fold_site(name, site) for name, site in sites}
    replace_modules(model, replacements)  # all or none
    return len(replacements)


def fold_site(name: str, site: NAMSite) -> nn.Module:
    """The eval-mode replacement of one site: a FoldedNAM, after the module when it is kept."""
    nam = site.nam
    _check_running_stats(f"{name}.nam.channel.bn", nam.channel.bn)
    reference = nam.channel.bn.running_mean
    assert reference is not None  # checked just above

    # The constants of the unfolded eval path, worked out in float64 (on the CPU, which every
    # backend can copy to) and rounded once, so the folded model is as close to the exact maths
    # as the unfolded one.
    removed = _cpu64(nam.channel.pruned_mass)
    nam_state = _state64(nam.channel.bn)
    bn_scale = bn_shift = None
    module = site.module
    # Folded in only when the module's eval output is exactly its BatchNorm map: not after a
    # built-in activation (timm's BatchNormAct2d), which NAM then gates the output of.
    module_state = eval_affine_state(module)
    if module_state is not None:
        constants = eval_site_constants(removed, *_to64(module_state), *nam_state)
        gate_scale, gate_shift, bn_scale, bn_shift = constants
    else:
        gate_scale, gate_shift = eval_nam_constants(removed, *nam_state)
    gain = 2.0 if nam.channel.identity_init else 1.0  # its gate is 2 * sigmoid(...)
    pixel_scale = pixel_shift = None
    if nam.spatial is not None:
        _check_running_stats(f"{name}.nam.spatial.bn", nam.spatial.bn)
        scale, shift = eval_nam_constants(None, *_state64(nam.spatial.bn))
        pixel_scale, pixel_shift = scale.view(nam.spatial.size), shift.view(nam.spatial.size)
        if nam.spatial.identity_init:
            # 2 y sigmoid(s y + t) = y2 sigmoid(s / 2 * y2 + t) with y2 = 2 y
            pixel_scale, gain = pixel_scale / 2, gain * 2
    if gain != 1:  # powers of two: exact
        if bn_scale is None or bn_shift is None:
            bn_scale, bn_shift = torch.ones_like(gate_scale), torch.zeros_like(gate_shift)
        bn_scale, bn_shift = bn_scale * gain, bn_shift * gain

    folded = FoldedNAM(
        gate_scale.to(reference),
        gate_shift.to(reference),
        bn_scale=_like(bn_scale, reference),
        bn_shift=_like(bn_shift, reference),
        pixel_scale=_like(pixel_scale, reference),
        pixel_shift=_like(pixel_shift, reference),
    ).eval()
    return folded if module_state is not None else nn.Sequential(module, folded).eval()


def _state64(bn: _BatchNorm) -> BNState:
    """``bn``'s eval-mode state (running statistics, eps, weight, bias), float64 on the CPU."""
    return _to64(bn_state(bn))


def _to64(state: BNState) -> BNState:
    """An eval-mode state with its tensors in float64 on the CPU."""
    return cast(BNState, tuple(_cpu64(t) if isinstance(t, torch.Tensor) else t for t in state))


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _like(t: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor | None:
    """``t`` on the device and in the dtype of ``reference`` (``None`` stays ``None``)."""
    return None if t is None else t.to(reference)


def _has_running_stats(bn: _BatchNorm) -> bool:
    return bn.running_mean is not None and bn.running_var is not None


def _check_running_stats(name: str, bn: _BatchNorm) -> None:
    if not _has_running_stats(bn):
        raise ValueError(
            f"Cannot fold NAM: its BatchNorm {name!r} has track_running_stats=False, so it "
            "normalises with the statistics of each batch even in eval mode; folding needs "
            "running statistics. Nothing was folded."
        )


def _check_pair(
    name: str, scale: torch.Tensor | None, shift: torch.Tensor | None, *, dims: int, optional: bool
) -> None:
    if optional and scale is None and shift is None:
        return
    if not (isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)):
        either = " (or both None)" if optional else ""
        raise TypeError(
            f"`{name}_scale` and `{name}_shift` must both be tensors{either}, got "
            f"{type(scale).__name__} and {type(shift).__name__}"
        )
    if scale.dim() != dims or scale.shape != shift.shape:
        raise ValueError(
            f"`{name}_scale` and `{name}_shift` must be {dims}-D tensors of one shape, got "
            f"{tuple(scale.shape)} and {tuple(shift.shape)}"
        )
