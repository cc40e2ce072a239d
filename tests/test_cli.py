"""The ``nam-lightning`` command line (nam_lightning.cli), run in-process with tiny settings.

Every command runs on the CPU for one epoch of two batches (digits: 8x8 images; FakeData:
16x16), so the whole file stays fast. Note that LightningCLI reads ``--trainer.limit_*_batches
1`` as the float 1.0, i.e. *all* batches (the Trainer declares ``Union[float, int]``), so the
limits here are 2, which Lightning turns into two batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from cli_helpers import (
    AMOUNT,
    DIGITS,
    STAGES,
    TINY,
    assert_run_artifacts,
    cli,
    files_under,
    read_csv,
    tensors,
    usage_error,
)

from nam_lightning import load_checkpoint
from nam_lightning.models import ImageClassifier
from nam_lightning.pipeline import render_markdown

FAKE = [
    "--data=nam_lightning.data.FakeDataModule",
    "--data.num_samples=32",
    "--data.image_size=16",
    "--data.batch_size=8",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_shared_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the CLI caches about a default run directory is dropped after each test."""
    monkeypatch.setenv("NAM_LIGHTNING_RUN_DIR", "unused")
    monkeypatch.delenv("NAM_LIGHTNING_RUN_DIR")


def printed_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``--print_config`` prints the YAML and exits with status 0."""
    capsys.readouterr()
    try:
        cli(*args, "--print_config")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    else:
        pytest.fail("--print_config did not exit")
    config = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(config, dict)
    return config


def snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files_under(path)
    }


def checkpoints_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*.ckpt"))


def training_checkpoint(path: Path) -> Path:
    """The one checkpoint ``fit`` trained under ``path``; ``fit`` prunes at the end and saves
    that model beside it as ``pruned.ckpt``."""
    (checkpoint,) = [c for c in checkpoints_under(path) if not c.name.startswith("pruned")]
    assert (checkpoint.parent / "pruned.ckpt").is_file()
    return checkpoint


# --- run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ``run`` with no data option (digits), some options set from a YAML file."""
    tmp = tmp_path_factory.mktemp("digits_run")
    config = tmp / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {"max_epochs": 1},
                "pruning": {"amount": 0.3, "flops_target": None},
                "finetune_epochs": 1,
            }
        )
    )
    run_dir = tmp / "run"
    cli("run", f"--config={config}", *TINY[1:], *DIGITS, f"--run_dir={run_dir}")
    return run_dir


def test_run_on_digits_writes_every_artifact(digits_run: Path) -> None:
    assert_run_artifacts(digits_run, num_classes=10)


def test_run_without_data_option_uses_digits(
    digits_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = printed_config(capsys, "run")
    assert config["data"]["class_path"] == "nam_lightning.data.DigitsDataModule"
    assert config["model"]["backbone"] == "small_resnet"
    # the tiny run above got digits: 8x8 grey images, 10 classes
    report = json.loads((digits_run / "report.json").read_text())
    assert report["batch_shape"][1:] == [1, 8, 8]
    hparams = torch.load(digits_run / "pruned.ckpt", weights_only=True)["hyper_parameters"]
    assert (hparams["in_channels"], hparams["num_classes"]) == (1, 10)
    assert hparams["backbone"] == "small_resnet"


def test_config_file_took_effect_in_the_run(digits_run: Path) -> None:
    report = json.loads((digits_run / "report.json").read_text())
    assert report["pruning"]["amount"] == pytest.approx(0.3)
    assert report["pruning"]["flops_target"] is None
    for stage in ("train", "finetune"):  # trainer.max_epochs / finetune_epochs: one epoch each
        rows = read_csv(digits_run / stage / "metrics.csv")
        epochs = {r["epoch"] for r in rows if r["train/loss"] or r["val/acc"]}
        assert epochs == {"0"}, stage


def test_run_on_fakedata_writes_every_artifact(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cli("run", *TINY, *FAKE, *AMOUNT, "--finetune_epochs=1", f"--run_dir={run_dir}")
    report = assert_run_artifacts(run_dir, num_classes=10)
    assert report["batch_shape"] == [8, 3, 16, 16]


def test_runs_in_two_directories_do_not_interfere(digits_run: Path, tmp_path: Path) -> None:
    before = snapshot(digits_run)
    other = tmp_path / "other"
    cli(
        "run",
        *TINY,
        *DIGITS,
        *AMOUNT,
        "--finetune_epochs=1",
        "--seed_everything=1",
        "--data.seed=1",
        "--export=false",
        f"--run_dir={other}",
    )
    assert (other / "report.md").is_file() and (other / "finetuned.ckpt").is_file()
    assert not list(other.glob("model.*"))  # nothing exported when not asked for
    assert json.loads((other / "report.json").read_text())["export"] == "none (export=false)"
    assert snapshot(digits_run) == before
    first = tensors(torch.load(digits_run / "finetuned.ckpt", weights_only=True)["state_dict"])
    second = tensors(torch.load(other / "finetuned.ckpt", weights_only=True)["state_dict"])
    assert any(not torch.equal(v, second[k]) for k, v in first.items() if k in second)
    # a third run into the first directory is refused and changes nothing there
    message = usage_error(
        "run", *TINY, *DIGITS, *AMOUNT, "--finetune_epochs=1", f"--run_dir={digits_run}"
    )
    assert "--overwrite" in message
    assert snapshot(digits_run) == before


def test_report_when_pruning_removed_nothing() -> None:
    """``nam-lightning run --model.lr 0 --pruning.amount 0.3 --pruning.flops_target null``
    (all gammas stay 1, so no channel is removed and the threshold is None) crashes here."""
    summary = {
        "stages": [
            {"name": n, "test_acc": 0.1, "params": 10, "flops": 100, "latency_ms": 1.0}
            for n in STAGES
        ],
        "flops_reduction": 1.0,
        "params_reduction": 1.0,
        "speedup": 1.0,
        "pruning": {"threshold": None, "removed_channels": 0},
        "batch_shape": [16, 1, 8, 8],
    }
    markdown = render_markdown(summary)
    assert "| fine-tuned |" in markdown and "removed 0 channels" in markdown
    assert "latency 1.00x lower" in markdown
    # a pruned model that came out slower says so, instead of "0.80x lower"
    assert "latency 1.25x higher" in render_markdown({**summary, "speedup": 0.8})


# --- fit, prune, finetune, validate, test ----------------------------------------------------


@pytest.fixture(scope="module")
def fit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    cli("fit", *TINY, *DIGITS, f"--trainer.default_root_dir={root}")
    return training_checkpoint(root)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory, fit_checkpoint: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("prune") / "run"
    cli("prune", *TINY, *DIGITS, *AMOUNT, f"--ckpt_path={fit_checkpoint}", f"--run_dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory: pytest.TempPathFactory, pruned_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    cli(
        "finetune",
        *TINY,
        *DIGITS,
        f"--ckpt_path={pruned_dir / 'pruned.ckpt'}",
        f"--run_dir={run_dir}",
    )
    return run_dir


def test_fit_writes_a_checkpoint_with_nam(fit_checkpoint: Path) -> None:
    checkpoint = torch.load(fit_checkpoint, weights_only=True)
    nam_keys = [k for k in checkpoint["state_dict"] if "nam.channel.bn.weight" in k]
    assert len(nam_keys) == 3  # one NAM site per block of small_resnet
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 2
    assert (fit_checkpoint.parents[1] / "config.yaml").is_file()  # LightningCLI's own
    model = load_checkpoint(ImageClassifier, fit_checkpoint).eval()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_prune_writes_a_smaller_checkpoint_and_a_report(
    pruned_dir: Path, fit_checkpoint: Path
) -> None:
    report = json.loads((pruned_dir / "prune_report.json").read_text())
    assert report["flops_after"] < report["flops_before"]
    assert report["params_after"] < report["params_before"]
    assert report["amount"] == pytest.approx(0.3)
    pruned = load_checkpoint(ImageClassifier, pruned_dir / "pruned.ckpt").eval()
    trained = load_checkpoint(ImageClassifier, fit_checkpoint)
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]
    assert sum(p.numel() for p in trained.parameters()) == report["params_before"]
    assert pruned(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert not checkpoints_under(pruned_dir / "prune")  # pruning trains nothing


def test_finetune_writes_a_finetuned_checkpoint(finetuned_dir: Path, pruned_dir: Path) -> None:
    pruned = load_checkpoint(ImageClassifier, pruned_dir / "pruned.ckpt").eval()
    tuned = load_checkpoint(ImageClassifier, finetuned_dir / "finetuned.ckpt").eval()
    assert tuned(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    before, after = tensors(pruned.state_dict()), tensors(tuned.state_dict())
    assert before.keys() == after.keys()
    assert all(before[k].shape == v.shape for k, v in after.items())
    assert any(v.is_floating_point() and not torch.equal(v, after[k]) for k, v in before.items())
    rows = read_csv(finetuned_dir / "finetune" / "metrics.csv")
    assert any(r.get("test/acc") for r in rows)  # finetune tests at the end
    assert not [c for c in rows[0] if c.startswith("nam/")]


def test_finetune_honours_max_epochs(finetuned_dir: Path) -> None:
    """``finetune --trainer.max_epochs 1`` trains one epoch (it used to train 15)."""
    rows = read_csv(finetuned_dir / "finetune" / "metrics.csv")
    assert {r["epoch"] for r in rows if r["train/loss"] or r["val/acc"]} == {"0"}


@pytest.mark.parametrize(
    ("command", "with_checkpoint"), [("validate", True), ("test", False), ("test", True)]
)
def test_validate_and_test_print_metrics(
    command: str,
    with_checkpoint: bool,
    fit_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [*TINY, *DIGITS, f"--trainer.default_root_dir={tmp_path}"]
    if with_checkpoint:
        args.append(f"--ckpt_path={fit_checkpoint}")
    cli(command, *args)
    out = capsys.readouterr().out
    metrics = ["val/acc", "val/loss"] if command == "validate" else ["test/acc"]
    for metric in metrics:
        assert metric in out
    assert not checkpoints_under(tmp_path)  # nothing was trained


def test_predict_runs(fit_checkpoint: Path, tmp_path: Path) -> None:
    cli(
        "predict",
        *TINY,
        *DIGITS,
        "--trainer.limit_predict_batches=2",
        f"--ckpt_path={fit_checkpoint}",
        f"--trainer.default_root_dir={tmp_path}",
    )


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "fit"])
def test_print_config_has_nam_and_pruning_sections(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = printed_config(capsys, command)
    nam, pruning = config["nam"], config["pruning"]
    assert nam["lambda_"] == "auto" or nam["lambda_"] > 0
    assert nam["targets"] in ("nam", "bn", "all")
    assert {"sites", "spatial", "detach_weights", "sparsity_threshold", "log_on"} <= set(nam)
    assert {"amount", "flops_target", "importance", "scope", "max_layer_amount", "round_to"} <= set(
        pruning
    )
    # the defaults are a valid pruning configuration: exactly one target
    assert (pruning["amount"] is None) != (pruning["flops_target"] is None)
    assert config["data"]["class_path"] == "nam_lightning.data.DigitsDataModule"
    assert config["model"]["backbone"] == "small_resnet"
    if command == "run":
        assert config["finetune_epochs"] >= 1
        assert config["run_dir"] is None and config["overwrite"] is False


def test_config_file_sets_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {"max_epochs": 3},
                "model": {"backbone": "resnet18", "cifar_stem": True},
                "nam": {"lambda_": 5e-5, "targets": "bn"},
                "pruning": {"amount": 0.25, "flops_target": None, "scope": "local"},
                "finetune_epochs": 2,
            }
        )
    )
    config = printed_config(capsys, "run", f"--config={path}")
    assert config["trainer"]["max_epochs"] == 3
    assert config["model"]["backbone"] == "resnet18" and config["model"]["cifar_stem"] is True
    assert config["nam"] == {**config["nam"], "lambda_": 5e-5, "targets": "bn"}
    assert config["pruning"]["amount"] == 0.25 and config["pruning"]["flops_target"] is None
    assert config["pruning"]["scope"] == "local"
    assert config["finetune_epochs"] == 2
    # the command line overrides the file when it comes after it
    config = printed_config(capsys, "run", f"--config={path}", "--trainer.max_epochs=4")
    assert config["trainer"]["max_epochs"] == 4


@pytest.mark.parametrize("data", ["FakeDataModule", "ImageFolderDataModule", "CIFARDataModule"])
def test_every_data_module_can_be_chosen(data: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--data.root=somewhere"] if data == "ImageFolderDataModule" else []
    config = printed_config(capsys, "run", f"--data=nam_lightning.data.{data}", *extra)
    assert config["data"]["class_path"] == f"nam_lightning.data.{data}"


# --- data options ----------------------------------------------------------------------------


def write_image_folder(root: Path) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.png")
    return root


def test_fit_on_an_image_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images")
    cli(
        "fit",
        *TINY,
        "--data=nam_lightning.data.ImageFolderDataModule",
        f"--data.root={root}",
        "--data.image_size=16",
        "--data.batch_size=4",
        "--data.num_workers=0",
        f"--trainer.default_root_dir={tmp_path / 'out'}",
    )
    path = training_checkpoint(tmp_path / "out")
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert (hparams["num_classes"], hparams["in_channels"]) == (2, 3)
    model = load_checkpoint(ImageClassifier, path).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 2)


def test_cifar_without_files_fails_clearly(tmp_path: Path) -> None:
    """No internet here: only the error path (no files under --data.root) is tested."""
    root, run_dir = tmp_path / "cifar", tmp_path / "run"
    root.mkdir()
    # raised when the data module is built (before training); jsonargparse may quote it in a
    # ValueError ("Does not validate against any of the Union subtypes")
    message = usage_error(
        "run",
        *TINY,
        "--data=nam_lightning.data.CIFARDataModule",
        f"--data.root={root}",
        "--data.num_workers=0",
        f"--run_dir={run_dir}",
    )
    assert str(root) in message and "cifar-10-batches-py" in message
    assert "--data.download=true" in message
    assert not run_dir.exists() and not files_under(root)


def test_missing_image_folder_fails_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # jsonargparse may wrap the data module's FileNotFoundError in a ValueError ("Does not
    # validate against any of the Union subtypes") that quotes it: the message is what counts
    message = usage_error(
        "run",
        *TINY,
        "--data=nam_lightning.data.ImageFolderDataModule",
        f"--data.root={tmp_path / 'nowhere'}",
        f"--run_dir={run_dir}",
    )
    assert "must hold the folders 'train' and 'val'" in message
    assert str(tmp_path / "nowhere") in message
    assert not run_dir.exists()  # not even an empty directory


# --- model options ---------------------------------------------------------------------------


def test_small_resnet_is_the_default_model(fit_checkpoint: Path) -> None:
    hparams = torch.load(fit_checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["backbone"] == "small_resnet"


@pytest.mark.parametrize(
    ("options", "sites"),
    [
        (["--model.backbone=resnet18", "--model.cifar_stem=true"], 8),  # one per BasicBlock
        (["--model.backbone=mobilenet_v2"], 17),  # one per InvertedResidual
    ],
)
def test_fit_with_a_torchvision_model(options: list[str], sites: int, tmp_path: Path) -> None:
    cli("fit", *TINY, *DIGITS, *options, f"--trainer.default_root_dir={tmp_path}")
    path = training_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["backbone"] == options[0].split("=")[1]
    nam_keys = [k for k in checkpoint["state_dict"] if "nam.channel.bn.weight" in k]
    assert len(nam_keys) == sites
    model = load_checkpoint(ImageClassifier, path).eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# --- bad options: each fails before any training ---------------------------------------------


@pytest.mark.parametrize("command", ["run", "fit"])
def test_unknown_model(command: str, tmp_path: Path) -> None:
    where = (
        f"--run_dir={tmp_path / 'run'}"
        if command == "run"
        else f"--trainer.default_root_dir={tmp_path / 'run'}"
    )
    message = usage_error(command, *TINY, "--model.backbone=not_a_model", where)
    assert "not_a_model" in message
    for valid in ("small_resnet", "resnet18", "mobilenet_v2"):
        assert valid in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (["--pruning.flops_target=1.5"], ["`flops_target`"]),
        (["--pruning.flops_target=0"], ["`flops_target`"]),
        (["--pruning.amount=0", "--pruning.flops_target=null"], ["`amount`"]),
        (["--pruning.amount=1.5", "--pruning.flops_target=null"], ["`amount`"]),
        (["--pruning.amount=0.3", "--pruning.flops_target=0.5"], ["`amount`", "`flops_target`"]),
        (["--pruning.flops_target=null"], ["`amount`", "`flops_target`"]),  # neither set
        (["--pruning.max_layer_amount=1"], ["`max_layer_amount`"]),
        (["--pruning.round_to=0"], ["`round_to`"]),
    ],
)
def test_impossible_pruning_target(options: list[str], names: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    message = usage_error("run", *TINY, *options, f"--run_dir={run_dir}")
    for name in names:
        assert name in message
    assert not run_dir.exists()  # not even an empty directory


def test_impossible_pruning_target_for_prune(fit_checkpoint: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    message = usage_error(
        "prune",
        *TINY,
        "--pruning.flops_target=1.5",
        f"--ckpt_path={fit_checkpoint}",
        f"--run_dir={run_dir}",
    )
    assert "`flops_target`" in message
    assert not run_dir.exists()  # not even an empty directory


@pytest.mark.parametrize(
    ("command", "options", "match"),
    [
        ("run", ["--finetune_epochs=0"], "--finetune_epochs must be a positive int"),
        ("run", ["--finetune_epochs=-1"], "got -1"),
        ("prune", ["--ckpt_path=missing.ckpt"], "--ckpt_path missing.ckpt"),
        ("finetune", ["--ckpt_path=missing.ckpt"], "no such file"),
    ],
)
def test_bad_stage_option_fails_before_the_run_dir_is_made(
    command: str, options: list[str], match: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    assert match in usage_error(command, *TINY, *options, f"--run_dir={run_dir}")
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (["--nam.lambda_=-1"], "`lambda_`"),
        (["--nam.sparsity_threshold=0"], "`sparsity_threshold`"),
    ],
)
@pytest.mark.parametrize("command", ["run", "fit"])
def test_bad_nam_option(command: str, options: list[str], name: str, tmp_path: Path) -> None:
    where = (
        f"--run_dir={tmp_path / 'run'}"
        if command == "run"
        else f"--trainer.default_root_dir={tmp_path / 'run'}"
    )
    assert name in usage_error(command, *TINY, *options, where)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("--nam.lambda_=abc", "nam.lambda_"),
        ("--nam.lambda_=inf", "nam.lambda_"),
        ("--nam.targets=everything", "nam.targets"),
        ("--nam.log_on=never", "nam.log_on"),
        ("--pruning.importance=xyz", "pruning.importance"),
        ("--pruning.amount=lots", "pruning.amount"),
    ],
)
def test_badly_typed_option_is_a_usage_error(option: str, key: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    message = usage_error("run", *TINY, option, f"--run_dir={run_dir}")
    assert key in message and option.split("=")[1] in message
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["run", "prune", "finetune"])
def test_existing_run_dir_needs_overwrite(
    command: str, fit_checkpoint: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.json").write_text("{}")
    before = snapshot(run_dir)
    extra = [] if command == "run" else [f"--ckpt_path={fit_checkpoint}"]
    message = usage_error(command, *TINY, *extra, f"--run_dir={run_dir}")
    assert str(run_dir) in message and "--overwrite" in message
    assert snapshot(run_dir) == before


def test_run_dir_that_is_a_file_is_refused_untouched(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory\n")
    message = usage_error("run", *TINY, *DIGITS, *AMOUNT, f"--run_dir={run_dir}")
    assert re.search(r"--run_dir .*a file is in the way", message)
    assert run_dir.read_text() == "not a directory\n"


def test_run_that_loses_the_race_for_a_new_run_dir_writes_nothing(tmp_path: Path) -> None:
    """Two runs started together into one new directory both find it empty; the one that
    creates config.yaml second stops before writing anything."""
    import nam_lightning.cli

    run_dir = tmp_path / "run"
    check = nam_lightning.cli.check_run_dir

    def check_then_lose_the_race(path: Any, overwrite: bool) -> Path:
        checked = check(path, overwrite)
        Path(path).mkdir(parents=True)  # the other run claims it meanwhile
        (Path(path) / "config.yaml").write_text("the other run\n")
        return checked

    with mock.patch("nam_lightning.cli.check_run_dir", check_then_lose_the_race):
        message = usage_error("run", *TINY, *DIGITS, *AMOUNT, f"--run_dir={run_dir}")
    assert "--overwrite" in message
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]
    assert (run_dir / "config.yaml").read_text() == "the other run\n"


def test_existing_run_dir_with_overwrite_proceeds(fit_checkpoint: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "prune_report.json").write_text("{}")
    cli(
        "prune",
        *TINY,
        *DIGITS,
        *AMOUNT,
        f"--ckpt_path={fit_checkpoint}",
        f"--run_dir={run_dir}",
        "--overwrite=true",
    )
    assert json.loads((run_dir / "prune_report.json").read_text())["flops_after"] > 0
    assert load_checkpoint(ImageClassifier, run_dir / "pruned.ckpt") is not None


def test_empty_run_dir_is_fine(fit_checkpoint: Path, tmp_path: Path) -> None:
    """An existing but empty directory holds no run: no --overwrite needed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cli("prune", *TINY, *DIGITS, *AMOUNT, f"--ckpt_path={fit_checkpoint}", f"--run_dir={run_dir}")
    assert (run_dir / "pruned.ckpt").is_file()


def test_run_with_two_ddp_processes_writes_the_same_artifacts(tmp_path: Path) -> None:
    """`run --trainer.devices=2 --trainer.strategy=ddp --trainer.accelerator=cpu` (gloo).

    Its own process: Lightning's DDP launcher re-runs the command line for rank 1.
    """
    run_dir = tmp_path / "run"
    options = [o for o in TINY if not o.startswith(("--trainer.devices", "--trainer.accel"))]
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("nam-lightning")),
            "run",
            *options,
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.accelerator=cpu",
            "--finetune_epochs=1",
            f"--run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in (
        "report.json",
        "report.md",
        "config.yaml",
        "pruned.ckpt",
        "finetuned.ckpt",
        "gamma_hist.png",
        "channels.png",
        "accuracy.png",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "model.onnx").is_file() or (run_dir / "model.pt2").is_file()
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == STAGES
    assert report["stages"][1]["flops"] < report["stages"][0]["flops"]
    assert not list(tmp_path.glob("runs"))  # both ranks wrote to the one run directory


def test_debug_mode_raises_the_refused_option_with_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    with pytest.raises(argparse.ArgumentError, match="`lambda_` must be") as info:
        cli("run", *TINY, "--nam.lambda_=-1", f"--run_dir={tmp_path / 'run'}")
    assert isinstance(info.value.__cause__, ValueError)
    assert not (tmp_path / "run").exists()
