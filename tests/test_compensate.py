"""Function-preserving pruning: channels with gamma = 0 and beta != 0 go without changing the
outputs, for each kind of consumer; the same checks fail with the compensation off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nam_lightning import load_checkpoint, prune_channels, save_pruned
from nam_lightning.compensate import removed_contribution


def dead_channels(bn: nn.BatchNorm2d, channels: list[int]) -> None:
    """Random statistics and affine parameters, then ``gamma = 0`` (``beta`` kept, non-zero)
    on ``channels``: those channels output the constant ``beta``."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(0.2, 1.0)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight[channels] = 0.0


class PointwiseAndHead(nn.Module):
    """A 1x1 convolution followed by a BatchNorm, then a linear head after global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        dead_channels(self.bn1, [1, 4, 6])
        dead_channels(self.bn2, [0, 3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class KernelConsumer(nn.Module):
    """A zero-padded 3x3 convolution with a bias reads the pruned channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=True)
        dead_channels(self.bn1, [2, 5, 7])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def pruned_outputs(
    model: nn.Module, amount: float, compensate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 3, 9, 9)
    model.eval()
    with torch.no_grad():
        before = model(x)
    prune_channels(model, x, amount, compensate=compensate, measure=False)
    model.eval()
    with torch.no_grad():
        after = model(x)
    return before, after


@pytest.mark.parametrize("compensate", [True, False])
def test_pointwise_batchnorm_following_and_linear_head_consumers(compensate: bool) -> None:
    model = PointwiseAndHead()
    before, after = pruned_outputs(model, 5 / 16, compensate)
    assert model.bn1.num_features == 5 and model.bn2.num_features == 6  # exactly the dead ones
    if compensate:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    else:
        assert (after - before).abs().max() > 1e-2


@pytest.mark.parametrize("compensate", [True, False])
def test_kxk_consumer_is_exact_inside_and_off_at_padded_borders(compensate: bool) -> None:
    model = KernelConsumer()
    before, after = pruned_outputs(model, 3 / 8, compensate)
    assert model.bn1.num_features == 5
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    if compensate:
        torch.testing.assert_close(after[inside], before[inside], rtol=0, atol=1e-5)
    else:
        assert (after[inside] - before[inside]).abs().max() > 1e-2
    assert (after - before).abs().max() > 1e-3  # the border taps saw zeros, not the constant


def test_contribution_of_a_grouped_convolution_matches_running_it() -> None:
    conv = nn.Conv2d(8, 6, 3, groups=2, bias=False)
    mean = torch.randn(8, dtype=torch.float64)
    removed = [1, 2, 6]
    constant = torch.zeros(1, 8, 3, 3, dtype=torch.float64)
    constant[0, removed] = mean[removed].view(-1, 1, 1)
    with torch.no_grad():
        expected = nn.functional.conv2d(constant, conv.weight.double(), groups=2).view(6)
    torch.testing.assert_close(removed_contribution(conv, removed, mean), expected)


def test_compensated_model_reloads_bitwise(tmp_path: pytest.TempPathFactory) -> None:
    model = PointwiseAndHead()
    x = torch.randn(2, 3, 9, 9)
    prune_channels(model, x, 5 / 16, measure=False)
    path = tmp_path / "pruned.pt"  # type: ignore[operator]
    save_pruned(model, path)
    loaded = load_checkpoint(PointwiseAndHead, path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
