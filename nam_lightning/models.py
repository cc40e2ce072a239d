"""Image classifiers for the command line: any torchvision model by name, or a small ResNet.

:class:`ImageClassifier` is an ordinary LightningModule (cross-entropy, SGD under a one-cycle
schedule, torchmetrics accuracy); NAM and its penalty come from :class:`~nam_lightning.NAMCallback`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from .checks import check_finite_float

_SMALL_RESNET = "small_resnet"


def small_resnet(
    num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128)
) -> nn.Module:
    """A CIFAR-style ResNet: a 3x3 stem and one torchvision BasicBlock per stage.

    Small inputs (8x8 digits, 32x32 CIFAR) keep their resolution through a stride-1 stem; each
    later stage halves it. ``sites="auto"`` finds one NAM site per block.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    channels = widths[0]
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or channels != width:
            downsample = nn.Sequential(
                nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )
        layers.append(BasicBlock(channels, width, stride, downsample))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def build_backbone(
    name: str, num_classes: int, in_channels: int = 3, cifar_stem: bool = False
) -> nn.Module:
    """``small_resnet`` or a torchvision classification model by name (random weights)."""
    if name == _SMALL_RESNET:
        return small_resnet(num_classes, in_channels)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"`backbone` {name!r} is not a torchvision classification model; valid: "
            f"{_SMALL_RESNET!r} or one of {available}"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and (cifar_stem or in_channels != 3):
        conv = model.get_submodule(first)
        kernel, stride, padding = (
            ((3, 3), (1, 1), (1, 1))
            if cifar_stem
            else (conv.kernel_size, conv.stride, conv.padding)
        )
        new = nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, bias=False)
        parent, _, child = first.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    if cifar_stem and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


class ImageClassifier(pl.LightningModule):
    """A classifier for the ``nam-lightning`` command.

    Args:
        backbone: ``"small_resnet"`` or the name of a torchvision classification model
            (``resnet50``, ``mobilenet_v2``, ...), built with random weights.
        num_classes: output classes (linked to the data by the command line).
        in_channels: input channels (linked to the data by the command line).
        cifar_stem: for torchvision models on small images: a 3x3 stride-1 first conv and no
            max-pool.
        lr: peak SGD learning rate.
        schedule: ``"onecycle"`` (training from scratch): ``OneCycleLR`` rises from
            ``lr / 25`` to ``lr`` over the first 15% of the steps, then anneals (cosine) to
            ``lr / 2.5e5``; ``"cosine"`` (fine-tuning trained or pruned weights, which a
            warm-up back to a high rate would undo): starts at ``lr`` and decays to 0 with no
            warm-up. :meth:`finetuning` switches to it.
        momentum: SGD momentum. Under ``"onecycle"`` the schedule cycles the momentum from
            0.95 to 0.85 and back (``OneCycleLR``'s defaults), so this value is not used.
        weight_decay: SGD weight decay (not applied to BatchNorm scale factors, which carry the
            L1 sparsity penalty instead).
        channels_last: use the channels-last memory format (faster convolutions on GPUs).
        compile: run the training, validation and test steps through ``torch.compile``.
            ``forward`` stays eager, so pruning, FLOP counting and export see plain modules;
            NAM injection and pruning trigger a recompile on the next step.
    """

    def __init__(
        self,
        backbone: str = _SMALL_RESNET,
        num_classes: int = 10,
        in_channels: int = 3,
        cifar_stem: bool = False,
        lr: float = 0.1,
        schedule: Literal["onecycle", "cosine"] = "onecycle",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if schedule not in ("onecycle", "cosine"):
            raise ValueError(f"`schedule` must be 'onecycle' or 'cosine', got {schedule!r}")
        self.save_hyperparameters()
        self.net = build_backbone(backbone, num_classes, in_channels, cifar_stem)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # Not a submodule (that would add state-dict keys): a compiled view of self.net.
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None
        object.__setattr__(self, "_compiled", torch.compile(self.net) if compile else None)
        metric = torchmetrics.classification.MulticlassAccuracy
        self.train_acc = metric(num_classes, average="micro")
        self.val_acc = metric(num_classes, average="micro")
        self.test_acc = metric(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self(x)
        if self.hparams["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self._logits(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self._logits(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self._logits(x), y)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Predicted class of each image (the labels of the batch, if any, are ignored)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self._logits(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
                (no_decay if bn or name == "bias" else decay).append(param)
        optimizer = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": self.hparams["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
            nesterov=True,
        )
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler: torch.optim.lr_scheduler.LRScheduler
        if self.hparams.get("schedule", "onecycle") == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.hparams["lr"], total_steps=steps, pct_start=0.15
            )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def finetuning(self, lr: float) -> None:
        """Set the next fit up as fine-tuning: start at ``lr`` (a fraction of the training
        rate, e.g. 0.1x) and decay it with no warm-up. Saved with the hyperparameters."""
        check_finite_float("lr", lr)
        self.hparams.update(lr=float(lr), schedule="cosine")
