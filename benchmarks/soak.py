"""Memory soak: thousands of training steps with NAMCallback, and the process's memory stays flat.

An ``ImageClassifier`` (``small_resnet``) trains on scikit-learn's digits with
``NAMCallback(lambda_=...)`` for ``--steps`` optimizer steps, as a real run does: small batches,
validation after every epoch, the penalty's metrics logged every step (written every 10 steps
to a CSV and, when installed, a TensorBoard logger), a checkpoint saved after every epoch. A
callback samples the process's resident memory (RSS; psutil when installed, else
``/proc/self/status``) after a warm-up and at evenly spaced steps up to the last, each time
right after a garbage collection, together with the number of objects Python tracks. Anything
kept per step (a growing list of metrics, tensors held by a hook, a graph never freed) would
show as steady growth over the run.

The script prints the samples, the first (after warm-up) and last RSS and their ratio, whether
every parameter and buffer is finite at the end, and the scale factors' statistics (sparsity).
It exits with status 1 when RSS grew by more than ``--max-growth`` percent after the warm-up or
when any parameter or buffer is NaN or inf.

Run from the repository root::

    python benchmarks/soak.py [--steps 3000] [--batch 16] [--lambda 1e-2] [--samples 7]
        [--warmup N] [--max-growth 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from itertools import chain
from typing import Any

import lightning.pytorch as pl
import torch
from common import parse_args
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger

from nam_lightning import scale_factors
from nam_lightning.callback import NAMCallback
from nam_lightning.data import DigitsDataModule
from nam_lightning.models import ImageClassifier
from nam_lightning.sparsity import Targets


def _rss_reader() -> tuple[str, Any]:
    """The best available reader of the current RSS in MiB, and its name."""
    try:
        import psutil

        process = psutil.Process()
        return "psutil", lambda: process.memory_info().rss / 2**20
    except ImportError:
        pass
    try:
        with open("/proc/self/status") as f:
            if any(line.startswith("VmRSS:") for line in f):
                return "/proc/self/status VmRSS", lambda: _proc_status_kib("VmRSS") / 1024
    except OSError:
        pass
    import resource

    # Peak, not current RSS, but steady growth still shows as a growing peak.
    unit = 2**20 if sys.platform == "darwin" else 2**10
    return (
        "resource ru_maxrss (peak)",
        lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20,
    )


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


RSS_SOURCE, rss_mib = _rss_reader()


@dataclass
class Sample:
    step: int
    epoch: int
    seconds: float
    rss_mib: float
    objects: int


class MemorySampler(Callback):
    """Records RSS and Python's tracked-object count when ``global_step`` reaches each of ``at``."""

    def __init__(self, at: list[int]) -> None:
        self.at = sorted(set(at))
        self.samples: list[Sample] = []
        self.start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:  # after each batch
        step = trainer.global_step
        if self.at and step >= self.at[0]:
            while self.at and step >= self.at[0]:
                self.at.pop(0)
            seconds = time.perf_counter() - self.start
            gc.collect()
            self.samples.append(
                Sample(step, trainer.current_epoch, seconds, rss_mib(), len(gc.get_objects()))
            )


def sample_steps(warmup: int, steps: int, samples: int) -> list[int]:
    """``samples`` steps from ``warmup`` to ``steps``, evenly spaced, both ends included."""
    if samples == 1:
        return [steps]
    return sorted({round(warmup + i * (steps - warmup) / (samples - 1)) for i in range(samples)})


def slope_per_1000(samples: list[Sample]) -> float:
    """Least-squares growth of RSS in MiB per 1000 steps over the samples."""
    if len(samples) < 2:
        return 0.0
    xs = [s.step for s in samples]
    ys = [s.rss_mib for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return (
        1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    )


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, t in chain(model.named_parameters(), model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def gamma_stats(model: torch.nn.Module, targets: Targets, threshold: float) -> str:
    values = torch.cat([p.detach().abs().flatten() for p in scale_factors(model, targets)])
    below = float((values < threshold).float().mean())
    return (
        f"{targets:<4}{values.numel():>9}{float(values.min()):>11.2e}"
        f"{float(values.median()):>11.3g}{float(values.max()):>10.3g}{100 * below:>13.1f}%"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (3000)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (16)")
    parser.add_argument(
        "--lambda", dest="lambda_", type=float, default=1e-2, help="NAMCallback lambda_ (1e-2)"
    )
    parser.add_argument("--samples", type=int, default=7, help="RSS samples after warm-up (7)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps before the first sample (steps / 10)"
    )
    parser.add_argument(
        "--max-growth", type=float, default=10.0, help="allowed RSS growth after warm-up, %% (10)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    args = parse_args(parser, positive=("steps", "batch", "samples", "threads"))
    warmup = args.steps // 10 if args.warmup is None else args.warmup
    if not 0 <= warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {warmup}")
    if not (math.isfinite(args.lambda_) and args.lambda_ >= 0):
        parser.error(f"--lambda must be a finite float >= 0, got {args.lambda_}")
    if not args.max_growth >= 0:
        parser.error(f"--max-growth must be >= 0, got {args.max_growth}")

    pl.seed_everything(0, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    data = DigitsDataModule(batch_size=args.batch)
    model = ImageClassifier(num_classes=data.num_classes, in_channels=data.num_channels)
    nam = NAMCallback(lambda_=args.lambda_, targets="all", log_on="step")
    sampler = MemorySampler(sample_steps(warmup, args.steps, args.samples))
    start_rss = rss_mib()
    with tempfile.TemporaryDirectory(prefix="nam-soak-") as root:
        loggers: list[Logger] = [CSVLogger(root, name="csv", version="")]
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(root, name="tb", version=""))
        except ModuleNotFoundError:
            pass
        trainer = pl.Trainer(
            max_steps=args.steps,
            max_epochs=-1,
            accelerator="cpu",
            devices=1,
            logger=loggers,
            log_every_n_steps=10,
            callbacks=[nam, sampler],
            default_root_dir=root,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        began = time.perf_counter()
        trainer.fit(model, datamodule=data)
        wall = time.perf_counter() - began
        gc.collect()
        after_fit = rss_mib()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        logger_names = ", ".join(type(lg).__name__ for lg in loggers)
    samples = sampler.samples

    batches = int(trainer.num_training_batches)
    print(
        f"small_resnet + NAMCallback(lambda_={args.lambda_:g}, targets='all', log_on='step') on "
        f"digits, batch {args.batch} ({batches} steps per epoch, validation after each)\n"
        f"CPU, torch {torch.__version__}, lightning {pl.__version__}, "
        f"{torch.get_num_threads()} thread(s); loggers: {logger_names}; checkpoint every epoch\n"
        f"{trainer.global_step} steps, {trainer.current_epoch} epochs in {wall:.0f} s "
        f"({1e3 * wall / max(1, trainer.global_step):.1f} ms per step incl. validation); "
        f"RSS from {RSS_SOURCE}, sampled after gc.collect(); RSS before building the "
        f"Trainer {start_rss:.1f} MiB\n"
    )
    if not samples:
        print("FAILED: no memory sample was taken (training ended early?)")
        return 1
    first = samples[0]
    print(f"{'step':>6}{'epoch':>7}{'time s':>9}{'RSS MiB':>10}{'vs first':>10}{'objects':>10}")
    for s in samples:
        change = 100 * (s.rss_mib / first.rss_mib - 1)
        print(
            f"{s.step:>6}{s.epoch:>7}{s.seconds:>9.1f}{s.rss_mib:>10.1f}{change:>+9.1f}%"
            f"{s.objects:>10}"
        )
    last = samples[-1]
    ratio = last.rss_mib / first.rss_mib
    peak = _proc_status_kib("VmHWM") / 1024 if RSS_SOURCE.startswith("/proc") else math.nan
    print(
        f"\nRSS first (step {first.step}) {first.rss_mib:.1f} MiB, last (step {last.step}) "
        f"{last.rss_mib:.1f} MiB: ratio {ratio:.3f}; fitted slope "
        f"{slope_per_1000(samples):+.2f} MiB per 1000 steps; Python objects "
        f"{last.objects - first.objects:+d}"
        + (f"; peak RSS (VmHWM) {peak:.1f} MiB" if math.isfinite(peak) else "")
        + f"; after fit returned {after_fit:.1f} MiB"
    )

    bad = non_finite_tensors(model)
    n_tensors = sum(1 for _ in chain(model.parameters(), model.buffers()))
    print(
        f"non-finite parameters/buffers: {len(bad)} of {n_tensors}"
        + (f" ({', '.join(bad[:5])})" if bad else "")
    )
    shown = ("train/loss", "val/loss", "val/acc", "nam/l1_penalty", "nam/sparsity")
    print("last metrics: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
    print(
        f"\nscale factors |gamma| at the end (threshold {nam.sparsity_threshold:g})\n"
        f"{'':<4}{'count':>9}{'min':>11}{'median':>11}{'max':>10}{'< threshold':>14}"
    )
    all_targets: tuple[Targets, ...] = ("nam", "bn", "all")
    for targets in all_targets:
        print(gamma_stats(model, targets, nam.sparsity_threshold))

    failures = []
    if ratio > 1 + args.max_growth / 100:
        failures.append(
            f"RSS grew {100 * (ratio - 1):.1f}% after warm-up (allowed {args.max_growth:g}%)"
        )
    if bad:
        failures.append(f"{len(bad)} parameter(s)/buffer(s) hold NaN or inf")
    if trainer.global_step != args.steps:
        failures.append(f"trained {trainer.global_step} steps, not {args.steps}")
    growth = f"RSS growth after warm-up <= {args.max_growth:g}%"
    print(
        f"\ntarget: {growth} and every parameter finite: "
        + ("met" if not failures else "MISSED: " + "; ".join(failures))
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
