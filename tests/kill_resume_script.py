"""Training processes for test_kill_resume.py: one run per process, some killed with SIGKILL.

Usage: python kill_resume_script.py OUT_DIR MODE, MODE one of
  train            uninterrupted run (NAMCallback(LAMBDA)) -> train_reference.pt
  train-kill       the same run with ModelCheckpoint every CKPT_EVERY steps (save_last); the
                   process SIGKILLs itself at the start of step KILL_AT + 1, mid-epoch
  train-resume     a new model, trainer.fit(model, ckpt_path=last.ckpt) -> train_resumed.pt; then
                   two wrong resumes from the same file (negative checks):
                   train_restarted_epoch.pt (the loader forgets its position, so the epoch
                   restarts from its first batch) and train_no_optimizer_state.pt (momentum
                   buffers and scheduler state dropped)
  prune            train with NAMCallback(LAMBDA, prune=0.5), save_pruned -> pruned.pt, then an
                   uninterrupted fine-tune of load_checkpoint(pruned.pt) -> finetune_reference.pt
  finetune-kill    fine-tune load_checkpoint(pruned.pt) with checkpoints; killed like train-kill
  finetune-resume  load_checkpoint(pruned.pt), fit(ckpt_path=last.ckpt) -> finetune_resumed.pt

With NAM_TEST_AUTO_LAMBDA=1 in the environment, the train modes use NAMCallback with
lambda_="auto" and prune=PruneConfig(amount=0.5) (so the saved models are pruned).

Every run: CPU, one thread, deterministic=True, seed_everything(0), momentum SGD with a per-step
learning-rate scheduler, 3 epochs of 8 batches.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_helpers import Classifier, random_data, tensors, trainer_kwargs
from torch.utils.data import DataLoader, Dataset, Sampler

from nam_lightning import AutoLambda, NAMCallback, PruneConfig, load_checkpoint, save_pruned

LAMBDA = 1e-2
AUTO = os.environ.get("NAM_TEST_AUTO_LAMBDA") == "1"  # train modes with lambda_="auto"
EPOCHS = 3  # of 64 samples / batch 8 = 8 batches: 24 optimizer steps
CKPT_EVERY = 5  # checkpoints at steps 5, 10, 15, 20
KILL_AT = 13  # killed when global_step == 13: last.ckpt is step 10 (epoch 1, 2 of 8 batches)


class EpochShuffle(Sampler[int]):
    """A new permutation per epoch from ``seed + epoch`` (Lightning calls ``set_epoch``), starting
    at sample ``start`` (set by :class:`ResumableLoader` when it resumes mid-epoch)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator)[self.start :].tolist())


class ResumableLoader(DataLoader):
    """A DataLoader with ``state_dict``/``load_state_dict``: Lightning saves its position in the
    epoch in every checkpoint and restores it before iterating, so a mid-epoch resume continues
    with the next batch (what torchdata's ``StatefulDataLoader`` does)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffle(len(dataset), seed),  # type: ignore[arg-type]
        )
        self.yielded = 0  # batches of the current epoch handed out
        self.resume_at = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self.resume_at = self.resume_at, 0
        sampler = self.sampler
        assert isinstance(sampler, EpochShuffle) and self.batch_size is not None
        sampler.start = skip * self.batch_size
        self.yielded = skip
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        assert isinstance(sampler, EpochShuffle)
        return {"epoch": sampler.epoch, "batches": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, EpochShuffle)
        sampler.set_epoch(state["epoch"])
        # A finished epoch (saved at its end) resumes with a fresh one.
        self.resume_at = state["batches"] if state["batches"] < len(self) else 0


class ForgetfulLoader(ResumableLoader):
    """Negative check: ignores the saved position, like a plain DataLoader (the epoch restarts at
    its first batch while Lightning's batch counter goes on)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ResumableClassifier(Classifier):
    """Classifier (momentum SGD) plus a per-step LR scheduler and a resumable shuffled loader."""

    loader_cls: type[ResumableLoader] = ResumableLoader

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def train_dataloader(self) -> DataLoader:
        return self.loader_cls(random_data(), batch_size=self.hparams["batch_size"])


class ForgetfulClassifier(ResumableClassifier):
    loader_cls = ForgetfulLoader


class Kill(Callback):
    """SIGKILLs this process at the start of the batch after ``KILL_AT`` optimizer steps: no
    teardown, no checkpoint on exit, like a node lost or the OOM killer."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == KILL_AT:
            print(f"SIGKILL at global_step={trainer.global_step} batch_idx={batch_idx}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class DropOptimizerState(Callback):
    """Negative check: forgets momentum buffers and scheduler progress after the restore."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"]
        for config in trainer.lr_scheduler_configs:
            config.scheduler.last_epoch = 0


def nam_callback() -> NAMCallback:
    if AUTO:  # plans at steps 2, 5, 8, ...: the kill (step 13) and the resume (10) fall between
        auto = AutoLambda(warmup=0.1, replan=0.125)
        return NAMCallback(auto, prune=PruneConfig(amount=0.5))
    return NAMCallback(LAMBDA)


def fit(
    model: pl.LightningModule,
    callbacks: list[Callback],
    ckpt_path: Path | None = None,
    checkpoints: Path | None = None,
) -> pl.Trainer:
    if checkpoints is not None:
        callbacks = [
            *callbacks,
            ModelCheckpoint(
                dirpath=checkpoints, every_n_train_steps=CKPT_EVERY, save_top_k=-1, save_last=True
            ),
        ]
    kwargs = trainer_kwargs(
        max_epochs=EPOCHS, max_steps=-1, enable_checkpointing=checkpoints is not None
    )
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def new_model(out: Path, phase: str, cls: type[ResumableClassifier] = ResumableClassifier) -> Any:
    pl.seed_everything(0, verbose=False)
    if phase == "train":
        return cls(lr=0.05)
    return load_checkpoint(cls, out / "pruned.pt")


def save(model: pl.LightningModule, trainer: pl.Trainer, path: Path) -> None:
    assert trainer.global_step == EPOCHS * 8, trainer.global_step
    torch.save(tensors(model), path)


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    phase, _, action = mode.partition("-")
    last = out / f"{phase}_ckpts" / "last.ckpt"
    if mode == "prune":
        model = new_model(out, "train")
        trainer = pl.Trainer(
            callbacks=[NAMCallback(LAMBDA, prune=0.5)], **trainer_kwargs(max_steps=8)
        )
        trainer.fit(model)
        save_pruned(model, out / "pruned.pt", hyper_parameters=dict(model.hparams))
        phase, action = "finetune", ""
    if action == "":  # uninterrupted
        model = new_model(out, phase)
        save(model, fit(model, [nam_callback()]), out / f"{phase}_reference.pt")
    elif action == "kill":
        model = new_model(out, phase)
        fit(model, [nam_callback(), Kill()], checkpoints=out / f"{phase}_ckpts")
        raise AssertionError("the process should have been killed")
    elif action == "resume":
        model = new_model(out, phase)
        trainer = fit(model, [nam_callback()], ckpt_path=last)
        save(model, trainer, out / f"{phase}_resumed.pt")
        if phase == "train" and not AUTO:
            model = new_model(out, phase, ForgetfulClassifier)
            trainer = fit(model, [nam_callback()], ckpt_path=last)
            save(model, trainer, out / "train_restarted_epoch.pt")
            model = new_model(out, phase)
            trainer = fit(model, [nam_callback(), DropOptimizerState()], ckpt_path=last)
            save(model, trainer, out / "train_no_optimizer_state.pt")
    else:
        raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
