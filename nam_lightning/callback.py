"""``NAMCallback``: NAM, its sparsity penalty and pruning for any LightningModule.

The callback calls the plain-torch core and adds the Lightning timing: ``setup`` injects NAM
(right after ``configure_model`` when the module builds its layers there), so NAM's
parameters reach the optimizer, DDP, SyncBatchNorm conversion and checkpoint restore;
``on_before_optimizer_step`` adds the penalty's gradient once per optimizer step, after AMP
unscaling and before clipping (``lambda_ * sign(gamma)``, or the planned decay of
:mod:`~nam_lightning.autolambda`); ``on_train_end`` (with ``prune=``) prunes on every rank,
checks that the ranks agree and saves the pruned model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from .attention import NAMSite
from .autolambda import AutoLambda, PlannedDecay
from .checks import check_bool, check_finite_float
from .inject import SiteSelection, check_sites, inject_nam, resolve_sites
from .pruning import PruneConfig
from .record import pruning_passes, saved_pruning_passes
from .report import PruneReport
from .sparsity import (
    Targets,
    add_l1_subgradient_,
    check_targets,
    l1_norm,
    non_finite,
    scale_factors,
    sparsity,
)
from .utils import copy_from_rank_zero, on_device_of


class NAMCallback(Callback):
    """Train with NAM attention and the L1 sparsity penalty on BatchNorm scale factors.

    Args:
        lambda_: weight of the L1 penalty ``lambda_ * sum |gamma|`` (the paper uses 1e-4;
            Network Slimming uses 1e-5 for deep ResNets). 0 disables the penalty.
            ``"auto"`` (needs ``prune``): only the channels pruning will remove are penalised,
            by a decay ``lambda * gamma`` whose lambda is set during training so that they
            end with almost no ``|gamma|`` mass (see :class:`~nam_lightning.AutoLambda`; pass
            one to change its start, rate or schedule); ``targets`` then does not apply.
            Logged as ``nam/lambda`` and ``nam/pruned_mass``.
        targets: which scale factors are penalised: ``"nam"`` (NAM's own, as in the paper),
            ``"bn"`` (every backbone BatchNorm, Network Slimming) or ``"all"`` (both; pruning
            needs sparse backbone BatchNorms).
        sites: where NAM goes; see :func:`~nam_lightning.inject_nam`.
        spatial: add NAM's spatial attention. Needs the LightningModule's
            ``example_input_array`` to size it.
        detach_weights: compute the attention weights from ``gamma`` without gradient (the
            reference behaviour).
        sparsity_threshold: ``nam/sparsity`` is the fraction of targeted ``|gamma|`` below it.
        log_on: log the metrics every training ``"step"`` or once per ``"epoch"``.
        fuse: fuse each site's BatchNorm with NAM's in training (exact; less memory, fewer
            passes). ``False`` runs them one after the other.
        prune: prune channels when training ends: a fraction of channels to remove, or a
            :class:`~nam_lightning.PruneConfig` (e.g. ``PruneConfig(flops_target=0.5)``).
            The example batch is the LightningModule's ``example_input_array``, else the first
            training batch. The report is kept in ``callback.report``.
        identity_init: for fine-tuning a trained network: NAM starts as the identity, so the
            model's outputs are unchanged at first (see :func:`~nam_lightning.inject_nam` and
            ``docs/pretrained.md``).
        nam: inject NAM. ``False`` keeps the network as it is and only adds the penalty (and
            pruning): Network Slimming. ``targets`` must then select backbone BatchNorms:
            ``"bn"``, or ``"all"``, which is the same on a network without NAM; ``"nam"``,
            ``spatial=True`` and explicit ``sites`` are refused. ``detach_weights`` and
            ``fuse`` are unused.

    Example::

        trainer = Trainer(callbacks=[NAMCallback(lambda_=1e-4)])
        trainer.fit(model)
    """

    def __init__(
        self,
        lambda_: float | Literal["auto"] | AutoLambda = 1e-4,
        *,
        targets: Targets = "all",
        sites: SiteSelection = "auto",
        spatial: bool = False,
        detach_weights: bool = True,
        sparsity_threshold: float = 1e-2,
        log_on: Literal["step", "epoch"] = "step",
        prune: float | PruneConfig | None = None,
        fuse: bool = True,
        identity_init: bool = False,
        nam: bool = True,
    ) -> None:
        auto: AutoLambda | None = None
        if lambda_ == "auto":
            auto = AutoLambda()
        elif isinstance(lambda_, AutoLambda):
            auto = lambda_
        elif isinstance(lambda_, str):
            raise TypeError(f"`lambda_` must be a float >= 0 or 'auto', got str {lambda_!r}")
        else:
            check_finite_float("lambda_", lambda_, zero_ok=True)
        check_targets(targets)
        check_sites(sites)
        flags = (
            ("spatial", spatial),
            ("detach_weights", detach_weights),
            ("fuse", fuse),
            ("identity_init", identity_init),
            ("nam", nam),
        )
        for name, flag in flags:
            check_bool(name, flag)
        if not nam and (targets == "nam" or spatial or sites != "auto"):
            given = (
                "targets='nam'" if targets == "nam" else "spatial=True" if spatial else "`sites`"
            )
            raise ValueError(
                f"`nam=False` adds no NAM, so {given} has nothing to act on: use targets='bn' "
                "(the backbone BatchNorms, Network Slimming) and leave `spatial` and `sites` "
                "unset, or nam=True."
            )
        check_finite_float("sparsity_threshold", sparsity_threshold)
        if log_on not in ("step", "epoch"):
            raise ValueError(f"`log_on` must be 'step' or 'epoch', got {log_on!r}")
        self.lambda_ = auto.lambda_ if auto is not None else float(lambda_)  # type: ignore[arg-type]
        self.auto = auto
        self.targets: Targets = targets
        self.sites = sites
        self.spatial = spatial
        self.detach_weights = detach_weights
        self.sparsity_threshold = float(sparsity_threshold)
        self.log_on = log_on
        self.fuse = fuse
        self.identity_init = identity_init
        self.nam = nam
        if isinstance(prune, (int, float)) and not isinstance(prune, bool):
            if not 0 < prune < 1:  # NaN too
                raise ValueError(
                    "`prune`, a fraction of channels to remove, must be in (0, 1) (it is "
                    f"PruneConfig's `amount`), got {prune!r}"
                )
            prune = PruneConfig(amount=float(prune))
        if prune is not None and not isinstance(prune, PruneConfig):
            raise TypeError(
                f"`prune` must be None, a fraction of channels to remove or a PruneConfig, "
                f"got {prune!r}"
            )
        if auto is not None and prune is None:
            raise ValueError(
                "`lambda_='auto'` aims the penalty at the channels pruning will remove, so it "
                "needs `prune` (e.g. prune=PruneConfig(flops_target=0.4)); give a float "
                "`lambda_` to train without a pruning target."
            )
        self.prune = prune
        self.report: PruneReport | None = None
        self.pruned_path: Path | None = None
        self._example: Any = None
        self._decay = None if auto is None else PlannedDecay(auto, prune)  # type: ignore[arg-type]
        # (module, the stepped parameters, the penalised ones): see _penalised
        self._penalised_for: tuple[Any, list[torch.Tensor], list[torch.Tensor]] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if is_overridden("configure_model", pl_module):
            # The layers do not exist yet: inject right after the user's configure_model.
            if not isinstance(pl_module.configure_model, functools.partial):
                pl_module.configure_model = functools.partial(  # type: ignore[method-assign]
                    _configure_then_inject, pl_module.configure_model, self, trainer, pl_module
                )
        else:
            self._inject(trainer, pl_module)

    def _inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missing = [
            n
            for n in (resolve_sites(pl_module, self.sites) if self.nam else [])
            if not isinstance(pl_module.get_submodule(n), NAMSite)
        ]
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            if self.prune is not None:
                raise RuntimeError(
                    "NAMCallback(prune=...) cannot run under a launcher that starts worker "
                    "processes and copies the weights back (strategy='ddp_spawn', 'ddp_fork', "
                    "'ddp_notebook'): the main process's model keeps the unpruned shapes. Use "
                    "strategy='ddp'."
                )
            if missing:
                raise RuntimeError(
                    "NAMCallback cannot add NAM under a launcher that starts worker processes "
                    "and copies the weights back (strategy='ddp_spawn', 'ddp_fork', "
                    "'ddp_notebook'): the main process would not have the NAM modules and "
                    "Lightning would drop their weights. Use strategy='ddp', or call "
                    "nam_lightning.inject_nam(model) with the same sites before trainer.fit so "
                    "every process has them."
                )
        if not self.nam:
            if not scale_factors(pl_module, self.targets):
                raise ValueError(
                    f"`nam=False` with `targets={self.targets!r}` selects no BatchNorm scale "
                    f"factor in {type(pl_module).__name__}: nothing to penalise or prune by. "
                    "Use nam=True for a network without affine BatchNorm layers."
                )
            return
        example = pl_module.example_input_array if self.spatial else None
        if self.spatial and example is None:
            raise ValueError(
                "`spatial=True` needs `example_input_array` on the LightningModule: spatial "
                "attention is sized from the real feature maps of one forward pass."
            )
        # Checked before NAM goes in (NAM brings scale factors of its own, so only "bn" can
        # select none): a refusal leaves the model as it was.
        if self.targets == "bn" and not scale_factors(pl_module, "bn"):
            raise ValueError(
                f"`targets={self.targets!r}` selects no BatchNorm scale factor in "
                f"{type(pl_module).__name__}: nothing to penalise. Use targets='nam' (NAM's own "
                "scale factors) for a network without affine BatchNorm layers."
            )
        sites = inject_nam(
            pl_module,
            self.sites,
            spatial=self.spatial,
            detach_weights=self.detach_weights,
            example_inputs=example,
            fuse=self.fuse,
            identity_init=self.identity_init,
        )
        if missing:
            rank_zero_info(
                f"NAMCallback: NAM added at {len(missing)} site(s) ({len(sites)} in all); "
                f"L1 penalty {self.lambda_:g} on targets={self.targets!r}."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning leaves gradients scaled for optimizers that unscale inside step() (fused).
        scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = float(scaler.get_scale())
        if self._decay is not None:
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._decay_step(trainer, pl_module, optimizer)
            self._decay.add_to_gradients_(stepped, scale)
            return
        if self.lambda_ == 0:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        add_l1_subgradient_(self._penalised(pl_module, params), self.lambda_ * scale)

    def _penalised(
        self, pl_module: pl.LightningModule, params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The targeted scale factors among the stepped parameters ``params``. Walking the
        modules costs about 2 us a module, each step: the answer is kept while the same module's
        optimizer steps the same tensors (pruning replaces them)."""
        kept = self._penalised_for
        if (
            kept is None
            or kept[0] is not pl_module
            or len(kept[1]) != len(params)
            or any(a is not b for a, b in zip(kept[1], params, strict=True))
        ):
            stepped = {id(p) for p in params}
            factors = [p for p in scale_factors(pl_module, self.targets) if id(p) in stepped]
            kept = self._penalised_for = (pl_module, params, factors)
        return kept[2]

    def _decay_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Plan, measure and set lambda (once per optimizer step; see PlannedDecay)."""
        assert self._decay is not None
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "`lambda_='auto'` schedules the penalty over the training, so the number of "
                "steps must be known: set `max_steps`, or `max_epochs` with a sized dataloader."
            )
        self._decay.step(
            pl_module,
            lambda: self._example_batch(pl_module)[:1],
            trainer.global_step,
            int(total),
            broadcast=lambda plan: trainer.strategy.broadcast(plan, src=0),
            optimizer=optimizer,
        )
        self.lambda_ = self._decay.auto.lambda_

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.prune is not None and self._example is None:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(inputs, torch.Tensor):
                self._example = inputs.detach().clone()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._penalised_for = None  # lets the trained parameters go
        if self.prune is None:
            return
        self._check_finite(pl_module)
        # one batch for every rank: what removed channels contribute is measured on it
        example = trainer.strategy.broadcast(self._example_batch(pl_module), src=0)
        self.report = self.prune.apply(pl_module, on_device_of(example, pl_module))
        history = pruning_passes(pl_module)[-1].history
        digest = hashlib.sha256(json.dumps(history).encode()).hexdigest()
        agreed = digest == trainer.strategy.broadcast(digest, src=0)
        if not trainer.strategy.reduce_boolean_decision(agreed, all=True):
            raise RuntimeError(
                "NAMCallback: the ranks pruned different channels (their BatchNorm scale "
                "factors differ), so the models are no longer replicas; nothing was saved."
            )
        copy_from_rank_zero(pl_module)
        self.pruned_path = self._save_pruned(trainer)
        saved = (
            f"Saved {self.pruned_path}"
            if self.pruned_path is not None
            else "Not saved (checkpointing is off): save it with trainer.save_checkpoint(path)."
        )
        rank_zero_info(f"NAMCallback: pruned the model\n{self.report.table()}\n{saved}")
        metrics = {
            "prune/params_ratio": self.report.params_ratio,
            "prune/flops_ratio": self.report.flops_ratio,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.log_on == "step":
            self._log(pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_finite(pl_module)
        if self.log_on == "epoch":
            self._log(pl_module, on_step=False)

    def _save_pruned(self, trainer: pl.Trainer) -> Path | None:
        """Drop the optimizer state (it belongs to the unpruned parameters, so no later
        ``trainer.save_checkpoint`` can write it with the pruned model) and save the pruned
        model, weights and record, next to the trainer's checkpoints (none when checkpointing
        is off)."""
        trainer.strategy.optimizers = []
        trainer.strategy.lr_scheduler_configs = []
        checkpointing = trainer.checkpoint_callback
        if checkpointing is None:
            return None
        dirpath = getattr(checkpointing, "dirpath", None) or trainer.default_root_dir
        path = Path(dirpath) / "pruned.ckpt"
        version = 0
        while path.exists():  # an earlier fit's pruned model is kept
            version += 1
            path = Path(dirpath) / f"pruned-v{version}.ckpt"
        pl_module = trainer.lightning_module
        checkpoint = {  # as Lightning's weights-only checkpoint, with this callback's entry
            "pytorch-lightning_version": pl.__version__,
            "state_dict": pl_module.state_dict(),
            pl_module.CHECKPOINT_HYPER_PARAMS_KEY: dict(pl_module.hparams),
            # makes Lightning call on_load_checkpoint on a resume, which then refuses it
            "callbacks": {self.state_key: {"pruned_at_end": True}},
        }
        trainer.strategy.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("NAMCallback.save_pruned")
        return path

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING or not checkpoint.get("state_dict"):
            return
        pruned = saved_pruning_passes(checkpoint["state_dict"])
        if pruned and not checkpoint.get("optimizer_states"):
            raise RuntimeError(
                "NAMCallback: this checkpoint holds a model pruned at the end of training, "
                "without optimizer state (the old state had the unpruned shapes), so training "
                "cannot resume from it. Fine-tune it with a new fit instead: "
                "`model = nam_lightning.load_checkpoint(MyModule, path)` then "
                "`trainer.fit(model)` without `ckpt_path`."
            )

    def _example_batch(self, pl_module: pl.LightningModule) -> Any:
        """The batch pruning traces: ``example_input_array``, else the first training input."""
        example = pl_module.example_input_array
        if example is None:
            example = self._example
        if example is None:
            raise ValueError(
                "NAMCallback(prune=...) needs an example batch: set `example_input_array` on "
                "the LightningModule, or train on batches whose first element is the input."
            )
        return on_device_of(example, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self._decay is None else self._decay.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._decay is not None and "auto" in state_dict:
            self._decay.load_state_dict(state_dict)
            self.lambda_ = self._decay.auto.lambda_

    def _check_finite(self, pl_module: pl.LightningModule) -> None:
        """Stop when a scale factor is NaN or inf, before it spreads (once per epoch)."""
        bad = non_finite(pl_module, self.targets)
        if bad:
            raise RuntimeError(
                f"NAMCallback: BatchNorm scale factors became NaN or inf ({', '.join(bad[:5])}); "
                "training diverged, so it is stopped here rather than pruned or saved further. "
                "Lower the learning rate or `lambda_`, or resume from an earlier checkpoint."
            )

    @torch.no_grad()
    def _log(self, pl_module: pl.LightningModule, on_step: bool) -> None:
        params = scale_factors(pl_module, self.targets)
        metrics: dict[str, Any] = {"nam/sparsity": sparsity(params, self.sparsity_threshold)}
        if self._decay is None:
            metrics["nam/l1_penalty"] = self.lambda_ * l1_norm(params)
        else:
            metrics["nam/lambda"] = self.lambda_ if self._decay.active else 0.0
            if self._decay.share is not None:
                metrics["nam/pruned_mass"] = self._decay.share
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=on_step, on_epoch=not on_step)


def _configure_then_inject(
    configure_model: Callable[[], None],
    callback: NAMCallback,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
) -> None:
    try:
        configure_model()
    finally:
        del pl_module.configure_model  # back to the class's method; drops our references
    callback._inject(trainer, pl_module)
