"""Saving a pruned model and loading it back (nam_lightning.checkpoint), in a fresh process.

The loads run in a new Python process, so nothing built while saving (modules, hooks, the
pruning record held on the model) can leak into the rebuilt model: it comes from the class,
the file, and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from helpers import Net, randomise_bns
from lightning_helpers import Classifier, tensors, trainer_kwargs

from nam_lightning import (
    NAMCallback,
    NAMSite,
    inject_nam,
    load_checkpoint,
    prune_channels,
    save_pruned,
)

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_net(
    passes: tuple[float, ...] = (0.4,), spatial: bool = False
) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 32, 32)
    inject_nam(model, spatial=spatial, example_inputs=x)
    randomise_bns(model)
    for amount in passes:
        prune_channels(model, x, amount, measure=False)
    return model, x


# A job: (class name, checkpoint, input). The loader writes {job: (output, repr, training)}
# or {job: "ExceptionType: message"}.
LOADER = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from lightning_helpers import Classifier
from helpers import Net
from nam_lightning import load_checkpoint
jobs = json.load(open(sys.argv[2]))
results = {}
for name, (cls, path, inputs) in jobs.items():
    try:
        model = load_checkpoint({"Net": Net, "Classifier": Classifier}[cls], path)
        training = model.training
        model.eval()
        with torch.no_grad():
            results[name] = (model(torch.load(inputs)), repr(model), training)
    except Exception as err:
        results[name] = f"{type(err).__name__}: {err}"
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every checkpoint the round-trip tests load, with the outputs of the saved models."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    expected: dict[str, tuple[torch.Tensor, str]] = {}
    jobs: dict[str, tuple[str, str, str]] = {}

    for name, passes, spatial in (
        ("save_pruned", (0.4,), False),
        ("save_pruned_twice", (0.4, 0.3), False),
        ("save_pruned_spatial", (0.4,), True),
    ):
        model, x = pruned_net(passes, spatial)
        save_pruned(model, tmp / f"{name}.pt", hyper_parameters={"num_classes": 10})
        torch.save(x, tmp / f"{name}_x.pt")
        with torch.no_grad():
            expected[name] = (model.eval()(x), repr(model))
        jobs[name] = ("Net", str(tmp / f"{name}.pt"), str(tmp / f"{name}_x.pt"))

    pl.seed_everything(0, verbose=False)
    module = Classifier(lr=0.05)
    callback = NAMCallback(1e-2, prune=0.5)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_steps=2))
    trainer.fit(module)
    assert callback.report is not None and callback.report.removed_channels > 0
    trainer.save_checkpoint(tmp / "full.ckpt", weights_only=False)
    trainer.save_checkpoint(tmp / "weights.ckpt", weights_only=True)
    x = torch.randn(4, 3, 8, 8)
    torch.save(x, tmp / "lightning_x.pt")
    with torch.no_grad():
        output = module.eval()(x)
    for name in ("full", "weights"):
        expected[f"lightning_{name}"] = (output, repr(module))
        jobs[f"lightning_{name}"] = (
            "Classifier",
            str(tmp / f"{name}.ckpt"),
            str(tmp / "lightning_x.pt"),
        )

    (tmp / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [sys.executable, "-c", LOADER, str(TESTS_DIR), str(tmp / "jobs.json"), str(tmp / "out.pt")],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
        check=True,
        timeout=120,
    )
    loaded = torch.load(tmp / "out.pt", weights_only=True)
    return {"dir": tmp, "expected": expected, "loaded": loaded}


def check_round_trip(saved: dict[str, Any], name: str) -> None:
    loaded = saved["loaded"][name]
    assert not isinstance(loaded, str), loaded  # the fresh process's error
    output, structure, training = loaded
    expected_output, expected_structure = saved["expected"][name]
    assert structure == expected_structure  # same layers, same (pruned) widths
    assert torch.equal(output, expected_output)
    assert training  # like a freshly built module


@pytest.mark.parametrize("name", ["save_pruned", "save_pruned_twice", "save_pruned_spatial"])
def test_save_pruned_round_trip_in_fresh_process(saved: dict[str, Any], name: str) -> None:
    check_round_trip(saved, name)
    # plain containers only: loadable without trusting the file
    checkpoint = torch.load(saved["dir"] / f"{name}.pt", weights_only=True)
    assert checkpoint["hyper_parameters"] == {"num_classes": 10}
    record = checkpoint["state_dict"]["_nam_lightning"]
    assert len(record["pruning"]["passes"]) == (2 if name.endswith("twice") else 1)
    assert len(record["nam_sites"]) == 8


@pytest.mark.parametrize("kind", ["full", "weights"])
def test_lightning_checkpoint_round_trip_in_fresh_process(saved: dict[str, Any], kind: str) -> None:
    check_round_trip(saved, f"lightning_{kind}")


def test_load_checkpoint_in_process_matches_and_overrides(saved: dict[str, Any]) -> None:
    loaded = load_checkpoint(Classifier, saved["dir"] / "full.ckpt", lr=0.5)
    assert loaded.hparams.lr == 0.5
    x = torch.load(saved["dir"] / "lightning_x.pt")
    output, _ = saved["expected"]["lightning_full"]
    with torch.no_grad():  # as the expected output was computed (eval NAM: one-pass kernels)
        assert torch.equal(loaded.eval()(x), output)
    # the weights-only checkpoint holds the same weights
    weights = tensors(load_checkpoint(Classifier, saved["dir"] / "weights.ckpt"))
    full = tensors(loaded)
    assert weights.keys() == full.keys()
    assert all(torch.equal(weights[k], full[k]) for k in full)


def test_record_written_before_the_fuse_flag_loads(saved: dict[str, Any], tmp_path: Path) -> None:
    """Records of NAM sites written before NAMSite had ``fuse`` hold no "fuse" entry: those
    sites are built fused, as they ran then."""
    checkpoint = torch.load(saved["dir"] / "save_pruned.pt", weights_only=True)
    for spec in checkpoint["state_dict"]["_nam_lightning"]["nam_sites"].values():
        del spec["fuse"]
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = load_checkpoint(Net, tmp_path / "old.pt").eval()
    assert all(m.fuse for m in loaded.modules() if isinstance(m, NAMSite))
    x = torch.load(saved["dir"] / "save_pruned_x.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), saved["expected"]["save_pruned"][0])


def test_plain_load_state_dict_points_to_load_checkpoint(saved: dict[str, Any]) -> None:
    state = torch.load(saved["dir"] / "save_pruned.pt", weights_only=True)["state_dict"]
    fresh = Net()
    inject_nam(fresh)  # NAM sites match; the pruning does not
    with pytest.raises(RuntimeError, match=r"pruned 1 time\(s\).*nam_lightning\.load_checkpoint"):
        fresh.load_state_dict(state)


def test_truncated_file_cannot_be_read(saved: dict[str, Any], tmp_path: Path) -> None:
    data = (saved["dir"] / "save_pruned.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Cannot read .*truncated\.pt"):
        load_checkpoint(Net, path)


def test_foreign_file_has_no_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"x": 1}, path)
    with pytest.raises(ValueError, match="no 'state_dict'"):
        load_checkpoint(Net, path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_checkpoint(Net, tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (dict, r"`factory` must be a torch\.nn\.Module subclass or a callable .* class dict"),
        ("Net", r"`factory` must be .* got str 'Net'"),
        (lambda **kwargs: "a model", r"`factory` must return a torch\.nn\.Module, .* returned str"),
    ],
    ids=["class", "string", "returns-no-module"],
)
def test_a_factory_that_builds_no_module(saved: dict[str, Any], factory: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        load_checkpoint(factory, saved["dir"] / "save_pruned.pt")


def test_a_factory_function_builds_the_model(saved: dict[str, Any]) -> None:
    """Any callable returning a module: torchvision's resnet18 builder for the save_pruned file
    (the saved num_classes reach it), a function for the Lightning checkpoint."""
    loaded = load_checkpoint(torchvision.models.resnet18, saved["dir"] / "save_pruned.pt")
    x = torch.load(saved["dir"] / "save_pruned_x.pt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), saved["expected"]["save_pruned"][0])

    def make_classifier(**hyperparameters: Any) -> Classifier:
        return Classifier(**hyperparameters)

    loaded = load_checkpoint(make_classifier, saved["dir"] / "full.ckpt", lr=0.5)
    assert isinstance(loaded, Classifier) and loaded.hparams.lr == 0.5
    x = torch.load(saved["dir"] / "lightning_x.pt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), saved["expected"]["lightning_full"][0])


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = torchvision.models.resnet34(num_classes=10)
    inject_nam(other)
    randomise_bns(other)
    prune_channels(other, torch.randn(1, 3, 32, 32), 0.3, measure=False)
    save_pruned(other, tmp_path / "resnet34.pt")
    with pytest.raises(ValueError, match=r"NAM at 'layer1\.2\.bn2', which Net does not have"):
        load_checkpoint(Net, tmp_path / "resnet34.pt")


def test_save_pruned_never_leaves_a_half_written_file(
    saved: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes((saved["dir"] / "save_pruned.pt").read_bytes())
    before = path.read_bytes()
    model, _ = pruned_net((0.2,))

    def broken_save(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]
