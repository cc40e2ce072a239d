"""Two-process CPU DDP runs for test_callback_ddp.py (DDP re-runs this script per rank).

Usage: python ddp_script.py OUT_DIR MODE, MODE one of
  callback      NAMCallback adds the penalty
  reference     the loss adds lambda * l1_penalty
  spawn         NAMCallback under ddp_spawn (must fail before training)
  spawn-injected  inject_nam before fit, then NAMCallback under ddp_spawn (must work)
  prune         NAMCallback(prune=0.5); saves each rank's pruned weights and a checkpoint
  finetune      load_checkpoint of the pruned checkpoint, then fit again with DDP
  auto          NAMCallback(lambda_="auto", prune=PruneConfig(amount=0.5)); saves each rank's
                lambda at every step
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning_helpers import Classifier, tensors, trainer_kwargs

from nam_lightning import AutoLambda, NAMCallback, PruneConfig, inject_nam, load_checkpoint

LAMBDA = 1e-2


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    kwargs = {"max_steps": 10} if mode == "auto" else {}
    strategy = "ddp_spawn" if mode.startswith("spawn") else "ddp"
    reference = mode == "reference"
    model = Classifier(inject=reference, reference_lambda=LAMBDA if reference else 0.0)
    if mode == "spawn-injected":
        inject_nam(model)
    if mode == "finetune":
        model = load_checkpoint(Classifier, out / "pruned.ckpt")
    callbacks: list[Callback] = []
    if mode == "auto":
        nam = NAMCallback(AutoLambda(warmup=0.1, replan=0.2), prune=PruneConfig(amount=0.5))
        callbacks = [nam, LambdaLog(nam)]
    elif not reference:
        callbacks = [NAMCallback(LAMBDA, prune=0.5 if mode == "prune" else None)]
    kwargs = trainer_kwargs(devices=2, strategy=strategy, **kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model)
    if mode == "prune":
        trainer.save_checkpoint(out / "pruned.ckpt")
    # Under ddp every rank reaches this line; under ddp_spawn only the main process does.
    rank = trainer.global_rank if strategy == "ddp" else "main"
    torch.save(tensors(model), out / f"{mode}_rank{rank}.pt")
    if mode == "auto":
        torch.save(torch.tensor(callbacks[1].lambdas), out / f"lambdas_rank{rank}.pt")


class LambdaLog(Callback):
    """Records the NAMCallback's lambda after each optimizer step."""

    def __init__(self, nam: NAMCallback) -> None:
        self.nam = nam
        self.lambdas: list[float] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.lambdas.append(self.nam.lambda_)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
