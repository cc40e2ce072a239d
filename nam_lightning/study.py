"""``nam-lightning study``: does NAM + L1 give a better model at equal FLOPs than the simpler
alternatives, beyond the spread between seeds?

For each variant, seed and FLOPs target: train, prune to the target, test, fine-tune, test.
The variants (:data:`VARIANTS`) differ only in the :class:`~nam_lightning.NAMCallback` of their
training; every one is pruned the same way (backbone BatchNorm ``|gamma|``, one global
threshold) and fine-tuned without penalty:

- ``baseline``: no NAM, no penalty (pruning a normally trained network);
- ``nam``: NAM, no penalty (what the attention alone does);
- ``slimming``: L1 on the backbone BatchNorms, no NAM (Network Slimming, Liu et al. 2017);
- ``nam+l1``: NAM and L1 on NAM's and the backbone's scale factors (this library's default).

A training is shared by all FLOPs targets of its variant and seed: each target prunes a fresh
copy loaded from the trained checkpoint, so a study costs its trainings plus its fine-tunings.

The run directory holds ``study.json`` (the settings and every finished unit of work),
``trained/<variant>-seed<k>.ckpt``, ``logs/`` (one CSV log per fit), and the rendered
``study.md`` and ``pareto.png``. Each finished unit (a training, or a pruned and fine-tuned run)
is written at once, to a temporary file renamed over the old one, so a study killed at any
point resumes where it stopped when started again on its directory; the settings that decide
the numbers (:func:`study_settings`) must then be the same. Which variants, seeds and targets
are run may change: finished units are reused and the table shows the ones asked for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import inspect
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch

from .callback import NAMCallback
from .checkpoint import load_checkpoint, save_pruned
from .pipeline import example_batch, measure_stage, time_side_by_side
from .pruning import PruneConfig

Variant = Literal["baseline", "nam", "slimming", "nam+l1"]

# Each variant's NAMCallback options over the command's --nam.* options. The penalised variants
# take --nam.lambda_ (and nam+l1 also --nam.targets, "all" by default).
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"nam": False, "lambda_": 0.0, "targets": "bn"},
    "nam": {"nam": True, "lambda_": 0.0},
    "slimming": {"nam": False, "targets": "bn"},
    "nam+l1": {"nam": True},
}
assert tuple(VARIANTS) == get_args(Variant)

# Options of NAMCallback that only concern the NAM modules, left out where no NAM is added.
NAM_ONLY_OPTIONS = ("sites", "spatial", "detach_weights", "fuse")

STUDY_JSON = "study.json"
LOCK = "study.lock"
CONFIG = "config.yaml"  # written by the command line; allowed in a new study's directory
FORMAT = 1

# Settings that do not change a run's numbers: display and logging (the study sets its own).
_NOT_SETTINGS = {
    "trainer": (
        "logger",
        "default_root_dir",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "log_every_n_steps",
        "profiler",
    ),
    # The study prunes to each of its own FLOPs targets.
    "pruning": ("amount", "flops_target"),
}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work: a training (``target`` None) or a pruned and fine-tuned run."""

    variant: str
    seed: int
    target: float | None = None

    @property
    def key(self) -> str:
        base = f"{self.variant}/seed{self.seed}"
        return base if self.target is None else f"{base}/flops{self.target:g}"

    @property
    def training(self) -> Unit:
        return Unit(self.variant, self.seed)

    def describe(self) -> str:
        what = "training" if self.target is None else f"FLOPs target {self.target:g}"
        return f"{self.variant}, seed {self.seed}, {what}"


def check_study_options(
    variants: Sequence[str], seeds: Sequence[int], flops_targets: Sequence[float]
) -> None:
    """Refuse empty, repeated or invalid variants, seeds and FLOPs targets."""
    for name, values in (
        ("variants", variants),
        ("seeds", seeds),
        ("flops_targets", flops_targets),
    ):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"`{name}` must be a non-empty list, got {values!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"`{name}` must not repeat a value, got {list(values)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"`variants` must be among {list(VARIANTS)}, got {unknown}")
    bad_seeds = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad_seeds:
        raise ValueError(f"`seeds` must be ints >= 0, got {bad_seeds}")
    bad_targets = [
        t
        for t in flops_targets
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1
    ]
    if bad_targets:
        raise ValueError(
            f"`flops_targets` must be fractions of the FLOPs to keep, in (0, 1), got {bad_targets}"
        )


def check_pruning(pruning: PruneConfig) -> None:
    """The study prunes every variant by backbone ``|gamma|`` to its own FLOPs targets."""
    if pruning.amount is not None:
        raise ValueError(
            f"`pruning.amount` ({pruning.amount}) does not apply to a study: it prunes to each "
            "of --flops_targets; leave --pruning.amount unset."
        )
    if pruning.importance != "bn":
        raise ValueError(
            f"`pruning.importance` must be 'bn' in a study, got {pruning.importance!r}: the "
            "baseline and slimming variants have no NAM to rank channels by."
        )


def plan(variants: Sequence[str], seeds: Sequence[int], targets: Sequence[float]) -> list[Unit]:
    """Every unit of the study in the order it runs: seed by seed, each variant's training
    followed by its pruned runs (so a study stopped early has whole seeds)."""
    units = []
    for seed in seeds:
        for variant in variants:
            units.append(Unit(variant, seed))
            units += [Unit(variant, seed, float(t)) for t in targets]
    return units


def study_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """What decides each run's numbers, from the command's configuration (a plain dict with
    ``model``, ``data``, ``trainer``, ``nam``, ``pruning`` and ``finetune_epochs``); a study
    resumes only with the same. Display and logging options are left out, and so are the
    variants, seeds and targets (they select runs; they do not change one)."""
    settings = {
        key: config[key]
        for key in ("model", "data", "trainer", "nam", "pruning", "finetune_epochs")
    }
    for section, keys in _NOT_SETTINGS.items():
        settings[section] = {k: v for k, v in dict(settings[section]).items() if k not in keys}
    plain: dict[str, Any] = json.loads(json.dumps(settings, default=str, sort_keys=True))
    return plain


def open_study(run_dir: str | os.PathLike[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The study saved in ``run_dir``, or a new one when there is none; reads, writes nothing.

    Raises:
        NotADirectoryError: ``run_dir`` is a file.
        FileExistsError: ``run_dir`` holds other files but no ``study.json``.
        ValueError: its ``study.json`` cannot be read, or was written with other settings.
    """
    path = Path(run_dir)
    settings = json.loads(json.dumps(settings, default=str))
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--run_dir {path}: a file is in the way, not a directory")
    saved = path / STUDY_JSON
    if not saved.exists():
        others = [p.name for p in path.iterdir()] if path.exists() else []
        others = sorted(name for name in others if name not in (CONFIG, LOCK))
        if others:
            raise FileExistsError(
                f"--run_dir {path} holds files ({', '.join(others[:3])}) but no {STUDY_JSON}: it "
                "is not a study's directory. Pick a new or empty directory."
            )
        return {"format": FORMAT, "settings": settings, "trainings": {}, "runs": {}}
    try:
        study = json.loads(saved.read_text())
        if study.get("format") != FORMAT:
            raise ValueError(f"format {study.get('format')!r}, not {FORMAT}")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"--run_dir {path}: {STUDY_JSON} cannot be read ({err})") from err
    changed = _differences(study["settings"], settings)
    if changed:
        raise ValueError(
            f"--run_dir {path} holds a study with other settings ({'; '.join(changed[:6])}): "
            f"resume it with its own (`nam-lightning --config {path / CONFIG}`), or "
            "start a new study in another --run_dir."
        )
    return dict(study)


def variant_callback(variant: str, nam_options: Mapping[str, Any]) -> NAMCallback:
    """The training callback of ``variant``: its :data:`VARIANTS` entry over ``nam_options``
    (the NAMCallback arguments the command was given)."""
    options = {**nam_options, **VARIANTS[variant]}
    if not options["nam"]:
        options = {k: v for k, v in options.items() if k not in NAM_ONLY_OPTIONS}
    return NAMCallback(**options)


def run_study(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    *,
    run_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any],
    nam_options: Mapping[str, Any],
    pruning: PruneConfig,
    variants: Sequence[str],
    seeds: Sequence[int],
    flops_targets: Sequence[float],
    finetune_epochs: int,
    print_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a study in ``run_dir`` and write its artifacts; returns ``study.json``.

    Args:
        model: the configured model; each training builds a fresh one from its class and
            ``hparams`` under its seed (its own weights are not used).
        datamodule: the data, the same for every run.
        run_dir: the study's directory, new or holding a study with the same ``settings``.
        settings: what decides the numbers (:func:`study_settings`), compared on resume.
        trainer_kwargs: ``pl.Trainer`` arguments of every fit (``max_epochs`` is the training's;
            fine-tuning runs ``finetune_epochs``). Logging and progress bars are the study's.
        nam_options: NAMCallback arguments, under each variant's own (:data:`VARIANTS`).
        pruning: how to prune (the FLOPs target is each of ``flops_targets``).
        variants, seeds, flops_targets: the runs.
        finetune_epochs: epochs of fine-tuning after pruning.
        print_fn: where the progress lines go (default: standard output).
    """
    say = print_fn or functools.partial(print, flush=True)
    check_study_options(variants, seeds, flops_targets)
    check_pruning(pruning)
    path = Path(run_dir)
    open_study(path, settings)  # refuse before creating anything
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path), _quiet_lightning():
        study = open_study(path, settings)
        units = plan(variants, seeds, flops_targets)
        todo = _pending(study, units, path)
        if todo:  # the machine the numbers come from (the last one that ran units)
            study["machine"] = _machine()
        _write_json(path / STUDY_JSON, study)
        trainings = len(variants) * len(seeds)
        say(
            f"study: {path}: {len(units)} units ({trainings} trainings, "
            f"{len(units) - trainings} pruned and fine-tuned runs); "
            f"{len(units) - len(todo)} done before, {len(todo)} to go"
        )

        def cost(unit: Unit) -> float:  # in epochs, for the estimate of the time left
            if unit.target is not None:
                return float(finetune_epochs)
            return float(trainer_kwargs.get("max_epochs") or 1)

        start = time.perf_counter()
        done_cost, batch = 0.0, None
        for k, unit in enumerate(todo):
            if batch is None:
                batch = example_batch(datamodule)
            began = time.perf_counter()
            if unit.target is None:
                record = _train(unit, model, datamodule, batch, path, trainer_kwargs, nam_options)
                study["trainings"][unit.key] = record
            else:
                record = _prune_and_finetune(
                    unit, model, datamodule, batch, path, trainer_kwargs, pruning, finetune_epochs
                )
                study["runs"][unit.key] = record
            record["seconds"] = time.perf_counter() - began
            _write_json(path / STUDY_JSON, study)
            done_cost += cost(unit)
            elapsed = time.perf_counter() - start
            left = elapsed / done_cost * sum(cost(u) for u in todo[k + 1 :])
            say(
                f"study: {len(units) - len(todo) + k + 1}/{len(units)} {unit.describe()}: "
                f"{_outcome(record)} | elapsed {_duration(elapsed)}, about "
                f"{_duration(left)} left"
            )
        write_artifacts(path, study, variants, seeds, flops_targets)
    say(f"study: done; {path / 'study.md'}, {path / 'pareto.png'}")
    return study


def _pending(study: dict[str, Any], units: list[Unit], run_dir: Path) -> list[Unit]:
    """The units still to run. A training is redone when it is not recorded, or when its
    checkpoint is gone while one of its runs is still to do."""
    runs_left = {u.training for u in units if u.target is not None and u.key not in study["runs"]}
    pending = []
    for unit in units:
        if unit.target is not None:
            if unit.key not in study["runs"]:
                pending.append(unit)
        elif unit.key not in study["trainings"] or (
            unit in runs_left and not _checkpoint(run_dir, unit).is_file()
        ):
            pending.append(unit)
    return pending


def _init_arguments(model: pl.LightningModule) -> dict[str, Any]:
    """The saved hyperparameters that ``model``'s constructor takes (LightningCLI adds
    entries of its own, such as ``_instantiator``)."""
    parameters = inspect.signature(type(model).__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {k: v for k, v in model.hparams.items() if takes_any or k in parameters}


def _checkpoint(run_dir: Path, unit: Unit) -> Path:
    return run_dir / "trained" / f"{unit.variant}-seed{unit.seed}.ckpt"


def _trainer(
    trainer_kwargs: Mapping[str, Any],
    log_dir: Path,
    callbacks: list[pl.Callback],
    max_epochs: int | None = None,
) -> pl.Trainer:
    """A Trainer for one fit of the study, logging to ``log_dir/metrics.csv`` (a killed unit's
    log is replaced when it runs again)."""
    from lightning.pytorch.loggers import CSVLogger

    if log_dir.exists():
        for file in log_dir.iterdir():
            if file.is_file():
                file.unlink()
    kwargs = dict(trainer_kwargs)
    if max_epochs is not None:
        kwargs["max_epochs"] = max_epochs
    kwargs.update(
        callbacks=[*(kwargs.get("callbacks") or []), *callbacks],
        logger=CSVLogger(log_dir, name="", version=""),
        default_root_dir=str(log_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = pl.Trainer(**kwargs)
    if trainer.world_size > 1:
        raise ValueError(
            f"A study runs each fit in one process; the trainer options give {trainer.world_size} "
            "processes. Pass --trainer.devices=1 (and --trainer.num_nodes=1)."
        )
    return trainer


def _train(
    unit: Unit,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    batch: torch.Tensor,
    run_dir: Path,
    trainer_kwargs: Mapping[str, Any],
    nam_options: Mapping[str, Any],
) -> dict[str, Any]:
    """Train a fresh model of ``unit``'s variant and seed, test it, save its checkpoint."""
    callback = variant_callback(unit.variant, nam_options)
    pl.seed_everything(unit.seed, verbose=False)
    hparams = _init_arguments(model)
    fresh = type(model)(**hparams)
    log_dir = run_dir / "logs" / f"{unit.variant}-seed{unit.seed}" / "train"
    trainer = _trainer(trainer_kwargs, log_dir, [callback])
    trainer.fit(fresh, datamodule=datamodule)
    trained, _ = measure_stage("trained", trainer, fresh, datamodule, batch)
    path = _checkpoint(run_dir, unit)
    path.parent.mkdir(exist_ok=True)
    save_pruned(fresh, path, hyper_parameters=hparams)
    return {
        "variant": unit.variant,
        "seed": unit.seed,
        "nam": callback.nam,
        "lambda_": callback.lambda_,
        "targets": callback.targets,
        "test_acc": trained.test_acc,
        "params": trained.params,
        "flops": trained.flops,
        "images": len(batch),
        "checkpoint": str(path.relative_to(run_dir)),
    }


def _prune_and_finetune(
    unit: Unit,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    batch: torch.Tensor,
    run_dir: Path,
    trainer_kwargs: Mapping[str, Any],
    pruning: PruneConfig,
    finetune_epochs: int,
) -> dict[str, Any]:
    """Prune a copy of the trained model to ``unit.target``, test, fine-tune, test, time it."""
    assert unit.target is not None
    pruned = load_checkpoint(type(model), _checkpoint(run_dir, unit))
    unpruned = copy.deepcopy(pruned)
    config = dataclasses.replace(pruning, amount=None, flops_target=unit.target)
    report = config.apply(pruned, batch, measure=False)
    log_dir = run_dir / "logs" / f"{unit.variant}-seed{unit.seed}" / f"flops{unit.target:g}"
    trainer = _trainer(trainer_kwargs, log_dir, [], finetune_epochs)
    before, _ = measure_stage("pruned", trainer, pruned, datamodule, batch)
    pl.seed_everything(unit.seed, verbose=False)
    trainer.fit(pruned, datamodule=datamodule)
    after, tuned = measure_stage("fine-tuned", trainer, pruned, datamodule, batch)
    # A quarter of a second per model (at least 10 passes each): a study times dozens of runs.
    unpruned_ms, tuned_ms = time_side_by_side([unpruned, tuned], batch, seconds=0.25)
    return {
        "variant": unit.variant,
        "seed": unit.seed,
        "flops_target": unit.target,
        "pruned_acc": before.test_acc,
        "finetuned_acc": after.test_acc,
        "params": after.params,
        "flops": after.flops,
        "images": len(batch),
        "flops_ratio": report.flops_ratio,
        "params_ratio": report.params_ratio,
        "threshold": report.threshold,
        "removed_channels": report.removed_channels,
        "latency_ms": tuned_ms,
        "unpruned_latency_ms": unpruned_ms,
    }


def summarize(
    study: Mapping[str, Any],
    variants: Sequence[str],
    seeds: Sequence[int],
    flops_targets: Sequence[float],
) -> list[dict[str, Any]]:
    """One row per FLOPs target and variant with a finished run: mean and standard deviation
    over the finished seeds. Accuracies are fractions, FLOPs per image."""
    rows = []
    for target in flops_targets:
        for variant in variants:
            pairs = [
                (study["trainings"][Unit(variant, s).key], study["runs"][key])
                for s in seeds
                if (key := Unit(variant, s, float(target)).key) in study["runs"]
                and Unit(variant, s).key in study["trainings"]
            ]
            if not pairs:
                continue
            trained = [t for t, _ in pairs]
            runs = [r for _, r in pairs]
            rows.append(
                {
                    "flops_target": float(target),
                    "variant": variant,
                    "seeds": [r["seed"] for r in runs],
                    "unpruned_acc": _spread([t["test_acc"] for t in trained]),
                    "pruned_acc": _spread([r["pruned_acc"] for r in runs]),
                    "finetuned_acc": _spread([r["finetuned_acc"] for r in runs]),
                    "params": statistics.mean(r["params"] for r in runs),
                    "flops": _spread([r["flops"] / r["images"] for r in runs]),
                    "unpruned_flops": statistics.mean(t["flops"] / t["images"] for t in trained),
                    "latency_ms": _spread([r["latency_ms"] for r in runs]),
                    "speedup": _spread([r["unpruned_latency_ms"] / r["latency_ms"] for r in runs]),
                }
            )
    return rows


def render_markdown(study: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    """``study.md``: the settings, the table and how its numbers were measured."""
    settings = study["settings"]
    data = settings["data"]
    data_name = data.get("class_path", "?").rsplit(".", 1)[-1] if isinstance(data, dict) else data
    trainer = settings["trainer"]
    # the penalised variants' lambda_ (a number, or the name of a rule that sets it)
    lambdas = {f"{v:g}" if isinstance(v, float) else str(v) for v in _lambdas(study)}
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines = [
        "# Study: accuracy at equal FLOPs, by training variant",
        "",
        f"{data_name}, {settings['model'].get('backbone', '?')}; training epochs: "
        f"{trainer.get('max_epochs')}, fine-tuning epochs: {settings['finetune_epochs']}; "
        f"seeds {', '.join(map(str, seeds))}; L1 lambda "
        f"{', '.join(sorted(lambdas)) or 'none'} (slimming, nam+l1).",
        "Test accuracy in %, mean +- standard deviation over the seeds; pruned is before "
        "fine-tuning.",
        "",
        "| FLOPs target | variant | seeds | unpruned | pruned | fine-tuned | params "
        "| MFLOPs/image | latency (ms) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['flops_target']:g} | {row['variant']} | {len(row['seeds'])} "
            f"| {_pm(row['unpruned_acc'], 100)} | {_pm(row['pruned_acc'], 100)} "
            f"| {_pm(row['finetuned_acc'], 100)} | {row['params']:,.0f} "
            f"| {row['flops'][0] / 1e6:.2f} | {_pm(row['latency_ms'], 1)} "
            f"| {row['speedup'][0]:.2f}x |"
        )
    machine = study.get("machine", {})
    seconds = sum(
        u.get("seconds", 0.0) for part in ("trainings", "runs") for u in study[part].values()
    )
    lines += [
        "",
        "Unpruned: the trained model before pruning (the same for every target). Params and "
        "FLOPs (convolutions and matrix products, multiply-add = 2) of the pruned model, mean "
        "over seeds. Latency: median eval-mode forward time of the fine-tuned model on a batch "
        f"of {_images(study)} test images on the CPU, timed in turns with its unpruned model; "
        "speedup = unpruned latency / pruned latency, mean over seeds.",
        f"Machine: {machine.get('platform', '?')}, {machine.get('cpus', '?')} CPU cores, torch "
        f"{machine.get('torch', '?')}, device {machine.get('device', '?')}; "
        f"{_duration(seconds)} of compute over all units.",
    ]
    return "\n".join(lines) + "\n"


def write_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    """Fine-tuned accuracy against FLOPs per image, a line per variant, error bars over seeds;
    the hollow marker of each colour is the variant's unpruned model."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["flops"][0])
        line = ax.errorbar(
            [r["flops"][0] / 1e6 for r in mine],
            [100 * r["finetuned_acc"][0] for r in mine],
            yerr=[100 * r["finetuned_acc"][1] for r in mine],
            marker="o",
            capsize=3,
            label=variant,
        )
        ax.errorbar(
            [mine[0]["unpruned_flops"] / 1e6],
            [100 * mine[0]["unpruned_acc"][0]],
            yerr=[100 * mine[0]["unpruned_acc"][1]],
            marker="o",
            mfc="none",
            capsize=3,
            color=line[0].get_color(),
        )
    ax.set_xscale("log")
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%g"))  # 3, not 3 x 10^0
    ax.set_xlabel("MFLOPs per image (log scale; hollow: unpruned)")
    ax.set_ylabel("test accuracy after fine-tuning (%)")
    ax.set_title("Accuracy at equal FLOPs (mean +- std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def write_artifacts(
    run_dir: Path,
    study: Mapping[str, Any],
    variants: Sequence[str],
    seeds: Sequence[int],
    flops_targets: Sequence[float],
) -> None:
    """``study.md`` and ``pareto.png`` of the runs asked for, from the saved numbers."""
    rows = summarize(study, variants, seeds, flops_targets)
    _write_text(run_dir / "study.md", render_markdown(study, rows))
    write_pareto(rows, run_dir / "pareto.png")


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation of one value is NaN."""
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def _pm(value: tuple[float, float], scale: float) -> str:
    mean, std = value
    return f"{scale * mean:.2f}" if math.isnan(std) else f"{scale * mean:.2f} +- {scale * std:.2f}"


def _lambdas(study: Mapping[str, Any]) -> list[Any]:
    return [t["lambda_"] for t in study["trainings"].values() if t["lambda_"] != 0]


def _images(study: Mapping[str, Any]) -> str:
    sizes = {r["images"] for r in study["runs"].values()}
    return "/".join(map(str, sorted(sizes))) or "?"


def _outcome(record: Mapping[str, Any]) -> str:
    if "finetuned_acc" in record:
        return (
            f"pruned {100 * record['pruned_acc']:.2f}%, fine-tuned "
            f"{100 * record['finetuned_acc']:.2f}% at {record['flops_ratio']:.2f} of the FLOPs"
        )
    return f"test {100 * record['test_acc']:.2f}%"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every leaf that differs (dicts compared key by key)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _differences(saved.get(key), current.get(key), name)
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def _machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "date": datetime.date.today().isoformat(),
    }


def _write_text(path: Path, text: str) -> None:
    """Write to a temporary file and rename it over ``path``: a reader (or a study killed
    mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=1))


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/study.lock`` so that two studies never run in one directory at once.
    The operating system drops the lock when the process ends, killed or not."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this system (Windows)
        yield
        return
    with open(run_dir / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"Another study is running in {run_dir} (it holds {run_dir / LOCK}); wait for "
                "it to end, or use another --run_dir."
            ) from None
        yield


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's per-Trainer notices (devices, tips) would repeat for every fit of the
    study; its warnings still show."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
