"""Train a torchvision ResNet-18 with NAM and the L1 sparsity penalty on handwritten digits.

    python examples/resnet_digits.py --epochs 3

The digits come with scikit-learn (8x8 grey images, no download). The LightningModule is plain:
NAMCallback adds NAM to the ResNet's blocks and the penalty to training, and the trained model
is loaded back with nam_lightning.load_checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nam_lightning import NAMCallback, load_checkpoint


def digits(split: str) -> TensorDataset:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    index = order[:cut] if split == "train" else order[cut:]
    return TensorDataset(x[index], y[index])


class DigitsResNet(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        net = torchvision.models.resnet18(num_classes=10)
        # 8x8 inputs: a 3x3 stride-1 stem on one channel, no max-pool.
        net.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(digits("train"), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(digits("val"), batch_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lambda", dest="lambda_", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=Path("runs/example"))
    args = parser.parse_args()

    pl.seed_everything(0)
    model = DigitsResNet()
    checkpoint = ModelCheckpoint(dirpath=args.out, save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[NAMCallback(lambda_=args.lambda_), checkpoint],
        default_root_dir=args.out,
        log_every_n_steps=5,
    )
    trainer.fit(model)
    print("metrics:", {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})

    restored = load_checkpoint(DigitsResNet, args.out / "last.ckpt").eval()
    x, _ = digits("val").tensors
    same = torch.equal(restored(x[:8]), model.eval()(x[:8]))
    print(f"reloaded {args.out / 'last.ckpt'} with NAM in place; identical outputs: {same}")


if __name__ == "__main__":
    main()
