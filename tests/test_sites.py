"""The block registry behind ``sites="auto"`` (nam_lightning.sites)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from nam_lightning import inject_nam, register_block
from nam_lightning import sites as sites_module
from nam_lightning.sites import auto_sites, registered_blocks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Every test leaves the registry as it found it."""
    before = dict(sites_module.USER_BLOCKS)
    yield
    sites_module.USER_BLOCKS.clear()
    sites_module.USER_BLOCKS.update(before)


class Block(nn.Module):
    """A residual block whose shortcut BatchNorm is registered after the branch's."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(self.branch(x))) + self.shortcut(x))


class SubBlock(Block):
    pass


def test_a_registered_block_gets_one_site_at_the_named_norm() -> None:
    model = nn.Sequential(Block(), Block())
    with pytest.raises(ValueError, match="No NAM site found"):
        inject_nam(model)
    register_block(Block, "bn")
    assert inject_nam(model) == ["0.bn", "1.bn"]
    assert inject_nam(model) == ["0.bn", "1.bn"]  # found again through the NAM sites


def test_a_branch_path_takes_its_last_norm() -> None:
    register_block(Block, "branch")
    assert auto_sites(nn.Sequential(Block())) == ["0.branch.1"]


def test_subclasses_use_their_nearest_registered_base() -> None:
    register_block(Block, "bn")
    model = nn.Sequential(Block(), SubBlock())
    assert auto_sites(model) == ["0.bn", "1.bn"]
    register_block(SubBlock, "branch")
    assert auto_sites(model) == ["0.bn", "1.branch.1"]
    register_block(Block, "shortcut.1")  # registering again replaces the entry
    assert auto_sites(model) == ["0.shortcut.1", "1.branch.1"]


def test_a_path_the_block_lacks_is_skipped() -> None:
    register_block(Block, "missing")
    assert auto_sites(nn.Sequential(Block())) == []


@pytest.mark.parametrize(
    ("block_type", "branch_end", "error", "match"),
    [
        (nn.Conv2d(1, 1, 1), "bn", TypeError, "`block_type` must be a torch.nn.Module subclass"),
        (int, "bn", TypeError, "`block_type` must be a torch.nn.Module subclass"),
        (Block, 3, TypeError, "`branch_end` must be an attribute path .* got int"),
        (Block, "", ValueError, "`branch_end` must be an attribute path .* got ''"),
        (Block, "bn..x", ValueError, "got 'bn..x'"),
        (Block, "bn[0]", ValueError, r"got 'bn\[0\]'"),
    ],
)
def test_register_block_refuses_bad_arguments(block_type, branch_end, error, match) -> None:
    before = registered_blocks()
    with pytest.raises(error, match=match):
        register_block(block_type, branch_end)
    assert registered_blocks() == before


def test_timm_blocks_are_registered_once_timm_is_imported_and_yield_to_the_users() -> None:
    timm_resnet = pytest.importorskip("timm.models.resnet")
    assert registered_blocks()[timm_resnet.Bottleneck] == "bn3"
    register_block(timm_resnet.Bottleneck, "bn2")
    assert registered_blocks()[timm_resnet.Bottleneck] == "bn2"
    block = timm_resnet.Bottleneck(8, 2)
    assert auto_sites(nn.Sequential(block)) == ["0.bn2"]


def test_nam_lightning_works_without_timm() -> None:
    """timm is optional: with it missing, injection and folding work on torchvision models."""
    code = (
        "import sys\n"
        "sys.modules['timm'] = None  # import timm raises ImportError\n"
        "import torch, torchvision, nam_lightning\n"
        "from nam_lightning.sites import registered_blocks\n"
        "model = torchvision.models.resnet18()\n"
        "print(len(nam_lightning.inject_nam(model)), nam_lightning.fold_nam(model.eval()))\n"
        "print(sorted({t.__module__.split('.')[0] for t in registered_blocks()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["8 8", "['torchvision']"]
