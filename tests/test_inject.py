"""Placing NAM in torchvision networks, taking it out, and what travels with the weights."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import efficientnet, mobilenetv2, mobilenetv3, regnet, resnet

from nam_lightning import NAMChannelAttention, NAMSite, NAMSpatialAttention, inject_nam, remove_nam
from nam_lightning.record import RECORD_KEY

# model name -> (block type, number of blocks); NAM goes once at the end of each block.
BLOCKS = {
    "resnet18": (resnet.BasicBlock, 8),
    "resnet50": (resnet.Bottleneck, 16),
    "resnext50_32x4d": (resnet.Bottleneck, 16),
    "mobilenet_v2": (mobilenetv2.InvertedResidual, 17),
    "mobilenet_v3_small": (mobilenetv3.InvertedResidual, 11),
    "efficientnet_b0": (efficientnet.MBConv, 16),
    "regnet_y_400mf": (regnet.ResBottleneckBlock, 16),
}


def build(name: str = "resnet18") -> nn.Module:
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def nam_sites(model: nn.Module) -> dict[str, NAMSite]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NAMSite)}


def ref_channel_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """NAM channel attention with the BatchNorm in eval mode (running statistics)."""
    z = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    w = bn.weight.abs() / bn.weight.abs().sum()
    return x * torch.sigmoid(w[None, :, None, None] * z)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_auto_puts_nam_after_the_last_batchnorm_of_every_block(name):
    model = build(name)
    block_type, count = BLOCKS[name]
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, block_type)}
    assert len(blocks) == count
    if name.startswith("res"):
        suffix = "bn2" if block_type is resnet.BasicBlock else "bn3"
        expected = [f"{b}.{suffix}" for b in blocks]
    else:  # inverted residual blocks: their last BatchNorm is the projection's
        expected = [
            [f"{b}.{n}" for n, m in block.named_modules() if isinstance(m, _BatchNorm)][-1]
            for b, block in blocks.items()
        ]
    originals = {n: model.get_submodule(n) for n in expected}

    names = inject_nam(model)

    assert names == expected
    sites = nam_sites(model)
    assert list(sites) == expected
    for site_name, site in sites.items():
        assert isinstance(site.module, _BatchNorm)
        assert site.module is originals[site_name]
        assert site.nam.channel.bn.num_features == site.module.num_features
        assert site.nam.spatial is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_injecting_twice_changes_nothing(name):
    model = build(name)
    first = inject_nam(model)
    n_params = sum(p.numel() for p in model.parameters())
    keys = list(model.state_dict())

    second = inject_nam(model)

    assert second == first
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m.module, NAMSite) for m in nam_sites(model).values())


def test_injecting_twice_with_a_predicate_changes_nothing():
    model = build()

    def bn1(name, module):
        return isinstance(module, nn.BatchNorm2d) and name.endswith("bn1")

    first = inject_nam(model, bn1)
    assert inject_nam(model, bn1) == first


def test_remove_nam_restores_the_model():
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    keys = list(model.state_dict())
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}

    inject_nam(model)
    assert not torch.allclose(model(x), before)  # NAM does change the output

    assert remove_nam(model) == 8
    assert not nam_sites(model)
    assert list(model.state_dict()) == keys
    assert {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)} == bns
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert remove_nam(model) == 0


def test_nam_survives_sync_batchnorm_conversion():
    model = build()
    inject_nam(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    unconverted = copy.deepcopy(model)

    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()

    sites = nam_sites(converted)
    assert list(sites) == list(nam_sites(unconverted))
    for site in sites.values():
        assert isinstance(site.module, nn.SyncBatchNorm)
        assert isinstance(site.nam.channel.bn, nn.SyncBatchNorm)
    calls = []
    for m in converted.modules():
        if isinstance(m, NAMChannelAttention):
            m.register_forward_hook(lambda *_: calls.append(1))

    out = converted(x)

    assert len(calls) == 8
    torch.testing.assert_close(out, unconverted(x))


def test_inject_into_a_module_holding_the_network():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    bare = inject_nam(build())
    wrapper = Wrapper()

    names = inject_nam(wrapper)

    assert names == [f"net.{n}" for n in bare]
    assert list(nam_sites(wrapper)) == names
    assert RECORD_KEY in wrapper.state_dict()
    assert wrapper(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_sites_as_a_list_of_names():
    model = build().eval()
    original = model.layer1[0].bn1

    assert inject_nam(model, ["layer1.0.bn1"]) == ["layer1.0.bn1"]

    assert list(nam_sites(model)) == ["layer1.0.bn1"]
    site = model.layer1[0].bn1
    assert isinstance(site, NAMSite)
    assert site.module is original
    assert site.nam.channel.bn.num_features == 64
    # The site computes NAM(module(x)).
    with torch.no_grad():
        site.nam.channel.bn.weight.normal_()
        site.nam.channel.bn.bias.normal_()
    seen = {}
    # clone: the block's in-place ReLU overwrites the site's output right after the hook
    site.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].clone(), out=o.clone()))
    model(torch.randn(2, 3, 32, 32))
    want = ref_channel_eval(original(seen["inp"]), site.nam.channel.bn)
    torch.testing.assert_close(seen["out"], want)


def test_sites_as_a_predicate():
    model = build()
    expected = ["bn1"] + [f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)]

    names = inject_nam(model, lambda n, m: isinstance(m, nn.BatchNorm2d) and n.endswith("bn1"))

    assert names == expected
    assert list(nam_sites(model)) == expected
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_site_without_readable_channels_is_measured_from_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    assert inject_nam(model, ["1"], example_inputs=torch.randn(2, 3, 8, 8)) == ["1"]

    assert model[1].nam.channel.bn.num_features == 4
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4, 6, 6)


def test_nam_at_a_parameterless_site_follows_the_model_dtype():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    inject_nam(model, ["1"], example_inputs=x)

    assert model[1].nam.channel.bn.weight.dtype == torch.float64
    assert model(x).dtype == torch.float64


def test_spatial_attention_is_sized_from_the_real_feature_maps():
    x = torch.randn(2, 3, 32, 48)  # non-square: the maps are H x 1.5H
    model = build()
    measured = {}
    for n, m in model.named_modules():
        if isinstance(m, resnet.BasicBlock):
            m.bn2.register_forward_hook(lambda m, i, o, n=n: measured.update({n: o.shape[1:]}))
    with torch.no_grad():
        model(x)
    model = build()  # fresh, without hooks

    names = inject_nam(model, spatial=True, example_inputs=x)

    assert names == [f"{n}.bn2" for n in measured]
    sizes = {}
    for n, site in nam_sites(model).items():
        c, h, w = measured[n.removesuffix(".bn2")]
        assert site.nam.channel.bn.num_features == c
        assert isinstance(site.nam.spatial, NAMSpatialAttention)
        assert site.nam.spatial.size == (h, w)
        assert site.nam.spatial.bn.num_features == h * w
        sizes[n] = (h, w)
    assert sizes["layer1.0.bn2"] == (8, 12)
    assert sizes["layer4.1.bn2"] == (1, 2)
    assert model(x).shape == (2, 10)

    with pytest.raises(ValueError, match=r"8x12.*8x8"):
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_nam_takes_the_training_flag_of_the_module_it_follows(mode):
    model = build().train(mode != "eval")
    if mode == "mixed":
        model.layer2.eval()

    inject_nam(model)

    for n, site in nam_sites(model).items():
        expected = site.module.training
        assert expected == (mode == "train" or (mode == "mixed" and not n.startswith("layer2")))
        assert site.training == expected
        assert all(m.training == expected for m in site.nam.modules())


def test_state_dict_carries_the_record_and_loads_into_an_injected_copy():
    model = build()
    names = inject_nam(model)
    with torch.no_grad():
        for site in nam_sites(model).values():
            site.nam.channel.bn.weight.normal_()
    model.eval()
    state = model.state_dict()

    assert set(state[RECORD_KEY]["nam_sites"]) == set(names)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # the record is plain data

    copy_ = build()
    inject_nam(copy_)
    copy_.load_state_dict(state)  # strict

    assert RECORD_KEY in state  # loading does not consume the caller's dict
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(copy_.eval()(x), model(x))


def test_state_dict_does_not_load_into_a_model_with_nam_elsewhere():
    model = build()
    inject_nam(model)
    other = build()
    inject_nam(other, ["layer1.0.bn1"])

    with pytest.raises(RuntimeError, match="load_checkpoint"):
        other.load_state_dict(model.state_dict())


def test_removed_nam_leaves_no_record():
    model = build()
    keys = list(model.state_dict())
    inject_nam(model)
    remove_nam(model)

    assert list(model.state_dict()) == keys
    build().load_state_dict(model.state_dict())


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "fragments"),
    [
        (small_net, {}, ValueError, ["No NAM site", "BasicBlock", "sites="]),
        (build, {"sites": "bogus"}, ValueError, ["`sites`", "'bogus'"]),
        (build, {"sites": ["not.a.module"]}, ValueError, ["'not.a.module'"]),
        (build, {"sites": []}, ValueError, ["`sites`", "empty"]),
        (build, {"sites": lambda n, m: False}, ValueError, ["predicate matched no module"]),
        (build, {"spatial": True}, ValueError, ["`spatial=True`", "`example_inputs`"]),
        (build, {"eps": 0}, ValueError, ["`eps`", "0"]),
        (small_net, {"sites": ["1"]}, ValueError, ["'1'", "ReLU", "`example_inputs`"]),
    ],
    ids=[
        "no-site",
        "sites=bogus",
        "unknown-name",
        "sites=[]",
        "predicate-matches-nothing",
        "spatial-without-example_inputs",
        "eps=0",
        "channels-unreadable",
    ],
)
def test_bad_input_raises_and_leaves_the_model_unchanged(make, kwargs, error, fragments):
    model = make()
    keys = list(model.state_dict())

    with pytest.raises(error) as excinfo:
        inject_nam(model, **kwargs)

    for fragment in fragments:
        assert fragment in str(excinfo.value)
    assert list(model.state_dict()) == keys
    assert not nam_sites(model)


def test_model_that_is_not_a_module_raises_type_error():
    with pytest.raises(TypeError, match=r"`model`.*str"):
        inject_nam("x")
    with pytest.raises(TypeError, match=r"`model`.*str"):
        remove_nam("x")


def test_nested_sites_are_rejected():
    model = torchvision.models.resnet18(num_classes=10)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="inside it"):
        inject_nam(model, ["layer1.0", "layer1.0.bn1"], example_inputs=torch.randn(2, 3, 32, 32))
    assert list(model.state_dict()) == keys
