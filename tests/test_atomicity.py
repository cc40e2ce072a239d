"""Every public operation that changes a model completes or leaves it exactly as it was.

Each test forces a failure *partway*: after some NAM sites were already swapped, while NAM
modules are being built, during the shape probe's forward pass, while the state-dict hooks are
attached, or inside a checkpoint's rebuild. The model must then have the same module tree
(the very same module, parameter and buffer objects), the same values, the same state-dict
keys, the same training flags and hooks, and the same output. ``prune_channels`` has its own
tests of this kind in ``test_pruning.py``.

For :func:`load_checkpoint` the model is new, so "unchanged" means the checkpoint file: it is
only read, and the failure says which file and why. For :func:`save_pruned`, a failure leaves
no temporary file, and an existing file keeps its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from helpers import assert_unchanged, hooks, randomise_bns, snapshot
from lightning_helpers import (
    Classifier,
    ConfigureModelClassifier,
    Tiny,
    trainer_kwargs,
)
from torch import nn

import nam_lightning.checkpoint
import nam_lightning.fold
import nam_lightning.inject
from nam_lightning import (
    NAMCallback,
    NAMSite,
    fold_nam,
    inject_nam,
    load_checkpoint,
    prune_channels,
    remove_nam,
    save_pruned,
)
from nam_lightning.fold import FoldedNAM

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class Interrupted(Exception):
    """The forced failure."""


# --- the model and what must survive --------------------------------------------------------


def resnet(nam: bool = False, spatial: bool = False) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    if nam:
        inject_nam(model, spatial=spatial, example_inputs=X if spatial else None)
    return randomise_bns(model)


# --- ways to fail partway -------------------------------------------------------------------


def fail_on_swap(
    monkeypatch: pytest.MonkeyPatch,
    is_swap: Callable[[nn.Module, str, Any], bool],
    at: int = 2,
    error: type[BaseException] = Interrupted,
) -> list[str]:
    """Make the ``at``-th module assignment that ``is_swap`` selects raise; returns the names
    of the assignments made, so a test can check that some happened before the failure."""
    original = nn.Module.__setattr__
    done: list[str] = []

    def setattr_(self: nn.Module, name: str, value: Any) -> None:
        if is_swap(self, name, value):
            if len(done) + 1 == at:
                raise error(f"forced failure at swap {at}")
            done.append(name)
        original(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", setattr_)
    return done


def fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, at: int = 2) -> list[int]:
    """Make the ``at``-th call of ``owner.name`` raise (the earlier ones run as usual)."""
    original = getattr(owner, name)
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == at:
            raise Interrupted(f"forced failure in {name}, call {at}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def swap_fails_then_works(
    monkeypatch: pytest.MonkeyPatch,
    model: nn.Module,
    operation: Callable[[nn.Module], Any],
    is_swap: Callable[[nn.Module, str, Any], bool],
    at: int,
) -> Any:
    """Run ``operation(model)`` with its ``at``-th swap failing: the swaps made before it are
    undone, and the model is as it was; then run it again, undisturbed, and return its result."""
    before = snapshot(model, X)
    done = fail_on_swap(monkeypatch, is_swap, at=at)
    with pytest.raises(Interrupted):
        operation(model)
    assert len(done) == at - 1
    monkeypatch.undo()
    assert_unchanged(model, before)
    return operation(model)


def putting_nam_in(module: nn.Module, name: str, value: Any) -> bool:
    return isinstance(value, NAMSite)


def taking_nam_out(module: nn.Module, name: str, value: Any) -> bool:
    return isinstance(module._modules.get(name), NAMSite) and not isinstance(value, NAMSite)


def putting_folded_in(module: nn.Module, name: str, value: Any) -> bool:
    return isinstance(value, nn.Module) and any(isinstance(m, FoldedNAM) for m in value.modules())


# --- inject_nam -----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_inject_failing_at_the_second_swap_restores_the_first(
    monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    model = resnet()
    before = snapshot(model, X)
    done = fail_on_swap(monkeypatch, putting_nam_in, at=2, error=error)
    with pytest.raises(error, match="swap 2"):
        inject_nam(model)
    assert done == ["bn2"]  # layer1.0.bn2 was already wrapped when the failure came
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert len(inject_nam(model)) == 8  # and it injects normally afterwards


def test_inject_failing_while_building_nam_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = resnet()
    before = snapshot(model, X)
    calls = fail_on_call(monkeypatch, nam_lightning.inject, "NAM", at=3)
    with pytest.raises(Interrupted):
        inject_nam(model)
    assert len(calls) == 3
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_inject_failing_during_the_shape_probe_changes_nothing() -> None:
    model = resnet()
    model.layer2.eval()  # mixed training flags must come back as they were
    before = snapshot(model, X)

    def fail(*args: Any) -> None:
        raise Interrupted("forward failed in layer3")

    handle = model.layer3.register_forward_hook(fail)
    before["hooks"]["layer3"] = hooks(model.layer3)
    with pytest.raises(ValueError, match=r"failed on `example_inputs`.*forward failed in layer3"):
        inject_nam(model, spatial=True, example_inputs=X)
    handle.remove()
    before["hooks"]["layer3"] = hooks(model.layer3)
    assert_unchanged(model, before)  # the probe's own hooks are gone, flags restored


def test_inject_failing_while_attaching_the_record_undoes_every_swap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = resnet()
    before = snapshot(model, X)
    # the state-dict hook is registered, the load hook then fails
    fail_on_call(monkeypatch, nn.Module, "register_load_state_dict_pre_hook", at=1)
    with pytest.raises(Interrupted):
        inject_nam(model)
    monkeypatch.undo()
    assert_unchanged(model, before)  # no NAM, and no half-attached hooks


# --- remove_nam -----------------------------------------------------------------------------


def test_remove_failing_at_the_third_site_puts_the_first_two_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = resnet(nam=True)
    assert swap_fails_then_works(monkeypatch, model, remove_nam, taking_nam_out, at=3) == 8


# --- fold_nam -------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
def test_fold_failing_at_the_second_swap_restores_the_first(
    monkeypatch: pytest.MonkeyPatch, spatial: bool
) -> None:
    model = resnet(nam=True, spatial=spatial).eval()
    assert swap_fails_then_works(monkeypatch, model, fold_nam, putting_folded_in, at=2) == 8


def test_fold_failing_while_folding_a_site_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = resnet(nam=True).eval()
    before = snapshot(model, X)
    fail_on_call(monkeypatch, nam_lightning.fold, "fold_site", at=5)
    with pytest.raises(Interrupted):
        fold_nam(model)
    monkeypatch.undo()
    assert_unchanged(model, before)


# --- NAMCallback's injection in setup -------------------------------------------------------


def fit(model: pl.LightningModule, callback: NAMCallback) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs())
    trainer.fit(model)
    return trainer


def test_callback_injection_failing_partway_leaves_the_module_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = Classifier()
    before = snapshot(model, X)
    done = fail_on_swap(monkeypatch, putting_nam_in, at=2)
    with pytest.raises(Interrupted):
        fit(model, NAMCallback(spatial=True))
    assert len(done) == 1
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_callback_injection_in_configure_model_failing_partway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = ConfigureModelClassifier()
    fail_on_swap(monkeypatch, putting_nam_in, at=2)
    with pytest.raises(Interrupted):
        fit(model, NAMCallback())
    monkeypatch.undo()
    assert "configure_model" not in vars(model)  # the callback's wrapper is gone
    assert model.net is not None  # built by the user's configure_model, which did run
    assert not any(isinstance(m, NAMSite) for m in model.modules())


def test_callback_refusing_targets_leaves_the_module_unchanged() -> None:
    # No affine backbone BatchNorm: targets="bn" has nothing to penalise. The check used to
    # run after NAM had been injected, leaving NAM in the refused module.
    model = Classifier()
    model.net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 10),
    )  # fmt: skip
    before = snapshot(model, X)
    with pytest.raises(ValueError, match="`targets='bn'` selects no BatchNorm scale factor"):
        fit(model, NAMCallback(targets="bn", sites=["net.0"]))
    assert_unchanged(model, before)


# --- load_checkpoint: the file is only read -------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pruned NAM model saved with save_pruned: loading it rebuilds NAM, then the pruning."""
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    inject_nam(model, spatial=True, example_inputs=x)
    randomise_bns(model)
    prune_channels(model, x, 0.4, measure=False)
    path = tmp_path_factory.mktemp("atomicity") / "tiny.pt"
    save_pruned(model, path, hyper_parameters={"num_classes": 10})
    return path


def file_state(path: Path) -> tuple[bytes, int, list[str]]:
    return path.read_bytes(), os.stat(path).st_mtime_ns, sorted(os.listdir(path.parent))


def failing_load_state_dict(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("size mismatch (forced)")


LOAD_FAILURES: dict[str, tuple[Callable[[pytest.MonkeyPatch], Any], str]] = {
    "second-nam-swap": (
        lambda mp: fail_on_swap(mp, putting_nam_in, at=2),
        r"Cannot rebuild Tiny as the record in '.*tiny\.pt' describes it.*forced failure",
    ),
    "replaying-the-pruning": (
        lambda mp: fail_on_call(mp, nam_lightning.checkpoint, "replay_pruning", at=1),
        r"Cannot rebuild Tiny .*tiny\.pt.*Interrupted: forced failure in replay_pruning",
    ),
    "loading-the-weights": (
        lambda mp: mp.setattr(nn.Module, "load_state_dict", failing_load_state_dict),
        r"The weights in '.*tiny\.pt' do not fit Tiny.*size mismatch \(forced\)",
    ),
}


@pytest.mark.parametrize("where", list(LOAD_FAILURES))
def test_load_checkpoint_failing_partway_leaves_the_file_alone(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    before = file_state(checkpoint)
    force, message = LOAD_FAILURES[where]
    force(monkeypatch)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(Tiny, checkpoint)
    monkeypatch.undo()
    assert file_state(checkpoint) == before
    load_checkpoint(Tiny, checkpoint)  # still loads


def test_load_checkpoint_of_a_truncated_copy_leaves_both_files_alone(
    checkpoint: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    before = file_state(truncated), file_state(checkpoint)
    with pytest.raises(ValueError, match=r"Cannot read '.*truncated\.pt' as a checkpoint"):
        load_checkpoint(Tiny, truncated)
    assert (file_state(truncated), file_state(checkpoint)) == before


# --- save_pruned: never a half-written file -------------------------------------------------


@pytest.mark.parametrize("existing", [True, False], ids=["over-a-file", "new-file"])
@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
def test_save_pruned_failing_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool, where: str
) -> None:
    # (test_checkpoint.py covers an OSError inside torch.save over an existing file)
    path = tmp_path / "model.pt"
    if existing:
        path.write_bytes(b"the previous checkpoint")
    model = Tiny()
    original_save = torch.save

    def half_save(obj: Any, f: Any) -> None:
        original_save(obj, f)
        with open(f, "r+b") as handle:
            handle.truncate(10)
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError("rename failed")

    if where == "torch.save":
        monkeypatch.setattr(torch, "save", half_save)
        error: type[BaseException] = KeyboardInterrupt
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
        error = OSError
    with pytest.raises(error):
        save_pruned(model, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == (["model.pt"] if existing else [])
    if existing:
        assert path.read_bytes() == b"the previous checkpoint"


def test_save_pruned_does_not_touch_the_model(tmp_path: Path) -> None:
    model = resnet(nam=True)
    before = snapshot(model, X)
    save_pruned(model, tmp_path / "m.pt")
    assert_unchanged(model, before)
