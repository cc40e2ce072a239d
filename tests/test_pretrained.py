"""NAM in a trained network: ``identity_init`` starts every new site as the identity.

With it the gate is ``2 * sigmoid(w * BN(x))`` and NAM's scale factors start at 1e-8, so the
network computes what it computed before NAM went in. The reference formula is written here;
every path a site can take (training fused or alone, eval kernels, plain operators, folded) is
checked against it, and the trained model's outputs against those before injection.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from helpers import randomise_norms
from lightning_helpers import Classifier, trainer_kwargs
from torch import nn

from nam_lightning import (
    NAM,
    NAMCallback,
    NAMChannelAttention,
    NAMSite,
    fold_nam,
    inject_nam,
    load_checkpoint,
    save_pruned,
)
from nam_lightning.attention import IDENTITY_GAMMA
from nam_lightning.record import RECORD_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomise_norms(torchvision.models.resnet18(num_classes=10))


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's outputs on every path: eval under no_grad (NAM's kernels), eval under
    autograd (plain operators), and training mode (batch statistics) on a float64 copy: there
    NAM's kernels work the site's BatchNorm out themselves, and float32 rounding differences
    (~1e-7) grow to ~1e-6 through the batch statistics of later layers."""
    model.eval()
    with torch.no_grad():
        inference = model(x)
    plain = model(x).detach()
    training = copy.deepcopy(model).double().train()(x.double()).detach()
    return {"inference": inference, "plain": plain, "training": training}


@pytest.mark.parametrize(
    "sites",
    ["auto", ["conv1", "layer2.0.conv2", "layer3.1.relu"]],
    ids=["after_batchnorms", "alone"],  # fused with the site's BatchNorm, or NAM on its own
)
@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
def test_a_trained_model_computes_the_same_right_after_injection(sites, spatial):
    model = trained_resnet()
    # 64 px and 4 images: the last stage's batch statistics are over 16 values, not 2
    x = torch.randn(4, 3, 64, 64)
    before = outputs(model, x)
    plain_nam = copy.deepcopy(model)
    inject_nam(plain_nam, sites, spatial=spatial, example_inputs=x)
    inject_nam(model, sites, spatial=spatial, example_inputs=x, identity_init=True)
    after = outputs(model, x)
    for path, expected in before.items():
        torch.testing.assert_close(after[path], expected, rtol=0, atol=1e-6, msg=path)
    # the paper's initialisation halves every gated branch instead
    assert (outputs(plain_nam, x)["plain"] - before["plain"]).abs().max() > 1e-2


def reference_site(z: torch.Tensor, site: NAMSite, training: bool) -> torch.Tensor:
    """BatchNorm then ``x * 2 * sigmoid(w * BN_nam(x))``, by hand."""
    bn, nam_bn = site.module, site.nam.channel.bn

    def norm(t: torch.Tensor, b: nn.BatchNorm2d) -> torch.Tensor:
        if training:
            mean, var = (
                t.mean((0, 2, 3), keepdim=True),
                t.var((0, 2, 3), keepdim=True, unbiased=False),
            )
        else:
            mean, var = b.running_mean.view(1, -1, 1, 1), b.running_var.view(1, -1, 1, 1)
        return (t - mean) / torch.sqrt(var + b.eps) * b.weight.view(1, -1, 1, 1) + b.bias.view(
            1, -1, 1, 1
        )

    x = norm(z, bn)
    gamma = nam_bn.weight.abs()
    w = gamma / (gamma.sum() + site.nam.channel.pruned_mass)
    return x * 2 * torch.sigmoid(w.view(1, -1, 1, 1) * norm(x, nam_bn))


@pytest.mark.parametrize("fuse", [True, False])
def test_every_path_of_an_identity_site_gates_with_twice_the_sigmoid(fuse):
    """After training (scale factors away from their start) each path follows the formula."""
    torch.manual_seed(0)
    site = NAMSite(nn.BatchNorm2d(6), NAM(6, identity_init=True), fuse=fuse)
    randomise_norms(site, seed=1)
    site.nam.channel.pruned_mass.fill_(0.3)
    site = site.double()
    z = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + 1

    site.train()
    y = site(z.requires_grad_())  # training: fused kernel (or NAM's own, fuse=False)
    torch.testing.assert_close(y, reference_site(z, site, True), rtol=0, atol=1e-12)
    site.eval()
    with torch.no_grad():
        inference = site(z)  # eval kernels
    plain = site(z)  # plain operators
    expected = reference_site(z, site, False)
    for result in (inference, plain):
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)
    model = nn.Sequential(site).eval()
    fold_nam(model)
    with torch.no_grad():
        torch.testing.assert_close(model(z), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
@pytest.mark.parametrize("sites", ["auto", ["conv1"]], ids=["bn_folded", "module_kept"])
def test_folded_identity_sites_match_the_unfolded_model(spatial, sites):
    model = trained_resnet()
    x = torch.randn(2, 3, 32, 32)
    inject_nam(model, sites, spatial=spatial, example_inputs=x, identity_init=True)
    randomise_norms(model, seed=2).eval()  # NAM trained too: its gates are no longer 1
    model, x = model.double().eval(), x.double()
    expected = model(x).detach()
    assert (expected - trained_resnet().double().eval()(x)).abs().max() > 1e-2
    folded = copy.deepcopy(model)
    fold_nam(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)


def test_nam_learns_from_the_identity():
    """Scale factors of 1e-8, not 0: the attention weights are 1/C, so gamma and beta get the
    paper's gradients from the first step (all-zero scale factors would give none)."""
    model = trained_resnet()
    inject_nam(model, identity_init=True)
    nams = [m for m in model.modules() if isinstance(m, NAMChannelAttention)]
    assert all(torch.equal(m.bn.weight, torch.full_like(m.bn.weight, IDENTITY_GAMMA)) for m in nams)
    model.train()
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    for m in nams:
        assert m.bn.weight.grad.abs().min() > 0 and m.bn.bias.grad.abs().min() > 0


def test_the_record_rebuilds_identity_sites(tmp_path: Path):
    model = trained_resnet()
    inject_nam(model, identity_init=True)
    randomise_norms(model, seed=3)
    state = model.state_dict()
    assert all(spec["identity_init"] for spec in state[RECORD_KEY]["nam_sites"].values())
    save_pruned(model, tmp_path / "model.pt", hyper_parameters={"num_classes": 10})
    loaded = load_checkpoint(torchvision.models.resnet18, tmp_path / "model.pt")
    nams = [m for m in loaded.modules() if isinstance(m, NAMChannelAttention)]
    assert len(nams) == 8 and all(m.identity_init for m in nams)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))

    plain = torchvision.models.resnet18()
    inject_nam(plain)  # without the option the record stays as it was
    specs = plain.state_dict()[RECORD_KEY]["nam_sites"].values()
    assert not any("identity_init" in spec for spec in specs)


def test_plain_load_state_dict_refuses_nam_built_otherwise():
    """The same sites, but a gate of sigmoid instead of 2 * sigmoid: the weights do not fit."""
    model = trained_resnet()
    inject_nam(model, identity_init=True)
    other = trained_resnet()
    inject_nam(other)
    with pytest.raises(RuntimeError, match=r"saved with identity_init=True, .*identity_init=False"):
        other.load_state_dict(model.state_dict())
    twin = trained_resnet()
    inject_nam(twin, identity_init=True)
    twin.load_state_dict(model.state_dict())


def test_callback_injects_identity_sites():
    pl.seed_everything(0, verbose=False)
    module = Classifier()
    randomise_norms(module)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = module.eval()(x)
    callback = NAMCallback(identity_init=True)
    pl.Trainer(callbacks=[callback], **trainer_kwargs(max_steps=0)).fit(module)
    nams = [m for m in module.modules() if isinstance(m, NAMChannelAttention)]
    assert len(nams) == 2 and all(m.identity_init for m in nams)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), before, rtol=0, atol=1e-6)


def test_identity_init_must_be_a_bool():
    with pytest.raises(TypeError, match="`identity_init` must be a bool"):
        inject_nam(torchvision.models.resnet18(), identity_init=1)
    with pytest.raises(TypeError, match="`identity_init` must be a bool"):
        NAMCallback(identity_init="yes")
