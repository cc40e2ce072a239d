"""The whole job behind ``nam-lightning run``: train with NAM -> prune -> fine-tune -> report.

Every stage is measured the same way (held-out test accuracy, parameters, FLOPs, latency on one
batch), and the run directory receives ``report.json``, ``report.md``, the pruned and fine-tuned
checkpoints, an exported model and PNG plots.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from .attention import NAMSite
from .callback import NAMCallback
from .checkpoint import load_checkpoint
from .fold import fold_nam
from .models import ImageClassifier
from .report import PruneReport, count_flops, count_params, measure_latencies
from .sparsity import scale_factors


@dataclass
class Stage:
    """One row of the report."""

    name: str
    test_acc: float
    params: int
    flops: int
    latency_ms: float


def check_run_dir(run_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse to write into a run directory that already has artifacts, unless told to.
    Creates nothing: an option refused after this check leaves no directory behind."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--run_dir {path}: a file is in the way, not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise _taken(path)
    return path


def claim_run_dir(run_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Take the run directory for this run: create its ``config.yaml``, atomically.

    :func:`check_run_dir` runs before the options are turned into objects, this after; two runs
    started together into one new directory both pass the check, and only one of them can
    create the file (``O_EXCL``), so the other stops before writing anything.
    """
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / "config.yaml"
    if not overwrite:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise _taken(path.parent) from None
    return path


def _change(speedup: float) -> str:
    return f"{speedup:.2f}x lower" if speedup >= 1 else f"{1 / speedup:.2f}x higher"


def _taken(path: Path) -> FileExistsError:
    return FileExistsError(
        f"`run_dir` {str(path)!r} already holds a run; pick another directory or pass "
        "--overwrite=true to replace its artifacts."
    )


def example_batch(datamodule: pl.LightningDataModule, size: int = 32) -> torch.Tensor:
    """Up to ``size`` test images: the batch used for FLOPs, latency and tracing."""
    datamodule.setup("test")
    x, _ = next(iter(datamodule.test_dataloader()))
    return x[:size]


def measure_stage(
    name: str, trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, batch: torch.Tensor
) -> tuple[Stage, nn.Module]:
    """A stage's row (its latency is filled in later) and a CPU copy of its model to time."""
    result = trainer.test(model, datamodule=datamodule, verbose=False)
    acc = float(result[0]["test/acc"]) if result else math.nan
    model.cpu()
    stage = Stage(
        name=name,
        test_acc=acc,
        params=count_params(model),
        flops=count_flops(model, batch),
        latency_ms=math.nan,
    )
    return stage, copy.deepcopy(model)


def time_side_by_side(
    models: list[nn.Module], batch: torch.Tensor, seconds: float = 1.0
) -> list[float]:
    """Median forward time of each model in milliseconds, the models taking turns.

    Each gets about ``seconds`` of passes (10 to 200, after a warm-up pass), so a model of a
    few milliseconds rises above the noise of a shared machine, and a slow spell of the
    machine hits all of them alike.
    """
    once = max(measure_latencies(models, batch, repeats=1))
    rounds = max(10, min(200, int(seconds / once)))
    return [1e3 * t for t in measure_latencies(models, batch, rounds)]


def run_pipeline(
    model: ImageClassifier,
    datamodule: pl.LightningDataModule,
    make_trainer: Callable[[str, bool], pl.Trainer],
    finetune_lr: float,
    run_dir: Path,
    export: bool = True,
) -> dict[str, Any]:
    """Train with sparsity, prune, fine-tune; measure each stage and write the artifacts (with
    ``export``, the fine-tuned model as ONNX too).

    ``make_trainer(stage, sparsity)`` builds the Trainer of a stage: ``"train"`` with a
    :class:`~nam_lightning.NAMCallback` that prunes when training ends (its ``prune``), and
    ``"finetune"`` without the penalty. Fine-tuning starts at ``finetune_lr`` with no warm-up.
    """
    batch = example_batch(datamodule)
    gammas_init = _backbone_gammas(model)  # before NAM is injected: the backbone's own
    trainer = make_trainer("train", True)
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    nam = next(c for c in callbacks if isinstance(c, NAMCallback))
    callbacks.insert(callbacks.index(nam), SaveTrained(run_dir / "trained.ckpt"))
    trainer.fit(model, datamodule=datamodule)
    assert nam.report is not None and nam.pruned_path is not None
    report = nam.report
    trained = load_checkpoint(type(model), run_dir / "trained.ckpt")
    measured = [measure_stage("trained", trainer, trained, datamodule, batch)]
    gammas_trained = _backbone_gammas(trained)
    measured.append(measure_stage("pruned", trainer, model, datamodule, batch))
    digests = rank_digests(trainer, model)
    if trainer.is_global_zero:
        shutil.copyfile(nam.pruned_path, run_dir / "pruned.ckpt")

    model.finetuning(finetune_lr)
    finetuner = make_trainer("finetune", False)
    finetuner.fit(model, datamodule=datamodule)
    measured.append(measure_stage("fine-tuned", finetuner, model, datamodule, batch))
    finetuner.save_checkpoint(run_dir / "finetuned.ckpt", weights_only=True)

    stages = [stage for stage, _ in measured]
    latencies = time_side_by_side([clone for _, clone in measured], batch)
    for stage, latency in zip(stages, latencies, strict=True):
        stage.latency_ms = latency

    summary: dict[str, Any] = {
        "stages": [asdict(s) for s in stages],
        "flops_reduction": stages[0].flops / stages[-1].flops,
        "params_reduction": stages[0].params / stages[-1].params,
        "speedup": stages[0].latency_ms / stages[-1].latency_ms,
        "pruning": report.to_dict(),
        "lambda": nam.lambda_,
        "pruned_sha256_per_rank": digests,
        "batch_shape": list(batch.shape),
    }
    if trainer.is_global_zero:
        exported = _export_model(model, batch, run_dir) if export else "none (export=false)"
        summary["export"] = exported
        summary["plots"] = _write_plots(
            run_dir, gammas_init, gammas_trained, report, _metrics_files(run_dir)
        )
        (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
        (run_dir / "report.md").write_text(render_markdown(summary))
    return summary


class SaveTrained(Callback):
    """Saves the trained model (weights-only) when training ends, before the
    :class:`~nam_lightning.NAMCallback` after it in the list prunes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=True)


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s parameters: each one's name, dtype, shape and bytes, in name order.

    Buffers are left out: without SyncBatchNorm (CPU DDP) every rank keeps its own BatchNorm
    running statistics, while the parameters, and so the architecture, are the same everywhere.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        values = param.detach().cpu().contiguous().flatten()
        digest.update(f"{name} {values.dtype} {tuple(param.shape)}\n".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rank_digests(trainer: pl.Trainer, model: nn.Module) -> list[str]:
    """:func:`parameter_digest` of ``model`` on every rank, in rank order (one entry without
    DDP). Raises on every rank when they differ: the ranks no longer hold one model, and
    nothing is saved."""
    mine = torch.frombuffer(bytearray.fromhex(parameter_digest(model)), dtype=torch.uint8)
    gathered = trainer.strategy.all_gather(mine.to(trainer.strategy.root_device))
    digests = [bytes(row.tolist()).hex() for row in gathered.cpu().view(-1, mine.numel())]
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"The {len(digests)} ranks hold different pruned models (parameter SHA-256 per "
            f"rank: {digests}): they pruned different channels; nothing was saved."
        )
    return digests


def render_markdown(summary: dict[str, Any]) -> str:
    """The one-screen summary: a table of the stages and the headline ratios."""
    lines = [
        "| stage | test accuracy | params | FLOPs | latency (ms) |",
        "|---|---|---|---|---|",
    ]
    for s in summary["stages"]:
        lines.append(
            f"| {s['name']} | {100 * s['test_acc']:.2f}% | {s['params']:,} | {s['flops']:,} "
            f"| {s['latency_ms']:.2f} |"
        )
    batch = "x".join(map(str, summary["batch_shape"]))
    lines += [
        "",
        f"FLOPs {summary['flops_reduction']:.2f}x fewer, parameters "
        f"{summary['params_reduction']:.2f}x fewer, latency {_change(summary['speedup'])} "
        f"(batch {batch}, CPU, eval mode, the three models timed in turns).",
        f"Pruning threshold (|gamma|): {_fmt(summary['pruning']['threshold'])}; removed "
        f"{summary['pruning']['removed_channels']} channels; final lambda "
        f"{_fmt(summary.get('lambda'))}.",
    ]
    if "export" in summary:
        lines.append(f"Exported: {summary['export']}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``model`` (whose ``forward`` takes ``x``) as ONNX at ``path``: input ``images`` of any
    batch size, output ``logits``; needs the ``onnx`` and ``onnxscript`` packages."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamo=True,
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        verbose=False,
    )


def _export_model(model: nn.Module, batch: torch.Tensor, run_dir: Path) -> str:
    """ONNX (checked against PyTorch with onnxruntime when installed), else ``torch.export``;
    NAM folded (:func:`~nam_lightning.fold_nam`), the form a runtime fuses."""
    reference = model.cpu().eval()
    model = copy.deepcopy(reference)
    if any(isinstance(m, NAMSite) for m in model.modules()):
        fold_nam(model)
    example = batch[:2]
    path = run_dir / "model.onnx"
    try:
        export_onnx(model, example, path)
    except Exception:  # no onnx/onnxscript installed: the torch.export program instead
        if path.exists():
            path.unlink()
        program = torch.export.export(model, (example,))
        torch.export.save(program, run_dir / "model.pt2")
        return "model.pt2 (torch.export)"
    try:
        import onnxruntime
    except ImportError:
        return "model.onnx (not checked: onnxruntime is not installed)"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        want = reference(batch)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
    return "model.onnx (outputs match PyTorch under onnxruntime)"


def _backbone_gammas(model: nn.Module) -> torch.Tensor:
    return torch.cat([g.detach().abs().flatten().cpu() for g in scale_factors(model, "bn")])


def _metrics_files(run_dir: Path) -> dict[str, Path | None]:
    return {
        stage: next(iter(sorted((run_dir / stage).rglob("metrics.csv"))), None)
        for stage in ("train", "finetune")
        if (run_dir / stage).exists()
    }


def _write_plots(
    run_dir: Path,
    gammas_init: torch.Tensor,
    gammas_trained: torch.Tensor,
    report: PruneReport,
    metrics: dict[str, Any],
) -> list[str]:
    """The |gamma| distribution, channels kept per layer, and accuracy over epochs, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    top = float(max(gammas_init.max(), gammas_trained.max()))
    bins = torch.linspace(0, top * 1.02, 60).tolist()
    ax.hist(gammas_init.tolist(), bins=bins, alpha=0.6, label="before sparsity training")
    ax.hist(gammas_trained.tolist(), bins=bins, alpha=0.6, label="after sparsity training")
    if report.threshold is not None:
        ax.axvline(report.threshold, color="red", linestyle="--", label="pruning threshold")
    ax.set_xlabel("|gamma| of backbone BatchNorm channels")
    ax.set_ylabel("channels")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("BatchNorm scale factors")
    fig.tight_layout()
    fig.savefig(run_dir / "gamma_hist.png", dpi=100)
    plt.close(fig)
    written.append("gamma_hist.png")

    names = [n for n in report.channels_before if n in report.channels_after]
    fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(names)), 4))
    xs = range(len(names))
    ax.bar(xs, [report.channels_before[n] for n in names], color="lightgray", label="before")
    ax.bar(xs, [report.channels_after[n] for n in names], color="tab:blue", label="kept")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Channels kept per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "channels.png", dpi=100)
    plt.close(fig)
    written.append("channels.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage, path in metrics.items():
        if path is None:
            continue
        epochs, accs = _read_metric(path, "val/acc")
        ax.plot([offset + e + 1 for e in epochs], accs, marker="o", ms=3, label=stage)
        offset += len(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy over epochs (train with sparsity, then fine-tune)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy.png", dpi=100)
    plt.close(fig)
    written.append("accuracy.png")
    return written


def _read_metric(path: Path, key: str) -> tuple[list[int], list[float]]:
    import csv

    epochs, values = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                epochs.append(int(row["epoch"]))
                values.append(float(row[key]))
    return epochs, values
