"""What the command-line tests share: tiny run options, running ``nam-lightning`` in this
process, and everything a finished ``run`` directory must hold."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import matplotlib.image
import pytest
import torch

from nam_lightning import load_checkpoint
from nam_lightning.cli import main
from nam_lightning.models import ImageClassifier

TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
]
DIGITS = ["--data.batch_size=16"]  # the default data module, smaller batches
AMOUNT = ["--pruning.amount=0.3", "--pruning.flops_target=null"]  # always reachable
STAGES = ["trained", "pruned", "fine-tuned"]
_HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))
_HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def cli(*args: str) -> None:
    """``nam-lightning *args``, in this process (pytest's own arguments hidden from it)."""
    with mock.patch.object(sys, "argv", ["nam-lightning"]):
        main(list(args))


def usage_error(*args: str) -> str:
    """``nam-lightning *args`` ends in a usage error (exit status 2, the usage, no traceback);
    returns its message."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as info:
        cli(*args)
    text = stderr.getvalue()
    assert info.value.code == 2, text
    assert text.startswith("usage: nam-lightning") and "Traceback" not in text, text
    return text.split("\nerror: ", 1)[1]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def tensors(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict (it also holds nam_lightning's architecture record)."""
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5_000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert float(image[..., :3].std()) > 0.01  # something is drawn


def _batch_for(shape: list[int], n: int = 5) -> torch.Tensor:
    return torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(1))


def _assert_export_matches(run_dir: Path, model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = model(x)
    if _HAS_ONNX:
        import onnxruntime

        path = run_dir / "model.onnx"
        assert path.is_file()
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        (got,) = session.run(None, {"images": x.numpy()})  # another batch size than exported
        got = torch.from_numpy(got)
    else:
        path = run_dir / "model.pt2"
        assert path.is_file()
        got = torch.export.load(str(path)).module()(x[:2])
        want = want[:2]
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4


def assert_run_artifacts(run_dir: Path, num_classes: int, exported: bool = True) -> dict[str, Any]:
    """Everything ``run`` promises in its run directory (the exported model if ``exported``);
    returns report.json."""
    report = json.loads((run_dir / "report.json").read_text())
    stages = report["stages"]
    assert [s["name"] for s in stages] == STAGES
    for s in stages:
        assert 0.0 <= s["test_acc"] <= 1.0
        assert isinstance(s["params"], int) and s["params"] > 0
        assert isinstance(s["flops"], int) and s["flops"] > 0
        assert s["latency_ms"] > 0
    trained, pruned, finetuned = stages
    assert pruned["flops"] < trained["flops"]
    assert pruned["params"] < trained["params"]
    assert (finetuned["flops"], finetuned["params"]) == (pruned["flops"], pruned["params"])
    assert report["flops_reduction"] == pytest.approx(trained["flops"] / finetuned["flops"])
    assert report["pruning"]["removed_channels"] > 0
    assert report["plots"] == ["gamma_hist.png", "channels.png", "accuracy.png"]

    markdown = (run_dir / "report.md").read_text()
    assert "| stage | test accuracy | params | FLOPs | latency (ms) |" in markdown
    for name in STAGES:
        assert f"| {name} |" in markdown

    x = _batch_for(report["batch_shape"])
    models = {}
    for name in ("pruned", "finetuned"):
        model = load_checkpoint(ImageClassifier, run_dir / f"{name}.ckpt").eval()
        assert model(x).shape == (len(x), num_classes)
        models[name] = model
    assert sum(p.numel() for p in models["pruned"].parameters()) == pruned["params"]
    before = tensors(models["pruned"].state_dict())
    after = tensors(models["finetuned"].state_dict())
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(v.is_floating_point() and not torch.equal(v, after[k]) for k, v in before.items()), (
        "fine-tuning changed no weight"
    )

    if exported:
        _assert_export_matches(run_dir, models["finetuned"], x)
        assert ("model.onnx" if _HAS_ONNX else "model.pt2") in report["export"]
    else:  # run --export=false
        assert report["export"] == "none (export=false)" and not list(run_dir.glob("model.*"))

    for name in ("gamma_hist.png", "channels.png", "accuracy.png"):
        _assert_png(run_dir / name)

    train_rows = read_csv(run_dir / "train" / "metrics.csv")
    finetune_rows = read_csv(run_dir / "finetune" / "metrics.csv")
    assert {"val/acc", "train/loss", "nam/sparsity"} <= set(train_rows[0])
    # the default lambda_="auto" logs its lambda, a fixed lambda_ its penalty
    assert {"nam/lambda"} <= set(train_rows[0]) or {"nam/l1_penalty"} <= set(train_rows[0])
    assert any(r["val/acc"] for r in train_rows) and any(r["val/acc"] for r in finetune_rows)
    assert {"val/acc", "train/loss"} <= set(finetune_rows[0])
    assert not [c for c in finetune_rows[0] if c.startswith("nam/")]  # no penalty when tuning
    if _HAS_TENSORBOARD:
        for stage in ("train", "finetune"):
            assert list((run_dir / stage).rglob("events.out.tfevents.*")), stage
    return report
