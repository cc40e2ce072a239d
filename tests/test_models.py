"""The command line's models (nam_lightning.models): backbones by name and ImageClassifier."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from nam_lightning import NAMChannelAttention, inject_nam
from nam_lightning.models import ImageClassifier, build_backbone, small_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


# --- small_resnet ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_channels", "size", "num_classes"), [(1, 8, 10), (3, 32, 5), (3, 16, 100)]
)
def test_small_resnet_output_shapes(in_channels: int, size: int, num_classes: int) -> None:
    model = small_resnet(num_classes, in_channels)
    assert first_conv(model)[1].in_channels == in_channels
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes)


def test_small_resnet_has_three_nam_sites() -> None:
    model = small_resnet(10, 1)
    sites = inject_nam(model)
    assert len(sites) == 3
    assert len([m for m in model.modules() if isinstance(m, NAMChannelAttention)]) == 3
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_small_resnet_widths() -> None:
    model = small_resnet(4, 3, widths=(8, 16))
    assert first_conv(model)[1].out_channels == 8
    assert model[-1].in_features == 16
    assert len(inject_nam(model)) == 2


def test_build_backbone_small_resnet() -> None:
    model = build_backbone("small_resnet", 7, in_channels=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)


# --- torchvision models by name --------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_backbone_with_one_input_channel(name: str) -> None:
    reference = build_backbone(name, 7)
    model = build_backbone(name, 7, in_channels=1)
    ref_name, ref_conv = first_conv(reference)
    conv_name, conv = first_conv(model)
    assert conv_name == ref_name
    assert conv.in_channels == 1 and ref_conv.in_channels == 3
    # without cifar_stem the first conv keeps its geometry
    assert (conv.kernel_size, conv.stride, conv.padding) == (
        ref_conv.kernel_size,
        ref_conv.stride,
        ref_conv.padding,
    )
    assert conv.out_channels == ref_conv.out_channels
    model.eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    # everything after the first conv is the same architecture
    shapes = [p.shape for n, p in model.named_parameters() if not n.startswith(conv_name)]
    ref_shapes = [p.shape for n, p in reference.named_parameters() if not n.startswith(ref_name)]
    assert shapes == ref_shapes


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_backbone_three_channels_unchanged(name: str) -> None:
    model = build_backbone(name, 10)
    import torchvision

    reference = torchvision.models.get_model(name, weights=None, num_classes=10)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()
    ]


def test_resnet_cifar_stem() -> None:
    model = build_backbone("resnet18", 10, cifar_stem=True)
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 64
    assert isinstance(model.maxpool, nn.Identity)
    plain = build_backbone("resnet18", 10)
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.stride == (2, 2)
    assert isinstance(plain.maxpool, nn.MaxPool2d)
    # the stem keeps the resolution: 16x16 input -> layer4 at 2x2 instead of 1x1
    seen: dict[str, torch.Size] = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(cifar=o.shape))
    plain.layer4.register_forward_hook(lambda m, i, o: seen.update(plain=o.shape))
    x = torch.randn(2, 3, 16, 16)
    assert model.eval()(x).shape == plain.eval()(x).shape == (2, 10)
    assert seen["cifar"][-2:] == (2, 2) and seen["plain"][-2:] == (1, 1)


def test_cifar_stem_with_one_channel() -> None:
    model = build_backbone("resnet18", 10, in_channels=1, cifar_stem=True)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_cifar_stem_on_mobilenet() -> None:
    model = build_backbone("mobilenet_v2", 10, cifar_stem=True)
    conv = first_conv(model)[1]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", ["not_a_model", "ResNet18", "fasterrcnn_resnet50_fpn", ""])
def test_unknown_backbone_lists_valid_names(name: str) -> None:
    with pytest.raises(ValueError) as info:
        build_backbone(name, 10)
    message = str(info.value)
    assert "`backbone`" in message and repr(name) in message
    for valid in ("small_resnet", "resnet18", "mobilenet_v2", "efficientnet_b0"):
        assert valid in message


def test_classifier_rejects_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="valid"):
        ImageClassifier(backbone="not_a_model")


# --- ImageClassifier -------------------------------------------------------------------------


class Data(pl.LightningDataModule):
    def __init__(self, channels: int = 1, size: int = 8, n: int = 32, classes: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, channels, size, size, generator=g)
        self.ds = TensorDataset(x, torch.randint(0, classes, (n,), generator=g))

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.ds, batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.ds, batch_size=8)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.ds, batch_size=8)


def tiny_trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
    }
    return pl.Trainer(**{**options, **kwargs})


def test_classifier_steps_and_optimizer(tmp_path: Any) -> None:
    model = ImageClassifier(in_channels=1, weight_decay=1e-3, lr=0.05, momentum=0.8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=Data())
    assert trainer.global_step == 2
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.logged_metrics)
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)

    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"] is True
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    bn_params = {
        id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters()
    }
    assert bn_params and bn_params <= {id(p) for p in no_decay["params"]}
    assert not bn_params & {id(p) for p in decay["params"]}
    # every parameter is optimised exactly once; conv and linear weights decay
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert id(model.net[0].weight) in {id(p) for p in decay["params"]}
    assert id(model.net[-1].weight) in {id(p) for p in decay["params"]}
    assert id(model.net[-1].bias) in {id(p) for p in no_decay["params"]}
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert config.interval == "step"

    (val,) = trainer.validate(model, datamodule=Data(), verbose=False)
    assert set(val) == {"val/loss", "val/acc"} and 0 <= val["val/acc"] <= 1
    (test,) = trainer.test(model, datamodule=Data(), verbose=False)
    assert set(test) == {"test/acc"} and 0 <= test["test/acc"] <= 1


def test_classifier_with_nam_callback_optimises_nam_without_decay(tmp_path: Any) -> None:
    """The callback injects NAM before configure_optimizers: NAM's BatchNorms are optimised,
    in the no-weight-decay group."""
    from nam_lightning import NAMCallback

    model = ImageClassifier(in_channels=1)
    trainer = tiny_trainer(tmp_path, callbacks=[NAMCallback()])
    trainer.fit(model, datamodule=Data())
    nam = [m for m in model.modules() if isinstance(m, NAMChannelAttention)]
    assert len(nam) == 3
    (optimizer,) = trainer.optimizers
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert all(id(p) in no_decay for m in nam for p in m.bn.parameters())
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_classifier_hparams_and_channels_last(tmp_path: Any) -> None:
    model = ImageClassifier(
        "resnet18", num_classes=4, in_channels=3, cifar_stem=True, channels_last=True
    )
    assert model.hparams["backbone"] == "resnet18" and model.hparams["num_classes"] == 4
    assert model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1)
    trainer.fit(model.train(), datamodule=Data(channels=3, size=16, n=8, classes=4))
    assert trainer.global_step == 1
