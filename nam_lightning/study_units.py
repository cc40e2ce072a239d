"""The units of work of ``nam-lightning study``: the variants' callbacks, a training, and a
pruned and fine-tuned run, each measured as ``nam-lightning run`` measures its stages.

A training of a variant without penalty (``baseline``, ``nam``) is shared by every FLOPs
target: each target's run prunes a copy of the trained model. A penalised variant (``slimming``,
``nam+l1``) under the automatic lambda (``--nam.lambda_ auto``, the default) aims its penalty
at the channels that pruning to one FLOPs target will remove, so it trains once per target and
its callback prunes when training ends; that target's run fine-tunes the pruned model. With a
fixed ``--nam.lambda_`` a penalised training is shared like one without penalty.

A training leaves ``trained/<name>.ckpt`` (the trained model, saved just before the callback
prunes, as in ``run``) and, when aimed at a target, ``trained/<name>-pruned.ckpt``; a fit logs
to ``logs/<name>/{train,finetune}/metrics.csv``; ``<name>`` is the unit's key with ``-`` for
``/``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch

from .autolambda import AutoLambda
from .callback import NAMCallback
from .checkpoint import load_checkpoint, save_pruned
from .models import ImageClassifier
from .pipeline import SaveTrained, example_batch, measure_stage, time_side_by_side
from .pruning import PruneConfig
from .report import PruneReport

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
_NAM_ONLY_OPTIONS = ("sites", "spatial", "detach_weights", "fuse")

# What a run records of its pruning (an aimed training records it for its run).
_PRUNING_FIELDS = ("flops_ratio", "params_ratio", "threshold", "removed_channels")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work: a training (``training`` None) or a pruned and fine-tuned run of
    ``training``. A run's ``target`` is the fraction of the FLOPs it keeps; a training's is the
    target it is aimed at, or None when all targets share it."""

    variant: str
    seed: int
    target: float | None = None
    training: Unit | None = None

    @property
    def key(self) -> str:
        """Its key in ``study.json``'s ``trainings`` or ``runs``."""
        base = f"{self.variant}/seed{self.seed}"
        return base if self.target is None else f"{base}/flops{self.target:g}"

    @property
    def name(self) -> str:
        """Its name in file and folder names."""
        return self.key.replace("/", "-")

    def describe(self) -> str:
        if self.training is not None:
            return f"{self.variant}, seed {self.seed}, FLOPs target {self.target:g}"
        aim = "" if self.target is None else f" for FLOPs target {self.target:g}"
        return f"{self.variant}, seed {self.seed}, training{aim}"


def aimed_variants(variants: Sequence[str], nam_options: Mapping[str, Any]) -> list[str]:
    """The variants that train once per FLOPs target: those penalised by the automatic
    lambda, which aims the penalty at one target."""
    lambdas = {v: {**nam_options, **VARIANTS[v]}["lambda_"] for v in variants}
    return [v for v, lam in lambdas.items() if lam == "auto" or isinstance(lam, AutoLambda)]


def variant_callback(
    variant: str, nam_options: Mapping[str, Any], prune: PruneConfig | None = None
) -> NAMCallback:
    """The training callback of ``variant``: its :data:`VARIANTS` entry over ``nam_options``
    (the NAMCallback arguments the command was given), pruning to ``prune`` when training ends
    (an aimed training's target; the automatic lambda needs it)."""
    options = {**nam_options, **VARIANTS[variant], "prune": prune}
    if not options["nam"]:
        options = {k: v for k, v in options.items() if k not in _NAM_ONLY_OPTIONS}
    return NAMCallback(**options)


def checkpoints(run_dir: Path, training: Unit) -> list[Path]:
    """The files a training leaves for its runs: the trained model and, for a training aimed
    at a target, the pruned one."""
    trained = run_dir / "trained" / f"{training.name}.ckpt"
    if training.target is None:
        return [trained]
    return [trained, trained.with_name(f"{training.name}-pruned.ckpt")]


@dataclasses.dataclass
class UnitRunner:
    """What the units of a study share (the model to copy, the data, the options), and how
    each runs. Every fit is seeded by its unit's seed, so a unit gives the same numbers
    whether its study ran unbroken or was resumed.

    Attributes:
        model: the configured model; each training builds a fresh one from its class and
            ``hparams`` under its seed (its own weights are not used).
        trainer_kwargs: ``pl.Trainer`` arguments of every fit (``max_epochs`` is the
            training's; fine-tuning runs ``finetune_epochs``). Logging and progress bars are
            the study's.
        nam_options: NAMCallback arguments, under each variant's own (:data:`VARIANTS`).
        pruning: how to prune (the FLOPs target is each unit's).
        finetune_lr: the rate fine-tuning starts at (cosine decay, no warm-up), as in ``run``.
    """

    model: ImageClassifier
    datamodule: pl.LightningDataModule
    run_dir: Path
    trainer_kwargs: Mapping[str, Any]
    nam_options: Mapping[str, Any]
    pruning: PruneConfig
    finetune_epochs: int
    finetune_lr: float
    _batch: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def batch(self) -> torch.Tensor:
        """The test images that FLOPs and latency are measured on (read at first use)."""
        if self._batch is None:
            self._batch = example_batch(self.datamodule)
        return self._batch

    def train(self, unit: Unit) -> dict[str, Any]:
        """Train a fresh model of ``unit``'s variant and seed, save it, test it; an aimed
        training's callback then prunes it to the target, and the pruned model is saved."""
        assert unit.training is None
        prune = None
        if unit.target is not None:
            prune = dataclasses.replace(self.pruning, amount=None, flops_target=unit.target)
        callback = variant_callback(unit.variant, self.nam_options, prune)
        pl.seed_everything(unit.seed, verbose=False)
        hparams = _init_arguments(self.model)
        model = type(self.model)(**hparams)
        files = checkpoints(self.run_dir, unit)
        files[0].parent.mkdir(exist_ok=True)
        # SaveTrained before the callback: it saves the model before the callback prunes it
        trainer = self._trainer(unit, "train", [SaveTrained(files[0]), callback])
        trainer.fit(model, datamodule=self.datamodule)
        trained = load_checkpoint(type(model), files[0])
        stage, _ = measure_stage("trained", trainer, trained, self.datamodule, self.batch)
        record = {
            "variant": unit.variant,
            "seed": unit.seed,
            "flops_target": unit.target,
            "nam": callback.nam,
            "lambda_": callback.lambda_,  # the automatic lambda's final value
            "auto": callback.auto is not None,
            "targets": callback.targets,
            "test_acc": stage.test_acc,
            "params": stage.params,
            "flops": stage.flops,
            "images": len(self.batch),
            "checkpoint": str(files[0].relative_to(self.run_dir)),
        }
        if callback.report is not None:
            save_pruned(model, files[1], hyper_parameters=hparams)
            record.update(_pruning_record(callback.report))
        return record

    def prune_and_finetune(self, unit: Unit, trained: Mapping[str, Any]) -> dict[str, Any]:
        """Test the pruned model of ``unit`` (a copy of its shared training pruned to the
        target, or its aimed training's pruned model), fine-tune it as ``run`` does, test it,
        time it against the unpruned model. ``trained`` is its training's record."""
        assert unit.training is not None and unit.target is not None
        model_class = type(self.model)
        trained_path, *pruned_path = checkpoints(self.run_dir, unit.training)
        unpruned = load_checkpoint(model_class, trained_path)
        if pruned_path:
            pruned = load_checkpoint(model_class, pruned_path[0])
            pruning = {k: trained[k] for k in _PRUNING_FIELDS}
        else:
            pruned = copy.deepcopy(unpruned)
            config = dataclasses.replace(self.pruning, amount=None, flops_target=unit.target)
            pruning = _pruning_record(config.apply(pruned, self.batch, measure=False))
        trainer = self._trainer(unit, "finetune", [], self.finetune_epochs)
        before, _ = measure_stage("pruned", trainer, pruned, self.datamodule, self.batch)
        pruned.finetuning(self.finetune_lr)
        pl.seed_everything(unit.seed, verbose=False)
        trainer.fit(pruned, datamodule=self.datamodule)
        after, tuned = measure_stage("fine-tuned", trainer, pruned, self.datamodule, self.batch)
        # A quarter of a second per model (at least 10 passes each): a study times dozens.
        unpruned_ms, tuned_ms = time_side_by_side([unpruned, tuned], self.batch, seconds=0.25)
        return {
            "variant": unit.variant,
            "seed": unit.seed,
            "flops_target": unit.target,
            "training": unit.training.key,
            "pruned_acc": before.test_acc,
            "finetuned_acc": after.test_acc,
            "params": after.params,
            "flops": after.flops,
            "images": len(self.batch),
            **pruning,
            "latency_ms": tuned_ms,
            "unpruned_latency_ms": unpruned_ms,
        }

    def _trainer(
        self, unit: Unit, stage: str, callbacks: list[pl.Callback], max_epochs: int | None = None
    ) -> pl.Trainer:
        """A Trainer for one fit, logging to ``logs/<unit>/<stage>/metrics.csv`` (the log of
        a killed unit is replaced when it runs again)."""
        from lightning.pytorch.loggers import CSVLogger

        log_dir = self.run_dir / "logs" / unit.name / stage
        if log_dir.exists():
            for file in log_dir.iterdir():
                if file.is_file():
                    file.unlink()
        kwargs = dict(self.trainer_kwargs)
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
                f"A study runs each fit in one process; the trainer options give "
                f"{trainer.world_size} processes. Pass --trainer.devices=1 (and "
                "--trainer.num_nodes=1)."
            )
        return trainer


def _pruning_record(report: PruneReport) -> dict[str, Any]:
    return {k: getattr(report, k) for k in _PRUNING_FIELDS}


def _init_arguments(model: pl.LightningModule) -> dict[str, Any]:
    """The saved hyperparameters that ``model``'s constructor takes (LightningCLI adds
    entries of its own, such as ``_instantiator``)."""
    parameters = inspect.signature(type(model).__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {k: v for k, v in model.hparams.items() if takes_any or k in parameters}
