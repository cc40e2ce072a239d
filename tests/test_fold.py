"""Folding NAM for inference (nam_lightning.fold): exactness, refusals, export, compilation.

The reference is the unfolded model in eval mode, and for a single site the NAM formulas written
out by hand. Every BatchNorm gets random scale factors of both signs, shifts and running
statistics, so a wrong term in the folding shows. Outputs are compared in float32 at 1e-6 (the
statistics are kept moderate so the logits stay well under 1: a float32 resnet50 with logits
of order 1 is itself ~1e-6 away from its float64 self) and in float64, where the folding must
be exact to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import shutil
import warnings
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import torch
import torchvision
from helpers import randomise_norms
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet

from nam_lightning import NAM, NAMSite, functional, inject_nam, kernels, prune_channels, remove_nam
from nam_lightning.fold import FoldedNAM, fold_nam

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _kernels_on_tiny_maps(monkeypatch) -> None:
    """The eval kernels are checked on small maps, where a NAM site would otherwise run
    PyTorch's operators (kernels.SMALL_MAP; tests/test_functional.py checks that rule)."""
    monkeypatch.setattr(kernels, "SMALL_MAP", 0)


def build(name: str, spatial: bool = False, x: torch.Tensor | None = None) -> nn.Module:
    """A torchvision model with NAM and random BatchNorms, in eval mode."""
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    inject_nam(model, spatial=spatial, example_inputs=x)
    return randomise_norms(model, signs=True).eval()


def tiny(spatial: bool = False) -> nn.Module:
    """conv-BN-ReLU, a BasicBlock, pooling, a classifier: the smallest NAM model."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        resnet.BasicBlock(8, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    inject_nam(model, spatial=spatial, example_inputs=torch.randn(1, 3, 6, 5))
    return randomise_norms(model, signs=True).eval()


def folded(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    fold_nam(out)
    return out


def plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfolded model's output from PyTorch's own operators: under autograd a NAM site in
    eval mode runs them (its one-pass eval kernels are for no-grad inference only)."""
    with torch.enable_grad():
        return model(x).detach()


@contextlib.contextmanager
def kernel_calls() -> Iterator[list[Any]]:
    """The NAM kernels called inside the block, in order (each runs its plain function)."""
    calls: list[Any] = []
    with mock.patch.object(kernels.Kernel, "__call__", autospec=True) as call:
        call.side_effect = lambda kernel, *args: calls.append(kernel) or kernel.fn(*args)
        yield calls


def count_sites(model: nn.Module) -> int:
    return sum(isinstance(m, NAMSite) for m in model.modules())


def snapshot(model: nn.Module) -> tuple[dict[str, Any], list[type]]:
    state = {
        k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
        for k, v in model.state_dict().items()
    }
    return state, [type(m) for m in model.modules()]


def assert_unchanged(model: nn.Module, before: tuple[dict[str, Any], list[type]]) -> None:
    state, types = snapshot(model)
    assert types == before[1]
    assert list(state) == list(before[0])
    for key, value in before[0].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
        else:
            assert state[key] == value


def bn_eval(x: torch.Tensor, bn: _BatchNorm) -> torch.Tensor:
    """BatchNorm with running statistics, written out; features on dim 1."""
    assert bn.running_mean is not None and bn.running_var is not None
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


@torch.no_grad()
def test_folded_site_matches_the_nam_formulas():
    """One BatchNorm2d + NAM site with a large eps and pruned mass, against the paper's maths."""
    c, h, w = 3, 2, 3
    bn = nn.BatchNorm2d(c, eps=0.3)
    site = NAMSite(bn, NAM(c, spatial_size=(h, w), eps=0.2))
    randomise_norms(site, seed=1, signs=True)
    site.nam.channel.pruned_mass.fill_(0.7)
    model = nn.Sequential(site).double().eval()
    z = torch.randn(4, c, h, w, dtype=torch.float64)

    nam = site.nam
    x = bn_eval(z, bn)
    gamma = nam.channel.bn.weight
    weights = gamma.abs() / (gamma.abs().sum() + nam.channel.pruned_mass)
    x = x * torch.sigmoid(weights.view(1, -1, 1, 1) * bn_eval(x, nam.channel.bn))
    flat = x.reshape(4 * c, h * w)  # positions are the features of the spatial BatchNorm
    assert nam.spatial is not None
    lam = nam.spatial.bn.weight
    flat = flat * torch.sigmoid(lam.abs() / lam.abs().sum() * bn_eval(flat, nam.spatial.bn))
    expected = flat.view(4, c, h, w)
    torch.testing.assert_close(model(z), expected, rtol=0, atol=1e-12)

    assert fold_nam(model) == 1
    assert isinstance(model[0], FoldedNAM) and model[0].bn_scale is not None
    torch.testing.assert_close(model(z), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
@torch.no_grad()
def test_folded_model_matches_unfolded(name, spatial):
    x = torch.randn(2, 3, SIZE, SIZE)
    model = build(name, spatial, x)
    sites = [n for n, m in model.named_modules() if isinstance(m, NAMSite)]
    result = copy.deepcopy(model)
    assert fold_nam(result) == len(sites)
    assert count_sites(result) == 0
    for site in sites:  # each auto site wraps a BatchNorm2d, which is folded in too
        assert isinstance(result.get_submodule(site), FoldedNAM)
        assert result.get_submodule(site).bn_scale is not None
    expected = plain(model, x)
    without_nam = copy.deepcopy(model)
    remove_nam(without_nam)
    assert (expected - without_nam(x)).abs().max() > 1e-2  # NAM changes the outputs
    torch.testing.assert_close(result(x), expected, rtol=0, atol=1e-6)

    model64 = model.double()
    x64 = x.double()
    torch.testing.assert_close(folded(model64)(x64), plain(model64, x64), rtol=0, atol=1e-12)


@torch.no_grad()
def test_fold_after_channel_pruning():
    x = torch.randn(2, 3, SIZE, SIZE)
    model = build("resnet18", spatial=True, x=x)
    prune_channels(model, x, 0.4, measure=False)
    masses = [m.nam.channel.pruned_mass for m in model.modules() if isinstance(m, NAMSite)]
    assert any(mass > 0 for mass in masses)
    model.eval()
    torch.testing.assert_close(folded(model)(x), plain(model, x), rtol=0, atol=1e-6)
    model64 = model.double()
    x64 = x.double()
    torch.testing.assert_close(folded(model64)(x64), plain(model64, x64), rtol=0, atol=1e-12)


@torch.no_grad()
def test_sites_that_are_not_foldable_batchnorms_keep_their_module():
    """A conv site, and a BatchNorm without running statistics, stay in front of the fold."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6, track_running_stats=False),
        nn.Conv2d(6, 4, 1),
    )
    inject_nam(model, sites=["1", "2"])
    randomise_norms(model, signs=True).eval()
    x = torch.randn(3, 3, 7, 7)
    result = folded(model)
    for index in ("1", "2"):
        kept = result.get_submodule(index)
        assert isinstance(kept, nn.Sequential) and isinstance(kept[1], FoldedNAM)
        assert kept[1].bn_scale is None
    torch.testing.assert_close(result(x), plain(model, x), rtol=0, atol=1e-6)


# --- unfolded, in eval mode under no_grad: the same constants, worked out at each call ----


@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
@torch.no_grad()
def test_unfolded_eval_inference_runs_one_pass_per_site_and_matches_the_plain_operators(
    name, spatial
):
    x = torch.randn(2, 3, SIZE, SIZE)
    model = build(name, spatial, x)
    one_site = [functional.eval_site_constants_kernel, functional.bn_gate_kernel]
    with kernel_calls() as calls:
        model(x)
    assert calls == one_site * count_sites(model)
    torch.testing.assert_close(model(x), plain(model, x), rtol=0, atol=1e-6)  # compiled

    model64 = model.double()
    x64 = x.double()
    torch.testing.assert_close(model64(x64), plain(model64, x64), rtol=0, atol=1e-12)
    assert all(k.enabled for k in one_site)


@torch.no_grad()
def test_eval_kernels_serve_every_width_and_many_variants():
    """Sixteen sites of different widths, sizes of 1 and dtypes stay compiled: the size-1 and
    dtype variants are more than torch.compile's default limit of 8 per function."""
    variants = itertools.product((1, 2), (1, 3), (1, 4), (torch.float32, torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warning would fail the test
        for c, (n, h, w, dtype) in enumerate(variants, start=3):
            site = NAMSite(nn.BatchNorm2d(c), NAM(c)).to(dtype).eval()
            randomise_norms(site, seed=c, signs=True)
            x = torch.randn(n, c, h, w, dtype=dtype)
            torch.testing.assert_close(site(x), plain(site, x), rtol=0, atol=1e-6)
    assert functional.eval_site_constants_kernel.enabled
    assert functional.bn_gate_kernel.enabled


@torch.no_grad()
def test_eval_kernels_compile_once_for_all_widths():
    """Parameters reach torch.compile detached: it would otherwise fix their shapes and compile
    the kernels again for every channel count."""
    from torch._dynamo.utils import counters

    def site(c: int) -> nn.Module:
        return randomise_norms(NAMSite(nn.BatchNorm2d(c), NAM(c)), seed=c, signs=True).eval()

    x = torch.randn(2, 5, 3, 4)
    site(5)(x)  # compiled (or already cached) for this input's kind
    before = counters["stats"]["unique_graphs"]
    for c in range(6, 12):
        x = torch.randn(2, c, 3, 4)
        torch.testing.assert_close(site(c)(x), plain(site(c), x), rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == before


@torch.no_grad()
def test_eval_inference_without_a_site_batchnorm_and_with_fuse_off():
    """NAM after a convolution gates in one pass on its own; ``fuse=False`` keeps the site's
    BatchNorm apart. Both against the NAM formula written out."""
    conv = nn.Conv2d(3, 4, 1)
    nam = NAM(4, eps=0.2)
    randomise_norms(nam, seed=2, signs=True)
    nam.channel.pruned_mass.fill_(0.4)
    bn = randomise_norms(nn.BatchNorm2d(4, eps=0.3), seed=3, signs=True)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)

    def formula(x: torch.Tensor) -> torch.Tensor:
        gamma = nam.channel.bn.weight
        weights = gamma.abs() / (gamma.abs().sum() + nam.channel.pruned_mass)
        return x * torch.sigmoid(weights.view(1, -1, 1, 1) * bn_eval(x, nam.channel.bn))

    after_conv = NAMSite(conv, nam).double().eval()
    expected = formula(conv(x))
    torch.testing.assert_close(after_conv(x), expected, rtol=0, atol=1e-12)

    unfused = NAMSite(bn, nam, fuse=False).double().eval()
    z = conv(x)
    with mock.patch.object(functional, "eval_bn_channel_gate") as fused:
        torch.testing.assert_close(unfused(z), formula(bn_eval(z, bn)), rtol=0, atol=1e-12)
    fused.assert_not_called()


@pytest.mark.parametrize("case", ["training", "grad", "bfloat16", "no_running_stats"])
def test_eval_kernels_stay_out_where_they_do_not_apply(case):
    """Training mode, autograd (gradients stay PyTorch's) and low precision run no eval kernel;
    a site BatchNorm that normalises with batch statistics in eval mode is not fused, and NAM
    after it gates on its own."""
    bn = nn.BatchNorm2d(4, track_running_stats=case != "no_running_stats")
    model = nn.Sequential(NAMSite(bn, NAM(4)))
    randomise_norms(model, signs=True)
    model.train(case == "training")
    x = torch.randn(2, 4, 3, 3)
    if case == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    with kernel_calls() as calls, torch.set_grad_enabled(case in ("training", "grad")):
        model(x)
    eval_kernels = [
        functional.eval_nam_constants_kernel,
        functional.gate_kernel,
        functional.eval_site_constants_kernel,
        functional.bn_gate_kernel,
    ]
    nam_alone = eval_kernels[:2] if case == "no_running_stats" else []
    assert [k for k in calls if k in eval_kernels] == nam_alone
    assert calls or case != "training"  # training took the NAM-alone path's own kernels


@torch.no_grad()
def test_flop_counting_sees_the_plain_operators_and_keeps_the_kernels_compiled():
    """torch.compile refuses to run under a dispatch mode such as FlopCounterMode: the kernels
    give the mode their plain operators instead of falling back to eager for good."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny()
    x = torch.randn(3, 3, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warning would fail the test
        with FlopCounterMode(display=False) as counter:
            out = model(x)
    torch.testing.assert_close(out, plain(model, x), rtol=0, atol=1e-6)
    assert counter.get_total_flops() > 0
    kernels = (functional.eval_site_constants_kernel, functional.bn_gate_kernel)
    assert all(k.enabled for k in kernels)


def test_folded_modules_are_parameter_free_buffers_that_travel():
    x = torch.randn(1, 3, SIZE, SIZE)
    model = build("resnet18", spatial=True, x=x)
    result = folded(model)
    for module in result.modules():
        if isinstance(module, FoldedNAM):
            assert not list(module.parameters())
    # The folded model holds the parameters of the model without NAM, less those of the
    # BatchNorms folded into the sites (they became buffers).
    plain = copy.deepcopy(model)
    site_names = [n for n, m in plain.named_modules() if isinstance(m, NAMSite)]
    remove_nam(plain)
    folded_bn_params = {f"{n}.{p}" for n in site_names for p in ("weight", "bias")}
    expected = {n for n, _ in plain.named_parameters()} - folded_bn_params
    assert {n for n, _ in result.named_parameters()} == expected
    assert sum(p.numel() for p in result.parameters()) == sum(
        p.numel() for n, p in plain.named_parameters() if n in expected
    )

    state = result.state_dict()
    assert {"layer1.0.bn2.gate_scale", "layer1.0.bn2.pixel_shift"} <= set(state)
    again = folded(model)
    again.load_state_dict(state)
    result.double()
    assert result.get_submodule("layer1.0.bn2").gate_scale.dtype == torch.float64


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda m: m.train(), "eval mode"),
        (lambda m: m.get_submodule("layer4.1.bn2").nam.train(), "layer4.1.bn2.nam"),
        (
            lambda m: _no_running_stats(m.get_submodule("layer4.1.bn2").nam.channel.bn),
            "track_running_stats=False",
        ),
        (
            lambda m: _no_running_stats(m.get_submodule("layer4.1.bn2").nam.spatial.bn),
            "nam.spatial.bn",
        ),
    ],
    ids=["training", "site-training", "channel-bn-stats", "spatial-bn-stats"],
)
def test_refusals_leave_the_model_unchanged(break_it, message):
    model = build("resnet18", spatial=True, x=torch.randn(1, 3, SIZE, SIZE))
    break_it(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        fold_nam(model)
    assert_unchanged(model, before)


def _no_running_stats(bn: _BatchNorm) -> None:
    bn.track_running_stats = False
    bn.running_mean = bn.running_var = bn.num_batches_tracked = None


def test_nothing_to_fold_and_a_second_fold_raise():
    plain = torchvision.models.resnet18(num_classes=10).eval()
    before = snapshot(plain)
    with pytest.raises(ValueError, match=r"Nothing to fold.*inject_nam"):
        fold_nam(plain)
    assert_unchanged(plain, before)

    model = tiny()
    assert fold_nam(model) == 1
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Nothing to fold.*already folded"):
        fold_nam(model)
    assert_unchanged(model, before)

    with pytest.raises(TypeError, match="`model` must be a torch"):
        fold_nam("resnet18")  # type: ignore[arg-type]


@torch.no_grad()
def test_folded_model_exports_and_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    x = torch.randn(2, 3, SIZE, SIZE)
    model = folded(build("resnet18", spatial=True, x=x))
    expected = model(x)

    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)

    path = tmp_path / "folded.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_an_exported_folded_site_is_a_batch_norm_a_depthwise_gate_and_a_product():
    # what runtimes fuse (the batch norm into the convolution before it, the sigmoid into the
    # depthwise convolution), with a channel whose folded BatchNorm scale is 0 among them
    channels = 5
    gen = torch.Generator().manual_seed(0)
    gate_scale, gate_shift, bn_shift = (torch.randn(channels, generator=gen) for _ in range(3))
    bn_scale = torch.randn(channels, generator=gen)
    bn_scale[1], gate_scale[1] = 0.0, 0.0  # gate_scale = a * bn_scale
    x = torch.randn(2, channels, 4, 3, generator=gen)
    for site in (
        FoldedNAM(gate_scale, gate_shift, bn_scale=bn_scale, bn_shift=bn_shift),
        FoldedNAM(gate_scale, gate_shift),
    ):
        bn = site.bn_scale if site.bn_scale is not None else torch.ones(channels)
        shift = site.bn_shift if site.bn_shift is not None else torch.zeros(channels)
        view = (1, channels, 1, 1)
        expected = (bn.view(view) * x + shift.view(view)) * torch.sigmoid(
            gate_scale.view(view) * x + gate_shift.view(view)
        )
        program = torch.export.export(site, (x,))
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
        ops = {n.target for n in program.graph.nodes if n.op == "call_function"}
        assert torch.ops.aten.conv2d.default in ops and torch.ops.aten.sigmoid.default in ops
        assert (torch.ops.aten.batch_norm.default in ops) == (site.bn_scale is not None)
        assert torch.ops.aten.exp2.default not in ops  # not the kernel's formula
        torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-6)  # eager: the kernel


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
@torch.no_grad()
def test_folded_model_compiles_without_graph_breaks():
    model = folded(tiny(spatial=True))
    x = torch.randn(3, 3, 6, 5)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)


@torch.no_grad()
def test_fx_symbolic_trace_records_the_plain_operators_and_keeps_kernels_compiled():
    model = folded(tiny())
    x = torch.randn(3, 3, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warning would fail the test
        graph = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-6)
    assert all(k.enabled for k in (functional.gate_kernel, functional.bn_gate_kernel))


def test_folded_spatial_attention_rejects_another_resolution():
    model = folded(tiny(spatial=True))
    with pytest.raises(ValueError, match="6x5 feature maps but got 6x6"):
        model(torch.randn(1, 3, 6, 6))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"gate_shift": torch.zeros(4)}, ValueError, "`gate_scale` and `gate_shift` must be 1-D"),
        ({"bn_scale": torch.ones(3)}, TypeError, "`bn_scale` and `bn_shift` must both be"),
        ({"bn_scale": torch.ones(2), "bn_shift": torch.ones(2)}, ValueError, "`bn_scale` has"),
        ({"pixel_scale": torch.ones(6), "pixel_shift": torch.ones(6)}, ValueError, "2-D"),
    ],
)
def test_folded_nam_rejects_mismatched_buffers(kwargs, error, match):
    arguments = {"gate_scale": torch.ones(3), "gate_shift": torch.zeros(3), **kwargs}
    with pytest.raises(error, match=match):
        FoldedNAM(**arguments)
