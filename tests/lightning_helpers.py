"""A tiny residual classifier, LightningModules and a seeded one-call ``fit`` shared by the
callback tests and scripts."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock

from nam_lightning import NAMCallback, inject_nam, l1_penalty


def tiny_resnet(num_classes: int = 10) -> nn.Module:
    """Two torchvision BasicBlocks (so ``sites="auto"`` finds two NAM sites) on 8 channels."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8),
        BasicBlock(
            8,
            16,
            stride=2,
            downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


class Tiny(nn.Module):
    """tiny_resnet as a class of its own, as ``load_checkpoint`` takes (``num_classes`` only)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = tiny_resnet(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_data(n: int = 64, size: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


class Classifier(pl.LightningModule):
    """``reference_lambda > 0`` adds ``reference_lambda * l1_penalty`` to the loss: the
    straightforward formulation the callback must reproduce exactly."""

    def __init__(
        self,
        lr: float = 0.1,
        reference_lambda: float = 0.0,
        targets: str = "all",
        fused: bool = False,
        inject: bool = False,
        manual: bool = False,
        two_optimizers: bool = False,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = tiny_resnet()
        if inject:
            inject_nam(self)
        self.automatic_optimization = not manual
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.hparams.reference_lambda:
            loss = loss + self.hparams.reference_lambda * l1_penalty(self, self.hparams.targets)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        return None

    def configure_optimizers(self) -> Any:
        def sgd(params: Any) -> torch.optim.Optimizer:
            kwargs = {"fused": True} if self.hparams.fused else {}
            return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, **kwargs)

        if self.hparams.two_optimizers:
            params = list(self.parameters())
            return [sgd(params[: len(params) // 2]), sgd(params[len(params) // 2 :])]
        return sgd(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(random_data(), batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(random_data(16, seed=1), batch_size=8)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


class ConfigureModelClassifier(Classifier):
    """Builds its network in ``configure_model``, as large-model code does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        del self.net
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = tiny_resnet()


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the nam_lightning record (tensors only), detached copies."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        limit_val_batches=0,
    )
    kwargs.update(overrides)
    return kwargs


LAMBDA = 1e-2  # large enough that a missing or doubled penalty shows after a few steps


def fit(module_kwargs: dict[str, Any], callback: NAMCallback | None, **overrides: Any) -> Any:
    """Seeded ``Trainer.fit`` of ``module_kwargs.pop("cls", Classifier)(**module_kwargs)`` with
    ``callback`` (or none) and :func:`trainer_kwargs` ``(**overrides)``; returns the module."""
    pl.seed_everything(0, verbose=False)
    cls = module_kwargs.pop("cls", Classifier)
    model = cls(**module_kwargs)
    trainer = pl.Trainer(callbacks=[callback] if callback else [], **trainer_kwargs(**overrides))
    trainer.fit(model)
    return model


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
