"""The NAM-alone and fused NAM training paths equal the straightforward formula exactly."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from helpers import reference
from torch import nn

from nam_lightning import NAM, NAMSite, functional, kernels
from nam_lightning.functional import gate_forward, gate_input_grad
from nam_lightning.kernels import Kernel

DT = torch.float64
SMALL_MAP = kernels.SMALL_MAP  # as the library has it; tests below set it per test


@pytest.fixture(autouse=True)
def _kernels_on_tiny_maps(monkeypatch) -> None:
    """The kernels' exactness is checked on tiny maps, where training would otherwise run
    PyTorch's operators (see test_small_maps_train_with_pytorch_operators)."""
    monkeypatch.setattr(kernels, "SMALL_MAP", 0)


def site(detach: bool, momentum: float | None = 0.1, pruned: float = 0.0) -> NAMSite:
    bn1 = nn.BatchNorm2d(6, momentum=momentum)
    nam = NAM(6, detach_weights=detach)
    nam.channel.bn.momentum = momentum
    with torch.no_grad():
        for bn in (bn1, nam.channel.bn):
            bn.weight.uniform_(-1.5, 1.5)  # both signs: |gamma| and sign(gamma) matter
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        nam.channel.pruned_mass.fill_(pruned)
    return NAMSite(bn1, nam).to(DT).train()


def tensors(s: NAMSite) -> list[torch.Tensor]:
    bn1, bn2 = s.module, s.nam.channel.bn
    return [bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var]


@pytest.mark.parametrize("small", [False, True], ids=["kernels", "small map"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "alone"])
@pytest.mark.parametrize("detach", [True, False], ids=["detached", "differentiable"])
@pytest.mark.parametrize(("momentum", "pruned"), [(0.1, 0.0), (None, 0.7)])
def test_paths_equal_the_formula(
    monkeypatch, small: bool, fuse: bool, detach: bool, momentum: float | None, pruned: float
) -> None:
    if small:
        monkeypatch.setattr(kernels, "SMALL_MAP", SMALL_MAP)
    ours = site(detach, momentum, pruned)
    ours.fuse = fuse
    ref = copy.deepcopy(ours)
    params = [
        ours.module.weight,
        ours.module.bias,
        ours.nam.channel.bn.weight,
        ours.nam.channel.bn.bias,
    ]
    ref_params = [
        ref.module.weight,
        ref.module.bias,
        ref.nam.channel.bn.weight,
        ref.nam.channel.bn.bias,
    ]
    for step in range(3):  # running statistics accumulate over steps
        x = torch.randn(4, 6, 5, 7, dtype=DT, requires_grad=True)  # non-square maps
        y, y_ref = ours(x), reference(ref.module, ref.nam, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, *params], dy)
        ref_grads = torch.autograd.grad(y_ref, [x, *ref_params], dy)
        for name, g, r in zip(["x", "g1", "b1", "g2", "b2"], grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=f"d{name} step {step}")
        for a, b in zip(tensors(ours), tensors(ref), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert int(ours.module.num_batches_tracked) == int(ours.nam.channel.bn.num_batches_tracked) == 3


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "alone"])
def test_channels_last_input_equals_the_formula(fuse: bool) -> None:
    ours = site(detach=False)
    ours.fuse = fuse
    ref = copy.deepcopy(ours)
    x = torch.randn(4, 6, 5, 7, dtype=DT).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y, y_ref = ours(x), reference(ref.module, ref.nam, x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for g, r in zip(
        torch.autograd.grad(y, [x, *ours.parameters()], dy),
        torch.autograd.grad(y_ref, [x, *ref.parameters()], dy),
        strict=True,
    ):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_nam_on_its_own_uses_the_alone_path_exactly() -> None:
    nam = NAM(6, detach_weights=False).to(DT).train()
    with torch.no_grad():
        nam.channel.bn.weight.uniform_(-1.5, 1.5)
        nam.channel.bn.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(nam)
    x = torch.randn(3, 6, 4, 9, dtype=DT, requires_grad=True)
    y = nam(x)
    identity = nn.Identity()
    bn = ref.channel.bn
    z = bn(x)
    w = bn.weight.abs() / bn.weight.abs().sum()
    y_ref = identity(x) * torch.sigmoid(z * w.view(1, -1, 1, 1))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, [x, nam.channel.bn.weight, nam.channel.bn.bias], dy),
        torch.autograd.grad(y_ref, [x, bn.weight, bn.bias], dy),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(nam.channel.bn.running_var, bn.running_var)


def saved_bytes(fn: object, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)  # type: ignore[operator]
    return sum(storages.values())


def test_fused_site_saves_no_more_than_its_batchnorm() -> None:
    x = torch.randn(8, 6, 32, 32, requires_grad=True)
    fused = site(True).float()
    bn_only = saved_bytes(fused.module, x)
    plain = copy.deepcopy(fused)
    plain.fuse = False
    straightforward = saved_bytes(lambda t: reference(plain.module, plain.nam, t), x)
    activation = x.numel() * 4
    assert saved_bytes(fused, x) <= bn_only + 4096  # per-channel vectors only
    assert straightforward >= bn_only + 2 * activation  # what the plain formula keeps
    alone = saved_bytes(plain, x)  # NAM alone keeps only its input
    assert alone <= bn_only + activation + 4096


@pytest.mark.parametrize("case", ["eval", "no_grad", "bfloat16", "sync_bn"])
def test_other_cases_take_the_plain_path(case: str) -> None:
    s = site(True).float()
    x = torch.randn(4, 6, 5, 7)
    if case == "eval":
        s.eval()
    if case == "bfloat16":
        s, x = s.to(torch.bfloat16), x.to(torch.bfloat16)
    if case == "sync_bn":
        s = nn.SyncBatchNorm.convert_sync_batchnorm(s).eval()  # forward needs no process group
    ref = copy.deepcopy(s)
    with torch.set_grad_enabled(case != "no_grad"):
        torch.testing.assert_close(s(x), reference(ref.module, ref.nam, x))


@pytest.mark.parametrize("kind", ["alone", "fused"])
def test_compiled_kernels_equal_the_eager_math(kind: str) -> None:
    pair, n_params, eps = (
        (functional.ALONE_KERNELS, 3, (1e-5,))
        if kind == "alone"
        else (functional.FUSED_KERNELS, 5, (1e-5, 1e-3))
    )
    z = torch.randn(4, 6, 5, 7)
    params = [torch.randn(6) for _ in range(n_params)]
    statistics = pair.statistics(z, *params, *eps)
    for a, b in zip(statistics, pair.statistics.fn(z, *params, *eps), strict=True):
        torch.testing.assert_close(a, b)
    mean, var, _, *coefficients = statistics
    gate = (mean, *coefficients)
    torch.testing.assert_close(functional.gate_forward_kernel(z, *gate), gate_forward(z, *gate))
    dy = torch.randn_like(z)
    args = (dy, z, mean, var, *coefficients, *params, *eps)
    for a, b in zip(pair.backward(*args), pair.backward.fn(*args), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    invstd, dmean, dvar = coefficients[0], torch.randn(1, 6, 1, 1), torch.randn(1, 6, 1, 1)
    count = z.numel() // z.shape[1]
    expected = dy * invstd + dmean / count + dvar * (2 / count) * (z - mean)
    for fn in (functional.gate_input_grad_kernel, gate_input_grad):
        dzh = dy.clone()
        dz = fn(dzh, z, mean, invstd, dmean, dvar)
        assert dz is dzh  # written over its input: no fresh activation-sized tensor
        torch.testing.assert_close(dz, expected)


def test_inductor_options_are_ones_this_torch_accepts() -> None:
    """torch.compile refuses an option its Inductor does not know, or one of another type, and
    the kernels would then run eagerly: every option asked for is known here, and accepted."""
    from torch._inductor import config

    known = config.get_config_copy()
    options = kernels.inductor_options(known)
    assert set(options) <= set(known)
    assert all(type(value) is type(known[name]) for name, value in options.items())
    torch.compile(lambda t: t + 1, options=options)  # checks the options; compiles on first call
    if "realize_opusers_threshold" in known:  # torch 2.14: every option under its newest name
        assert options == {
            "realize_reads_threshold": 1000,
            "realize_opusers_threshold": 1000,
            "realize_cpu_opcount_threshold": 1000,
            "realize_cpu_acc_reads_threshold": 1000,
            "cpp.enable_floating_point_contract_flag": "fast",
        }


def test_inductor_options_for_an_older_torch() -> None:
    """An older Inductor's configuration (as an older torch/_inductor/config.py of
    pytorch/pytorch has it: one opcount and one accumulated-reads threshold for every device,
    no op-users threshold, an on/off contraction flag) gets each option under the name and
    type it has there, and nothing it would refuse."""
    older = {
        "realize_reads_threshold": 4,
        "realize_opcount_threshold": 30,
        "realize_acc_reads_threshold": 8,
        "cpp.enable_floating_point_contract_flag": False,
        "max_autotune": False,
    }
    assert kernels.inductor_options(older) == {
        "realize_reads_threshold": 1000,
        "realize_opcount_threshold": 1000,
        "realize_acc_reads_threshold": 1000,
        "cpp.enable_floating_point_contract_flag": True,
    }


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_kernel_keeps_many_variants_where_torch_compile_takes_no_limit(monkeypatch) -> None:
    """torch.compile of torch 2.11 takes no per-function ``recompile_limit``, and Dynamo's
    global one (8) made a kernel's 9th variant fail under fullgraph=True: it then ran eagerly
    for the rest of the process. The kernel raises the global limit while it runs, and only
    then."""
    from torch._dynamo import config as dynamo_config

    monkeypatch.delenv("NAM_LIGHTNING_COMPILE", raising=False)  # the compiling path
    monkeypatch.setattr(kernels, "RECOMPILE_LIMIT", {})  # as on a torch without the option
    limit = dynamo_config.recompile_limit
    assert limit < 10
    kernel = Kernel(lambda t: t * 2 + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nam_lightning")  # no fallback
        for rank in range(1, 11):  # each rank a variant of its own
            x = torch.randn([2] * rank)
            torch.testing.assert_close(kernel(x), x * 2 + 1)
    assert kernel.enabled
    assert dynamo_config.recompile_limit == limit


@pytest.mark.parametrize("when", ["first call", "torch.compile"])
def test_kernel_falls_back_to_eager_once_when_compiling_fails(monkeypatch, when: str) -> None:
    """A missing toolchain fails at the first call; an option torch.compile does not know fails
    at torch.compile itself. Either way the kernel warns once and runs the plain operators."""

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler\nsecond line of a long log")

        if when == "torch.compile":
            run()
        return run

    monkeypatch.delenv("NAM_LIGHTNING_COMPILE", raising=False)  # the compiling path
    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = Kernel(gate_forward)
    z, coefficients = torch.randn(2, 3, 4, 4), [torch.rand(1, 3, 1, 1) + 0.5 for _ in range(6)]
    with pytest.warns(UserWarning, match=r"failed \(RuntimeError: no C\+\+ compiler\); running"):
        out = kernel(z, *coefficients)
    torch.testing.assert_close(out, gate_forward(z, *coefficients))
    assert not kernel.enabled


def test_kernel_input_errors_propagate_and_keep_it_compiled(monkeypatch) -> None:
    def checking_compile(fn, **kwargs):  # fails where the eager function fails, like Inductor
        return fn

    monkeypatch.delenv("NAM_LIGHTNING_COMPILE", raising=False)  # the compiling path
    monkeypatch.setattr(torch, "compile", checking_compile)
    kernel = Kernel(gate_forward)
    bad = [torch.rand(1, 5, 1, 1) for _ in range(6)]  # 5 channels for a 3-channel input
    with pytest.raises(RuntimeError, match="size of tensor"):
        kernel(torch.randn(2, 3, 4, 4), *bad)
    assert kernel.enabled


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "alone"])
def test_small_maps_train_with_pytorch_operators(monkeypatch, fuse: bool) -> None:
    """Up to SMALL_MAP elements a float32/float64 training step calls no kernel (its numbers:
    test_paths_equal_the_formula); one element more, and it takes the kernels."""
    from unittest import mock

    ours = site(detach=False).float()
    ours.fuse = fuse
    for elements, kernels_called in [(SMALL_MAP, False), (SMALL_MAP + 6 * 5, True)]:
        monkeypatch.setattr(kernels, "SMALL_MAP", SMALL_MAP)
        x = torch.randn(1, 6, 5, elements // 30, requires_grad=True)
        with mock.patch.object(kernels.Kernel, "__call__", autospec=True) as call:
            call.side_effect = lambda kernel, *args: kernel.fn(*args)
            ours(x).sum().backward()
        assert call.called is kernels_called, elements


def test_the_size_rule_picks_the_kernels_above_small_map_and_in_low_precision(
    monkeypatch,
) -> None:
    from nam_lightning.kernels import Path, choose_path

    monkeypatch.setattr(kernels, "SMALL_MAP", 100)
    bn, nam_bn = nn.BatchNorm2d(1), nn.BatchNorm2d(1)
    for n, dtype, expected in [
        (100, torch.float32, Path.SMALL),
        (101, torch.float32, Path.FUSED),
        (100, torch.float64, Path.SMALL),
        (100, torch.bfloat16, Path.FUSED),  # the kernels round once; the operators do not
    ]:
        x = torch.zeros(1, 1, 1, n, dtype=dtype)
        assert choose_path(x, nam_bn, bn) is expected, (n, dtype)
        alone = Path.ALONE if expected is Path.FUSED else expected
        assert choose_path(x, nam_bn) is alone, (n, dtype)
    nam_bn.eval(), bn.eval()
    with torch.no_grad():  # inference: the one-pass kernels above SMALL_MAP, else the operators
        for n, dtype, expected in [
            (100, torch.float32, Path.PLAIN),
            (101, torch.float32, Path.EVAL_FUSED),
            (100, torch.bfloat16, Path.EVAL_FUSED),
        ]:
            x = torch.zeros(1, 1, 1, n, dtype=dtype)
            assert choose_path(x, nam_bn, bn) is expected, (n, dtype)
            alone = Path.EVAL_ALONE if expected is Path.EVAL_FUSED else expected
            assert choose_path(x, nam_bn) is alone, (n, dtype)


def test_fuse_flag_travels_through_injection_and_the_record() -> None:
    import torchvision

    from nam_lightning import inject_nam
    from nam_lightning.record import nam_specs

    model = torchvision.models.resnet18(num_classes=10)
    inject_nam(model, fuse=False)
    assert all(spec.fuse is False for spec in nam_specs(model).values())
    assert not any(m.fuse for m in model.modules() if isinstance(m, NAMSite))


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
@pytest.mark.parametrize("traceable", [True, False], ids=["traced", "plain operators"])
def test_a_compiled_model_trains_as_the_eager_one(monkeypatch, traceable: bool) -> None:
    """Under ``torch.compile(model)`` (``ImageClassifier(compile=True)``) the sites' autograd
    function is traced into the model's graph, or, on a torch older than 2.14 (whose Dynamo
    mis-wired it), the sites run the plain operators: same loss, gradients and running
    statistics as the eager model with its kernels. The graph is run by AOTAutograd without
    Inductor's code generation (``backend="aot_eager"``): the tracing is what is tested (the
    kernels' compiled code is, above), and generating C++ for a whole model costs ~40 s here."""
    from nam_lightning import inject_nam
    from nam_lightning.models import small_resnet

    if traceable and not kernels.TRACEABLE:
        pytest.skip("this torch's Dynamo mis-wires the traced function: gradients come out wrong")
    monkeypatch.setattr(kernels, "TRACEABLE", traceable)

    torch.manual_seed(0)
    eager = small_resnet(10, in_channels=1)
    inject_nam(eager)
    traced = copy.deepcopy(eager)
    compiled = torch.compile(traced, backend="aot_eager")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(2):  # the running statistics move between the steps
        losses = [nn.functional.cross_entropy(m(x), y) for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), traced.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(eager.named_buffers(), traced.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
