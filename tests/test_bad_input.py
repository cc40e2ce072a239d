"""Bad input to every public function: the right error type, a message that names the argument
and says what is valid, raised before any work starts (the model and files are untouched).

Cases already tested next to their function are not repeated here: ``test_inject.py`` (unknown
sites, empty lists, no site found, ``spatial`` without ``example_inputs``, ``eps=0``),
``test_attention.py`` (channel counts, spatial sizes, another resolution),
``test_fold.py`` (training mode, no NAM, missing running statistics, ``FoldedNAM`` shapes),
``test_sparsity.py`` (``targets``), ``test_pruning.py`` (every ``prune_channels`` argument),
``test_callback.py`` (``lambda_``, ``targets``, ``sites``, flags, ``log_on``, ``prune``) and
``test_checkpoint.py`` (truncated, foreign and missing files, another architecture's record).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from lightning_helpers import Tiny, tiny_resnet
from torch import nn

from nam_lightning import (
    NAM,
    FoldedNAM,
    NAMCallback,
    NAMChannelAttention,
    NAMSite,
    NAMSpatialAttention,
    PruneConfig,
    add_l1_subgradient_,
    fold_nam,
    inject_nam,
    l1_penalty,
    load_checkpoint,
    prune_channels,
    remove_nam,
    save_pruned,
    scale_factors,
    sparsity,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = math.nan, math.inf


def resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def state(model: nn.Module) -> dict[str, Any]:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Any], text: str) -> None:
    after = state(model)
    assert list(after) == list(before), text
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.is_tensor(v)), text


def check(error: type[Exception], fragments: list[str], call: Callable[[], Any]) -> str:
    """``call()`` raises exactly ``error`` with every fragment in its message."""
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, info.value
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- inject_nam / remove_nam / fold_nam -----------------------------------------------------

INJECT = {
    "spatial=1": ({"spatial": 1}, TypeError, ["`spatial` must be a bool", "got 1"]),
    "detach_weights='yes'": (
        {"detach_weights": "yes"},
        TypeError,
        ["`detach_weights` must be a bool", "'yes'"],
    ),
    "fuse=None": ({"fuse": None}, TypeError, ["`fuse` must be a bool", "None"]),
    "eps=nan": ({"eps": NAN}, ValueError, ["`eps` must be a finite float > 0", "nan"]),
    "eps=inf": ({"eps": INF}, ValueError, ["`eps` must be a finite float > 0", "inf"]),
    "eps=-1e-5": ({"eps": -1e-5}, ValueError, ["`eps` must be a finite float > 0"]),
    "eps='1e-5'": ({"eps": "1e-5"}, TypeError, ["`eps` must be a float, got str"]),
    "sites=one-name": (
        {"sites": "layer1.0.bn2"},
        ValueError,
        ["`sites` must be 'auto'", "pass a list: ['layer1.0.bn2']"],
    ),
    "sites=5": ({"sites": 5}, TypeError, ["`sites` must be 'auto'", "predicate", "got 5"]),
    "sites=[name, 3]": ({"sites": ["layer1", 3]}, TypeError, ["`sites`", "['layer1', 3]"]),
    "example_inputs=str": (
        {"example_inputs": "image.png"},
        TypeError,
        ["`example_inputs` must be", "a tensor", "tuple", "dict", "got str"],
    ),
    "example_inputs-wrong-channels": (
        {"example_inputs": torch.randn(1, 4, 32, 32)},
        ValueError,
        ["ResNet failed on `example_inputs`", "to have 3 channels, but got 4"],
    ),
    "site-outputs-2d": (
        {"sites": ["fc"], "example_inputs": torch.randn(1, 3, 32, 32)},
        ValueError,
        ["NAM needs (N, C, H, W) feature maps", "'fc' outputs shape (N, 10)"],
    ),
}


@pytest.mark.parametrize("case", list(INJECT))
def test_inject_nam_bad_arguments(case: str) -> None:
    kwargs, error, fragments = INJECT[case]
    model = resnet()
    before = state(model)
    check(error, fragments, lambda: inject_nam(model, **kwargs))
    assert_same_state(model, before, case)
    assert not any(isinstance(m, NAMSite) for m in model.modules())


def test_remove_and_fold_refuse_a_bare_site() -> None:
    site = NAMSite(nn.BatchNorm2d(4), NAM(4)).eval()
    check(ValueError, ["`model` is itself a NAMSite", "`model.module`"], lambda: remove_nam(site))
    check(ValueError, ["`model` is itself a NAMSite"], lambda: fold_nam(site))
    assert isinstance(site.module, nn.BatchNorm2d)


@pytest.mark.parametrize("fn", [remove_nam, fold_nam, scale_factors, l1_penalty])
def test_model_must_be_a_module(fn: Callable[..., Any]) -> None:
    check(
        TypeError, ["`model` must be a torch.nn.Module, got list"], lambda: fn([nn.Conv2d(1, 1, 1)])
    )


# --- NAM modules ----------------------------------------------------------------------------

CONSTRUCTORS: dict[str, tuple[Callable[[], Any], type[Exception], list[str]]] = {
    "channel-eps=0": (lambda: NAMChannelAttention(4, eps=0), ValueError, ["`eps`", "> 0", "0"]),
    "channel-eps=nan": (lambda: NAMChannelAttention(4, eps=NAN), ValueError, ["`eps`", "nan"]),
    "channel-eps=str": (lambda: NAMChannelAttention(4, eps="x"), TypeError, ["`eps`", "str"]),
    "channel-detach=None": (
        lambda: NAMChannelAttention(4, detach_weights=None),
        TypeError,
        ["`detach_weights` must be a bool", "None"],
    ),
    "spatial-eps=-1": (lambda: NAMSpatialAttention((3, 3), eps=-1.0), ValueError, ["`eps`"]),
    "spatial-detach=1": (
        lambda: NAMSpatialAttention((3, 3), detach_weights=1),
        TypeError,
        ["`detach_weights` must be a bool"],
    ),
    "spatial-size=floats": (
        lambda: NAMSpatialAttention((3.0, 3)),
        ValueError,
        ["`size[0]` must be a positive int", "3.0"],
    ),
    "nam-spatial_size=int": (
        lambda: NAM(4, spatial_size=5),
        ValueError,
        ["`spatial_size` must be None or a pair (H, W) of positive ints", "got 5"],
    ),
    "nam-spatial_size=(0,3)": (lambda: NAM(4, spatial_size=(0, 3)), ValueError, ["(0, 3)"]),
    "nam-eps=inf": (lambda: NAM(4, eps=INF), ValueError, ["`eps` must be a finite float > 0"]),
    "site-module=str": (
        lambda: NAMSite("bn", NAM(4)),
        TypeError,
        ["`module` must be a torch.nn.Module, got str"],
    ),
    "site-nam=BatchNorm2d": (
        lambda: NAMSite(nn.BatchNorm2d(4), nn.BatchNorm2d(4)),
        TypeError,
        ["`nam` must be a nam_lightning.NAM, got BatchNorm2d"],
    ),
    "site-fuse=1": (
        lambda: NAMSite(nn.BatchNorm2d(4), NAM(4), fuse=1),
        TypeError,
        ["`fuse` must be a bool"],
    ),
    "folded-gate_shift=None": (
        lambda: FoldedNAM(torch.ones(3), None),
        TypeError,
        ["`gate_scale` and `gate_shift` must both be tensors, got Tensor and NoneType"],
    ),
}


@pytest.mark.parametrize("case", list(CONSTRUCTORS))
def test_constructor_bad_arguments(case: str) -> None:
    build, error, fragments = CONSTRUCTORS[case]
    check(error, fragments, build)


def test_spatial_nam_fed_another_resolution_in_eval_mode() -> None:
    # (in training mode, on the fused path: test_inject.py)
    model = tiny_resnet()
    inject_nam(model, spatial=True, example_inputs=torch.randn(2, 3, 8, 8))
    model.eval()
    check(
        ValueError,
        ["built for 8x8", "got 6x6", "spatial=False"],
        lambda: model(torch.randn(2, 3, 6, 6)),
    )


# --- the sparsity functions -----------------------------------------------------------------


def with_grad() -> nn.Parameter:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.0]))
    p.grad = torch.zeros(3)
    return p


SUBGRADIENT = {
    "lambda_=-1": ([with_grad()], -1.0, ValueError, ["`lambda_` must be a finite float >= 0"]),
    "lambda_=nan": ([with_grad()], NAN, ValueError, ["`lambda_`", "nan"]),
    "lambda_=inf": ([with_grad()], INF, ValueError, ["`lambda_`", "inf"]),
    "lambda_='1e-4'": ([with_grad()], "1e-4", TypeError, ["`lambda_` must be a float, got str"]),
    "lambda_=True": ([with_grad()], True, TypeError, ["`lambda_` must be a float, got bool"]),
    "params=None": (None, 1e-4, TypeError, ["`params` must be a tensor or an iterable"]),
    "params=[1.0]": ([1.0], 1e-4, TypeError, ["`params` must hold only tensors, got a float"]),
    "params=module": (nn.BatchNorm2d(3), 1e-4, TypeError, ["not a module", "scale_factors"]),
}


@pytest.mark.parametrize("case", list(SUBGRADIENT))
def test_add_l1_subgradient_bad_arguments(case: str) -> None:
    params, lambda_, error, fragments = SUBGRADIENT[case]
    tensors = [p for p in params if isinstance(p, torch.Tensor)] if isinstance(params, list) else []
    grads = [p.grad.clone() for p in tensors]
    check(error, fragments, lambda: add_l1_subgradient_(params, lambda_))
    assert all(torch.equal(p.grad, g) for p, g in zip(tensors, grads, strict=True))


SPARSITY = {
    "threshold=0": ([torch.ones(2)], 0, ValueError, ["`threshold` must be a finite float > 0"]),
    "threshold=-1": ([torch.ones(2)], -1.0, ValueError, ["`threshold`", "-1.0"]),
    "threshold=nan": ([torch.ones(2)], NAN, ValueError, ["`threshold`", "nan"]),
    "threshold=inf": ([torch.ones(2)], INF, ValueError, ["`threshold`", "inf"]),
    "threshold='0.01'": ([torch.ones(2)], "0.01", TypeError, ["`threshold` must be a float"]),
    "params=None": (None, 1e-2, TypeError, ["`params` must be a tensor or an iterable"]),
    "params=['a']": (["a"], 1e-2, TypeError, ["`params` must hold only tensors, got a str"]),
}


@pytest.mark.parametrize("case", list(SPARSITY))
def test_sparsity_bad_arguments(case: str) -> None:
    params, threshold, error, fragments = SPARSITY[case]
    check(error, fragments, lambda: sparsity(params, threshold))


def test_one_tensor_counts_as_a_list_of_one() -> None:
    # iterating a tensor walks its elements, none of which has a gradient: a silent no-op
    p = with_grad()
    add_l1_subgradient_(p, 0.5)
    assert torch.equal(p.grad, torch.tensor([0.5, -0.5, 0.0]))
    assert float(sparsity(p, 0.5)) == pytest.approx(1 / 3)


# --- NAMCallback ----------------------------------------------------------------------------

CALLBACK = {
    "sites=5": ({"sites": 5}, TypeError, ["`sites` must be 'auto'", "got 5"]),
    "sites=one-name": ({"sites": "net.1"}, ValueError, ["pass a list: ['net.1']"]),
    "fuse='no'": ({"fuse": "no"}, TypeError, ["`fuse` must be a bool"]),
    "sparsity_threshold='a'": (
        {"sparsity_threshold": "a"},
        TypeError,
        ["`sparsity_threshold` must be a float, got str"],
    ),
    "sparsity_threshold=nan": ({"sparsity_threshold": NAN}, ValueError, ["finite float > 0"]),
    "targets=None": ({"targets": None}, ValueError, ["`targets` must be one of", "None"]),
    "log_on=None": ({"log_on": None}, ValueError, ["`log_on` must be 'step' or 'epoch'"]),
    "prune=nan": ({"prune": NAN}, ValueError, ["`prune`", "must be in (0, 1)", "nan"]),
    "prune=-0.5": ({"prune": -0.5}, ValueError, ["`prune`", "-0.5"]),
    "prune=[0.5]": ({"prune": [0.5]}, TypeError, ["`prune` must be None", "PruneConfig"]),
}


@pytest.mark.parametrize("case", list(CALLBACK))
def test_callback_bad_arguments(case: str) -> None:
    kwargs, error, fragments = CALLBACK[case]
    check(error, fragments, lambda: NAMCallback(**kwargs))


# --- prune_channels / PruneConfig (pruning.py; what test_pruning.py does not cover) ---------

PRUNE = {
    "amount=nan": ({"amount": NAN}, ValueError, ["`amount` must be a fraction in (0, 1)", "nan"]),
    "flops_target=nan": (
        {"amount": None, "flops_target": NAN},
        ValueError,
        ["`flops_target` must be a fraction in (0, 1)"],
    ),
    "max_layer_amount=nan": ({"max_layer_amount": NAN}, ValueError, ["`max_layer_amount`"]),
    "round_to=True": ({"round_to": True}, TypeError, ["`round_to` must be None or a positive"]),
}


@pytest.mark.parametrize("case", list(PRUNE))
def test_prune_config_bad_arguments(case: str) -> None:
    kwargs, error, fragments = PRUNE[case]
    check(error, fragments, lambda: PruneConfig(**{"amount": 0.5, **kwargs}))


def test_prune_channels_names_example_inputs_the_model_cannot_run() -> None:
    model = resnet()
    before = state(model)
    try:
        check(
            ValueError,
            ["`example_inputs`"],
            lambda: prune_channels(model, torch.randn(1, 4, 32, 32), 0.5, measure=False),
        )
    finally:
        assert_same_state(model, before, "wrong channels")


def test_prune_channels_names_ignored_layers_given_one_module() -> None:
    model = resnet()
    check(
        TypeError,
        ["`ignored_layers`"],
        lambda: prune_channels(
            model, torch.randn(1, 3, 32, 32), 0.5, ignored_layers=model.fc, measure=False
        ),
    )


# --- load_checkpoint / save_pruned ----------------------------------------------------------


class NeedsWidth(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Linear(width, 2)


def nam_tiny(**kwargs: Any) -> Tiny:
    model = Tiny(**kwargs)
    inject_nam(model)
    return model


def tiny_record(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """A save_pruned file of a NAM Tiny whose record ``edit`` damages."""
    state = nam_tiny().state_dict()
    edit(state["_nam_lightning"])
    torch.save({"state_dict": state}, path)


def write(path: Path, what: str) -> None:
    if what == "text":
        path.write_text("epoch,loss\n0,1.5\n")
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "pickle":  # pickle.dump, not torch.save
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"w": [1.0, 2.0]}}, f)
    elif what == "object":  # a torch.save file holding a whole module
        torch.save({"state_dict": {}, "model": nn.ReLU()}, path)
    elif what == "list":
        torch.save([1, 2, 3], path)
    elif what == "bare-state-dict":
        torch.save(Tiny().state_dict(), path)
    elif what == "hparams-not-a-dict":
        torch.save({"state_dict": Tiny().state_dict(), "hyper_parameters": [10]}, path)
    elif what == "other-architecture":
        torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, path)
    elif what == "other-constructor-arguments":
        save_pruned(nam_tiny(num_classes=5), path)  # loaded as Tiny(num_classes=10)
    elif what == "record-without-sites":
        tiny_record(path, lambda r: r.pop("nam_sites"))
    elif what == "record-of-another-format":
        tiny_record(path, lambda r: r.update(format=99))
    else:
        raise AssertionError(what)


LOAD_FILES = {
    "text": ["Cannot read", "not written by torch.save"],
    "empty": ["Cannot read", "the file is empty"],
    "pickle": ["Cannot read", "not written by torch.save"],
    "object": ["Cannot read", "other than tensors and plain containers", "Weights only load"],
    "list": ["holds no 'state_dict' entry"],
    "bare-state-dict": ["holds no 'state_dict' entry", "bare state dict", "load_state_dict"],
    "hparams-not-a-dict": ["'hyper_parameters' of type list, not a dict"],
    "other-architecture": ["do not fit Tiny", "another architecture", "Unexpected key(s)"],
    "other-constructor-arguments": ["do not fit Tiny", "other constructor arguments", "size"],
    "record-without-sites": ["Cannot rebuild Tiny", "KeyError: 'nam_sites'"],
    "record-of-another-format": ["is not a nam_lightning record we can read"],
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the pickle.dump file
@pytest.mark.parametrize("what", list(LOAD_FILES))
def test_load_checkpoint_refuses_foreign_files(tmp_path: Path, what: str) -> None:
    path = tmp_path / "checkpoint.pt"
    write(path, what)
    data = path.read_bytes()
    message = check(ValueError, LOAD_FILES[what], lambda: load_checkpoint(Tiny, path))
    assert str(path) in message
    assert path.read_bytes() == data  # only read


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    save_pruned(nam_tiny(), path, hyper_parameters={"num_classes": 10})
    return path


LOAD_ARGS: dict[str, tuple[Callable[[Path], Any], type[Exception], list[str]]] = {
    "path=int": (lambda p: load_checkpoint(Tiny, 3), TypeError, ["`path` must be a str"]),
    "path=dir": (
        lambda p: load_checkpoint(Tiny, p.parent),
        FileNotFoundError,
        ["is not a file (a directory)"],
    ),
    "map_location='gpu'": (
        lambda p: load_checkpoint(Tiny, p, map_location="gpu"),
        ValueError,
        ["`map_location` 'gpu' is not a device"],
    ),
    "map_location=1.5": (
        lambda p: load_checkpoint(Tiny, p, map_location=1.5),
        TypeError,
        ["`map_location` must be a device", "got float"],
    ),
    "unknown-kwarg": (
        lambda p: load_checkpoint(Tiny, p, num_clases=5),
        TypeError,
        ["['num_clases'] is not an argument of Tiny", "['num_classes']"],
    ),
    "required-argument-missing": (
        lambda p: load_checkpoint(NeedsWidth, p),
        TypeError,
        ["Cannot build NeedsWidth with the arguments []", "width"],
    ),
}


@pytest.mark.parametrize("case", list(LOAD_ARGS))
def test_load_checkpoint_bad_arguments(good: Path, case: str) -> None:
    call, error, fragments = LOAD_ARGS[case]
    data = good.read_bytes()
    check(error, fragments, lambda: call(good))
    assert good.read_bytes() == data


SAVE_ARGS: dict[str, tuple[Callable[[nn.Module, Path], Any], type[Exception], list[str]]] = {
    "model=str": (
        lambda m, d: save_pruned("model", d / "m.pt"),
        TypeError,
        ["`model` must be a torch.nn.Module, got str"],
    ),
    "path=None": (lambda m, d: save_pruned(m, None), TypeError, ["`path` must be a str"]),
    "path=dir": (lambda m, d: save_pruned(m, d), IsADirectoryError, ["is a directory"]),
    "missing-folder": (
        lambda m, d: save_pruned(m, d / "no" / "m.pt"),
        FileNotFoundError,
        ["the folder", "does not exist"],
    ),
    "extra-state_dict": (
        lambda m, d: save_pruned(m, d / "m.pt", state_dict={}),
        ValueError,
        ["`state_dict` cannot be passed to save_pruned"],
    ),
    "extra-object": (
        lambda m, d: save_pruned(m, d / "m.pt", hyper_parameters={"act": nn.ReLU()}),
        TypeError,
        ["['hyper_parameters']", "only tensors and plain containers", "weights_only=True"],
    ),
}


@pytest.mark.parametrize("case", list(SAVE_ARGS))
def test_save_pruned_bad_arguments(tmp_path: Path, case: str) -> None:
    call, error, fragments = SAVE_ARGS[case]
    model = nam_tiny()
    check(error, fragments, lambda: call(model, tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written
