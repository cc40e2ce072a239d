"""NAMCallback: the penalty is exact on every trainer configuration, checkpoints round-trip."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning_helpers import (
    LAMBDA,
    Classifier,
    ConfigureModelClassifier,
    assert_same_params,
    fit,
    tensors,
    trainer_kwargs,
)
from torch import nn

from nam_lightning import (
    NAM,
    AutoLambda,
    NAMCallback,
    NAMChannelAttention,
    NAMSite,
    PruneConfig,
    load_checkpoint,
    scale_factors,
)


def gradscaler_plugin() -> list[Any]:
    # On CPU, precision="16-mixed" silently becomes bf16; this forces the GradScaler path.
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]


CONFIGS = {
    "fp32": ({}, {}),
    "bf16-mixed": ({}, {"precision": "bf16-mixed"}),
    "16-mixed-gradscaler": ({}, {"plugins": gradscaler_plugin()}),
    "accumulate-and-clip": ({}, {"accumulate_grad_batches": 4, "gradient_clip_val": 0.05}),
    "fused-sgd": ({"fused": True}, {}),
    "fused-sgd-gradscaler": ({"fused": True}, {"plugins": gradscaler_plugin()}),
    "manual-optimization": ({"manual": True}, {}),
    "manual-two-optimizers": ({"manual": True, "two_optimizers": True}, {}),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_penalty_equals_loss_term(config: str) -> None:
    module_kwargs, trainer_overrides = CONFIGS[config]
    plugins = trainer_overrides.get("plugins")
    with_callback = fit(dict(module_kwargs), NAMCallback(LAMBDA), **trainer_overrides)
    if plugins:  # a GradScaler is stateful: use a fresh one for the reference run
        trainer_overrides = {**trainer_overrides, "plugins": gradscaler_plugin()}
    reference = fit(
        {**module_kwargs, "inject": True, "reference_lambda": LAMBDA}, None, **trainer_overrides
    )
    assert_same_params(tensors(with_callback), tensors(reference))
    # The comparison can fail: without the penalty the parameters differ.
    if trainer_overrides.get("plugins"):
        trainer_overrides = {**trainer_overrides, "plugins": gradscaler_plugin()}
    unpenalised = fit({**module_kwargs, "inject": True}, None, **trainer_overrides)
    gammas = [k for k in tensors(reference) if k.endswith("bn1.weight")]
    assert any(
        not torch.allclose(tensors(reference)[k], tensors(unpenalised)[k], atol=1e-4)
        for k in gammas
    )


@pytest.mark.parametrize("targets", ["nam", "bn"])
def test_targets_select_the_penalised_scale_factors(targets: str) -> None:
    with_callback = fit({}, NAMCallback(LAMBDA, targets=targets))
    reference = fit({"inject": True, "reference_lambda": LAMBDA, "targets": targets}, None)
    assert_same_params(tensors(with_callback), tensors(reference))


def test_nam_is_injected_before_the_optimizer_is_built() -> None:
    model = fit({}, NAMCallback(LAMBDA))
    sites = [m for m in model.modules() if isinstance(m, NAMSite)]
    assert len(sites) == 2
    optimizer_params = {
        id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]
    }
    for site in sites:
        assert id(site.nam.channel.bn.weight) in optimizer_params
        # NAM's BN trained: its running statistics moved away from their init.
        assert not torch.equal(
            site.nam.channel.bn.running_var, torch.ones_like(site.nam.channel.bn.running_var)
        )


def test_layers_built_in_configure_model_get_nam() -> None:
    model = fit({"cls": ConfigureModelClassifier}, NAMCallback(LAMBDA))
    assert sum(isinstance(m, NAMSite) for m in model.modules()) == 2
    optimizer_params = {
        id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]
    }
    nam_weights = [m.bn.weight for m in model.modules() if isinstance(m, NAMChannelAttention)]
    assert all(id(w) in optimizer_params for w in nam_weights)
    assert "configure_model" not in vars(model)  # the temporary wrapper is gone again


def test_logs_penalty_and_sparsity(tmp_path: Any) -> None:
    callback = NAMCallback(LAMBDA, sparsity_threshold=0.5)
    model = fit({}, callback, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1)
    metrics = model.trainer.callback_metrics
    gammas = [
        m.weight for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    expected_l1 = LAMBDA * sum(float(g.abs().sum()) for g in gammas)
    assert math.isclose(float(metrics["nam/l1_penalty"]), expected_l1, rel_tol=1e-5)
    all_gammas = torch.cat([g.detach().flatten() for g in gammas])
    expected_sparsity = float((all_gammas.abs() < 0.5).float().mean())
    assert math.isclose(float(metrics["nam/sparsity"]), expected_sparsity, rel_tol=1e-6)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "nam/l1_penalty" in header and "nam/sparsity" in header


def test_resume_matches_uninterrupted_run(tmp_path: Any) -> None:
    steps = {"max_epochs": 2, "max_steps": -1}
    uninterrupted = fit({}, NAMCallback(LAMBDA), **steps)

    pl.seed_everything(0, verbose=False)
    first = Classifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    kwargs = trainer_kwargs(max_epochs=1, max_steps=-1, enable_checkpointing=True)
    pl.Trainer(callbacks=[NAMCallback(LAMBDA), checkpoint], **kwargs).fit(first)

    pl.seed_everything(0, verbose=False)
    resumed = Classifier()
    trainer = pl.Trainer(callbacks=[NAMCallback(LAMBDA)], **trainer_kwargs(**steps))
    trainer.fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == uninterrupted.trainer.global_step
    assert_same_params(tensors(resumed), tensors(uninterrupted))


@pytest.mark.parametrize("weights_only", [False, True])
def test_load_checkpoint_round_trip(tmp_path: Any, weights_only: bool) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=weights_only)
    pl.seed_everything(0, verbose=False)
    model = Classifier(lr=0.05)
    kwargs = trainer_kwargs(enable_checkpointing=True)
    pl.Trainer(callbacks=[NAMCallback(LAMBDA, spatial=True), checkpoint], **kwargs).fit(model)

    loaded = load_checkpoint(Classifier, tmp_path / "last.ckpt")
    assert loaded.hparams.lr == 0.05  # hyperparameters come from the checkpoint
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert sum(isinstance(m, NAMSite) for m in loaded.modules()) == 2
    assert loaded.net[3].bn2.nam.spatial.size == (8, 8)

    overridden = load_checkpoint(Classifier, tmp_path / "last.ckpt", lr=0.5)
    assert overridden.hparams.lr == 0.5

    # Without the helper, Lightning builds the class as written (no NAM) and loads strictly.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Classifier.load_from_checkpoint(tmp_path / "last.ckpt")


def test_load_checkpoint_of_model_built_in_configure_model(tmp_path: Any) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.seed_everything(0, verbose=False)
    model = ConfigureModelClassifier()
    kwargs = trainer_kwargs(enable_checkpointing=True)
    pl.Trainer(callbacks=[NAMCallback(LAMBDA), checkpoint], **kwargs).fit(model)
    loaded = load_checkpoint(ConfigureModelClassifier, tmp_path / "last.ckpt")
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_spatial_needs_example_input_array() -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    model.example_input_array = None
    trainer = pl.Trainer(callbacks=[NAMCallback(spatial=True)], **trainer_kwargs())
    with pytest.raises(ValueError, match="example_input_array"):
        trainer.fit(model)
    assert not any(isinstance(m, NAMSite) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lambda_": -1e-4}, ValueError, r"`lambda_` must be a finite float >= 0, got -0.0001"),
        ({"lambda_": float("nan")}, ValueError, r"`lambda_` must be a finite float >= 0"),
        ({"lambda_": float("inf")}, ValueError, r"`lambda_` must be a finite float >= 0"),
        ({"lambda_": "1e-4"}, TypeError, r"`lambda_` must be a float >= 0 or 'auto', got str"),
        ({"lambda_": True}, TypeError, r"`lambda_` must be a float, got bool"),
        ({"targets": "gamma"}, ValueError, r"`targets` must be one of \('nam', 'bn', 'all'\)"),
        ({"sites": "everywhere"}, ValueError, r"`sites` must be 'auto', a non-empty list"),
        ({"sites": []}, ValueError, r"`sites` must be 'auto', a non-empty list"),
        ({"sites": [1, 2]}, TypeError, r"`sites` must be 'auto'"),
        ({"spatial": "yes"}, TypeError, r"`spatial` must be a bool"),
        ({"detach_weights": 1}, TypeError, r"`detach_weights` must be a bool"),
        ({"sparsity_threshold": 0}, ValueError, r"`sparsity_threshold` must be a finite float > 0"),
        ({"sparsity_threshold": float("inf")}, ValueError, r"`sparsity_threshold`"),
        ({"log_on": "batch"}, ValueError, r"`log_on` must be 'step' or 'epoch', got 'batch'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        NAMCallback(**kwargs)


def test_model_without_sites_fails_before_training() -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    model.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    trainer = pl.Trainer(callbacks=[NAMCallback()], **trainer_kwargs())
    with pytest.raises(ValueError, match="No NAM site found"):
        trainer.fit(model)
    assert trainer.global_step == 0


def test_targets_without_scale_factors_fail_before_training() -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight = None
    trainer = pl.Trainer(callbacks=[NAMCallback(targets="bn")], **trainer_kwargs())
    with pytest.raises(ValueError, match="selects no BatchNorm scale factor"):
        trainer.fit(model)


@pytest.mark.parametrize("example_array", [True, False])
def test_prune_at_end_of_fit_then_finetune(example_array: bool) -> None:
    callback = NAMCallback(LAMBDA, prune=PruneConfig(amount=0.5, round_to=2))
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    if not example_array:  # then the first training batch is the example
        model.example_input_array = None
    pl.Trainer(callbacks=[callback], **trainer_kwargs()).fit(model)
    report = callback.report
    assert report is not None and report.flops_after < report.flops_before
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert all(c % 2 == 0 for c in report.channels_after.values() if c != 10)
    x = torch.randn(4, 3, 8, 8)
    assert model(x).shape == (4, 10)

    # Fine-tuning is a new fit, with the callback (without pruning) or without it.
    for callbacks in ([NAMCallback(LAMBDA)], []):
        before = tensors(model)
        trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs())
        trainer.fit(model)
        assert trainer.global_step == 6
        after = tensors(model)
        assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
        assert not torch.equal(after["net.7.weight"], before["net.7.weight"])


def test_the_penalised_scale_factors_follow_the_optimizer_and_the_module() -> None:
    """The callback keeps the list of penalised scale factors between steps: parameters
    replaced as pruning replaces them, with an optimizer over the new ones, or another module,
    and the list is found again."""
    callback = NAMCallback(0.5)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace())  # no GradScaler

    def penalised(model: nn.Module) -> dict[int, torch.Tensor]:
        """The gradients the penalty alone gives, by parameter id (zero ones left out)."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        callback.on_before_optimizer_step(trainer, model, optimizer)  # type: ignore[arg-type]
        grads = {id(p): p.grad for p in model.parameters()}
        return {k: g for k, g in grads.items() if g is not None and g.any()}

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), NAM(4))
    for _ in range(2):  # a new optimizer over the same parameters: the same list
        assert set(penalised(model)) == {id(p) for p in scale_factors(model)} != set()
    model[1].weight = nn.Parameter(torch.tensor([-2.0, 0.0, 3.0, -1.0]))  # as pruning does
    grads = penalised(model)
    assert set(grads) == {id(p) for p in scale_factors(model)}
    assert torch.equal(grads[id(model[1].weight)], torch.tensor([-0.5, 0.0, 0.5, -0.5]))
    other = nn.Sequential(nn.BatchNorm2d(2))
    assert set(penalised(other)) == {id(other[0].weight)}
    # the same parameters seen through another module: NAM's BatchNorm, alone, is no NAM
    callback = NAMCallback(0.5, targets="nam")
    nam = NAM(3)
    assert set(penalised(nam)) == {id(nam.channel.bn.weight)}
    assert penalised(nam.channel.bn) == {}


@pytest.mark.parametrize(
    ("prune", "error", "match"),
    [
        (1.5, ValueError, r"`prune`, a fraction of channels to remove, must be in \(0, 1\)"),
        (0, ValueError, r"`prune`, a fraction .* must be in \(0, 1\) .*, got 0$"),
        ("half", TypeError, r"`prune` must be None, a fraction of channels to remove or a"),
        (True, TypeError, r"`prune` must be None"),
    ],
)
def test_bad_prune_argument(prune: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        NAMCallback(prune=prune)


class Diverging(Classifier):
    """A run whose first BatchNorm scale factor turns NaN on its third step."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx == 2:
            with torch.no_grad():
                self.net[1].weight[0] = float("nan")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("prune", [None, 0.5])
def test_non_finite_scale_factors_stop_training_with_a_clear_message(prune: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = Diverging()
    trainer = pl.Trainer(
        callbacks=[NAMCallback(LAMBDA, prune=prune)], **trainer_kwargs(max_steps=-1, max_epochs=2)
    )
    with pytest.raises(RuntimeError, match=r"became NaN or inf \(net\.1\.weight"):
        trainer.fit(model)
    assert trainer.current_epoch == 0  # stopped at the end of the first epoch
    assert model.net[1].weight.shape == (8,)  # and never pruned


def test_pruned_model_is_saved_without_optimizer_state_and_cannot_be_resumed(
    tmp_path: Any,
) -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    callback = NAMCallback(LAMBDA, prune=0.5)
    kwargs = trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer = pl.Trainer(callbacks=[callback, ModelCheckpoint(dirpath=tmp_path)], **kwargs)
    trainer.fit(model)
    assert callback.pruned_path == tmp_path / "pruned.ckpt"
    saved = torch.load(callback.pruned_path, weights_only=True)
    assert "optimizer_states" not in saved
    assert {k: v.shape for k, v in tensors(model).items()} == {
        k: v.shape for k, v in saved["state_dict"].items() if torch.is_tensor(v)
    }
    # A checkpoint written after the pruning holds no optimizer state of the unpruned shapes.
    trainer.save_checkpoint(tmp_path / "later.ckpt")
    assert torch.load(tmp_path / "later.ckpt", weights_only=True)["optimizer_states"] == []

    for path in (callback.pruned_path, tmp_path / "later.ckpt"):
        rebuilt = load_checkpoint(Classifier, path)
        before = tensors(rebuilt)
        resume = pl.Trainer(callbacks=[NAMCallback(LAMBDA)], **trainer_kwargs())
        with pytest.raises(RuntimeError, match=r"Fine-tune it with a new fit instead"):
            resume.fit(rebuilt, ckpt_path=path)
        assert resume.global_step == 0
        for key, value in tensors(rebuilt).items():
            assert torch.equal(value, before[key]), key
    # A second pruning fit keeps the first file.
    model2 = Classifier()
    callback2 = NAMCallback(LAMBDA, prune=0.5)
    trainer2 = pl.Trainer(callbacks=[callback2, ModelCheckpoint(dirpath=tmp_path)], **kwargs)
    trainer2.fit(model2)
    assert callback2.pruned_path == tmp_path / "pruned-v1.ckpt"


def test_auto_lambda_moves_lambda_and_prunes(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    auto = AutoLambda(warmup=0.1, replan=0.5)
    callback = NAMCallback(auto, prune=PruneConfig(amount=0.5))
    logger = CSVLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        callbacks=[callback], **trainer_kwargs(max_steps=6, logger=logger, log_every_n_steps=1)
    )
    trainer.fit(model)
    assert callback.lambda_ == auto.lambda_ != 1e-2  # moved from its start
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["nam/lambda"] for r in rows if r.get("nam/pruned_mass")]  # logged once planned
    assert callback.report is not None and callback.report.flops_ratio < 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lambda_": "auto"}, ValueError, r"`lambda_='auto'` .* needs `prune`"),
        ({"lambda_": "automatic"}, TypeError, r"`lambda_` must be a float >= 0 or 'auto'"),
        ({"lambda_": AutoLambda()}, ValueError, r"needs `prune`"),
    ],
)
def test_bad_auto_lambda_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        NAMCallback(**kwargs)
