"""``nam-lightning``: the command line, built on LightningCLI (every option also from YAML).

    nam-lightning run                      # digits + small ResNet + NAM: train, prune, fine-tune
    nam-lightning run --model.backbone resnet18 --model.cifar_stem true \\
        --data nam_lightning.data.CIFARDataModule --data.root ./data
    nam-lightning fit / validate / test    # as LightningCLI has them, with NAM and its penalty
    nam-lightning prune --ckpt_path train.ckpt
    nam-lightning finetune --ckpt_path pruned.ckpt
    nam-lightning study                    # 4 variants x 3 seeds x 3 FLOPs targets, resumable
    nam-lightning run --print_config       # the full configuration, as YAML
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _get_short_description
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .callback import NAMCallback
from .checkpoint import load_checkpoint
from .models import ImageClassifier
from .pipeline import check_run_dir, claim_run_dir, example_batch, render_markdown, run_pipeline
from .pruning import PruneConfig
from .study import check_pruning, check_study_options, open_study, run_study, study_settings
from .study_units import Variant

_PIPELINE_COMMANDS = ("run", "prune", "finetune")
_OWN_COMMANDS = (*_PIPELINE_COMMANDS, "study")  # methods of _NAMLightningCLI, not of the Trainer
_RUN_DIR_ENV = "NAM_LIGHTNING_RUN_DIR"
_DEFAULT_FLOPS_TARGET = 0.4


def _default_run_dir() -> str:
    """``runs/<date-time>``, passed through the environment to the DDP worker processes
    (Lightning's launcher starts them by re-running this command a moment later)."""
    if _is_launched_worker() and _RUN_DIR_ENV in os.environ:
        return os.environ[_RUN_DIR_ENV]
    os.environ[_RUN_DIR_ENV] = f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return os.environ[_RUN_DIR_ENV]


def _is_launched_worker() -> bool:
    """A process of a rank other than 0: one started by Lightning's DDP launcher or torchrun
    (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``) or a SLURM task other than the first
    (``SLURM_PROCID``). Only rank 0 checks and claims the run directory."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return any(int(os.environ.get(k, "0")) > 0 for k in ranks)


class _NAMLightningCLI(LightningCLI):
    """LightningCLI with NAM on every training command and the pipeline commands added."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "run": {"model", "datamodule"},
            "prune": {"model", "datamodule"},
            "finetune": {"model", "datamodule"},
            "study": {"model", "datamodule"},
        }

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        # As LightningCLI's, except that the pipeline commands are methods of this class (their
        # arguments are read from these signatures), not of the Trainer.
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        parser_subcommands = parser.add_subcommands()
        for subcommand in self.subcommands():
            klass = type(self) if subcommand in _OWN_COMMANDS else self.trainer_class
            assert isinstance(klass, type)
            description = _get_short_description(getattr(klass, subcommand))
            subparser_kwargs = kwargs.get(subcommand, {})
            subparser_kwargs.setdefault("description", description)
            subcommand_parser = self._prepare_subcommand_parser(
                klass, subcommand, **subparser_kwargs
            )
            self._subcommand_parsers[subcommand] = subcommand_parser
            parser_subcommands.add_subcommand(subcommand, subcommand_parser, help=description)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in _OWN_COMMANDS:
            getattr(self, subcommand)(**self._prepare_subcommand_kwargs(subcommand))
        else:
            super()._run_subcommand(subcommand)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(NAMCallback, "nam", fail_untyped=False, sub_configs=True)
        parser.callback_keys.append("nam")
        parser.add_class_arguments(PruneConfig, "pruning", fail_untyped=False)
        # The callback prunes to --pruning when training ends; with lambda_="auto" (the
        # default) it also aims the penalty at the channels that pruning will remove.
        parser.link_arguments("pruning", "nam.prune", apply_on="instantiate")
        digits = {"class_path": "nam_lightning.data.DigitsDataModule"}
        parser.set_defaults(
            {"nam.lambda_": "auto", "pruning.flops_target": _DEFAULT_FLOPS_TARGET, "data": digits}
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.in_channels", apply_on="instantiate")

    @contextlib.contextmanager
    def _usage_errors(self) -> Iterator[None]:
        """An option refused while the command is set up (a class's own check, a missing
        checkpoint, a run directory in use) ends like a mistyped one: usage, the message,
        exit status 2, no traceback. ``JSONARGPARSE_DEBUG=true`` raises it instead."""
        try:
            yield
        except (ValueError, TypeError, OSError, MisconfigurationException) as err:
            parser = getattr(self, "_subcommand_parsers", {}).get(str(self.subcommand))
            (parser or self.parser).error(str(err), err)

    def before_instantiate_classes(self) -> None:
        with self._usage_errors():
            self._prepare_config()

    def instantiate_classes(self) -> None:
        with self._usage_errors():
            super().instantiate_classes()

    def _prepare_config(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        trainer = config["trainer"]
        pruning = config.get("pruning")
        # --pruning.amount replaces the default FLOPs target rather than conflicting with it
        if (
            pruning
            and pruning.get("amount") is not None
            and pruning.get("flops_target") == _DEFAULT_FLOPS_TARGET
        ):
            pruning["flops_target"] = None
        if self.subcommand in _PIPELINE_COMMANDS:
            _check_stage_options(config)
            if config.get("run_dir") is None:
                config["run_dir"] = _default_run_dir()
            if not _is_launched_worker():
                check_run_dir(config["run_dir"], config.get("overwrite", False))
        if self.subcommand == "study":
            _check_stage_options(config)
            check_study_options(config["variants"], config["seeds"], config["flops_targets"])
            check_pruning(PruneConfig(**config["pruning"]))
            open_study(config["run_dir"], study_settings(config.as_dict()))
        if torch.cuda.is_available() and trainer.get("accelerator") in ("auto", "gpu", "cuda"):
            devices = trainer.get("devices", "auto")
            count = torch.cuda.device_count() if devices in ("auto", -1, "-1") else devices
            if isinstance(count, int) and count > 1:
                trainer["sync_batchnorm"] = True

    def after_instantiate_classes(self) -> None:
        # Only once every option was accepted: a bad option leaves the run directory empty.
        if self.subcommand in _PIPELINE_COMMANDS and not _is_launched_worker():
            config = self._config()
            with self._usage_errors():
                path = claim_run_dir(config["run_dir"], config.get("overwrite", False))
            self.parser.save(self.config, path, overwrite=True)
        if self.subcommand == "study":
            run_dir = Path(self._config()["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, run_dir / "config.yaml", overwrite=True)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        if self.subcommand in _PIPELINE_COMMANDS:
            return self._stage_trainer("train" if self.subcommand == "run" else self.subcommand)
        return super().instantiate_trainer(**kwargs)

    def _config(self) -> Any:
        return self.config_init.get(str(self.subcommand), self.config_init)

    def _stage_trainer(self, stage: str, sparsity: bool = True) -> pl.Trainer:
        """A Trainer for one pipeline stage, logging under ``run_dir/stage``."""
        config = self._config()
        run_dir = Path(config["run_dir"])
        trainer_config = dict(config["trainer"])
        if stage == "finetune" and "finetune_epochs" in config:  # in `run`; `finetune` uses
            trainer_config["max_epochs"] = config["finetune_epochs"]  # --trainer.max_epochs
        trainer_config["default_root_dir"] = str(run_dir / stage)
        loggers: list[Logger] = [CSVLogger(run_dir / stage, name="", version="")]
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir / stage, name="tb", version=""))
        except ModuleNotFoundError:
            pass
        trainer_config["logger"] = loggers
        callbacks = [c for c in (trainer_config.get("callbacks") or []) if c is not None]
        callbacks = [c for c in callbacks if not isinstance(c, (NAMCallback, ModelCheckpoint))]
        if sparsity:
            callbacks.append(config["nam"])
        callbacks.append(ModelCheckpoint(dirpath=run_dir / stage / "checkpoints", save_last=True))
        trainer_config["callbacks"] = callbacks
        return self.trainer_class(**trainer_config)

    def run(
        self,
        model: ImageClassifier,
        datamodule: pl.LightningDataModule,
        finetune_epochs: int = 10,
        finetune_lr: float = 0.01,
        run_dir: str | None = None,
        overwrite: bool = False,
        export: bool = True,
    ) -> None:
        """Train with NAM and the L1 penalty, prune, fine-tune, test each stage, write a report.

        Args:
            finetune_epochs: epochs of fine-tuning after pruning.
            finetune_lr: learning rate fine-tuning starts at (cosine decay, no warm-up).
            run_dir: where artifacts go (default: runs/<date-time>).
            overwrite: replace the artifacts of an existing run directory.
            export: also write the fine-tuned model as ``model.onnx`` (a few seconds).
        """
        assert run_dir is not None
        summary = run_pipeline(
            model,
            datamodule,
            lambda stage, sparsity: self._stage_trainer(stage, sparsity),
            finetune_lr,
            Path(run_dir),
            export,
        )
        rank_zero_info(f"\n{render_markdown(summary)}\nArtifacts in {run_dir}/")

    def prune(
        self,
        model: ImageClassifier,
        datamodule: pl.LightningDataModule,
        ckpt_path: str,
        run_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """Prune a model trained with ``fit`` and save it as ``run_dir/pruned.ckpt``.

        Args:
            ckpt_path: the checkpoint written by ``nam-lightning fit``.
            run_dir: where artifacts go (default: runs/<date-time>).
            overwrite: replace the artifacts of an existing run directory.
        """
        assert run_dir is not None
        config = self._config()
        trained = load_checkpoint(type(model), ckpt_path)
        pruning = config["pruning"]
        report = pruning.apply(trained, example_batch(datamodule))
        self.trainer.strategy.connect(trained)
        self.trainer.save_checkpoint(Path(run_dir) / "pruned.ckpt", weights_only=True)
        (Path(run_dir) / "prune_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        rank_zero_info(f"{report}\nSaved {run_dir}/pruned.ckpt")

    def finetune(
        self,
        model: ImageClassifier,
        datamodule: pl.LightningDataModule,
        ckpt_path: str,
        finetune_lr: float = 0.01,
        run_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """Fine-tune a pruned checkpoint (no sparsity penalty), then test it.

        Args:
            ckpt_path: the checkpoint written by ``nam-lightning prune`` (or ``run``).
            finetune_lr: learning rate fine-tuning starts at (cosine decay, no warm-up).
            run_dir: where artifacts go (default: runs/<date-time>).
            overwrite: replace the artifacts of an existing run directory.
        """
        assert run_dir is not None
        pruned = load_checkpoint(type(model), ckpt_path)
        pruned.finetuning(finetune_lr)
        trainer = self._stage_trainer("finetune", sparsity=False)
        trainer.fit(pruned, datamodule=datamodule)
        trainer.test(pruned, datamodule=datamodule)
        trainer.save_checkpoint(Path(run_dir) / "finetuned.ckpt", weights_only=True)

    def study(
        self,
        model: ImageClassifier,
        datamodule: pl.LightningDataModule,
        variants: tuple[Variant, ...] = ("baseline", "nam", "slimming", "nam+l1"),
        seeds: tuple[int, ...] = (0, 1, 2),
        flops_targets: tuple[float, ...] = (0.4, 0.2, 0.1),
        finetune_epochs: int = 10,
        finetune_lr: float = 0.01,
        run_dir: str = "runs/study",
    ) -> None:
        """Compare training variants at equal FLOPs over seeds (resumable).

        For each variant, seed and FLOPs target: train, prune, test, fine-tune, test. Writes
        study.json, study.md and pareto.png; started again on its directory, it resumes.

        Args:
            variants: baseline (no NAM, no penalty), nam (NAM, no penalty), slimming (the
                penalty on the backbone BatchNorms, no NAM), nam+l1 (NAM and the penalty:
                --nam.*). Under --nam.lambda_ auto, slimming and nam+l1 train once per FLOPs
                target; the others train once per seed.
            seeds: the seeds of the runs (--seed_everything is not used).
            flops_targets: fractions of the FLOPs to keep.
            finetune_epochs: epochs of fine-tuning after pruning.
            finetune_lr: learning rate fine-tuning starts at (cosine decay, no warm-up).
            run_dir: the study's directory; a study with the same settings there is resumed.
        """
        config = self._config()
        trainer_kwargs = dict(config["trainer"])
        trainer_kwargs["callbacks"] = [
            c
            for c in (trainer_kwargs.get("callbacks") or [])
            if c is not None and not isinstance(c, (NAMCallback, ModelCheckpoint))
        ]
        run_study(
            model,
            datamodule,
            run_dir=run_dir,
            settings=study_settings(self.config[str(self.subcommand)].as_dict()),
            trainer_kwargs=trainer_kwargs,
            nam_options=self.config[str(self.subcommand)]["nam"].as_dict(),
            pruning=config["pruning"],
            variants=variants,
            seeds=seeds,
            flops_targets=flops_targets,
            finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr,
        )


def main(args: Any = None) -> None:
    """Entry point of the ``nam-lightning`` console script."""
    _NAMLightningCLI(
        ImageClassifier,
        pl.LightningDataModule,  # any data module; digits is the default (set_defaults)
        subclass_mode_data=True,
        trainer_defaults={
            "max_epochs": 20,
            "accelerator": "auto",
            "devices": "auto",
            "precision": _default_precision(),
            "benchmark": torch.cuda.is_available(),
            "log_every_n_steps": 10,
        },
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


def _check_stage_options(config: Any) -> None:
    """What jsonargparse's types do not say, checked before the run directory is made."""
    epochs = config.get("finetune_epochs")
    if epochs is not None and epochs < 1:
        raise ValueError(f"--finetune_epochs must be a positive int, got {epochs}")
    lr = config.get("finetune_lr")
    if lr is not None and not 0 < lr < math.inf:
        raise ValueError(f"--finetune_lr must be a finite float > 0, got {lr}")
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: no such file (a checkpoint written by "
            "`nam-lightning fit`, `prune` or `run`)"
        )


def _default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


if __name__ == "__main__":
    main()
