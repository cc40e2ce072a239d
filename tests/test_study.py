"""``NAMCallback(nam=False)`` and the ``nam-lightning study`` command (nam_lightning.study,
study_units, study_report).

A tiny study (one epoch of two batches of digits, 2 variants x 2 seeds x 1 FLOPs target; the
penalised variant under the automatic lambda, so trained once per target) runs once for the
module, as the command in a subprocess; the tests read its directory, start it again in this
process, and kill a second copy of it halfway. The variants themselves are checked against
reference formulations in this process.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import matplotlib.image
import pytest
import torch
from cli_helpers import TINY, cli, usage_error
from lightning_helpers import LAMBDA, Classifier, assert_same_params, fit, tensors, trainer_kwargs

from nam_lightning import AutoLambda, NAMCallback, NAMSite, PruneConfig, load_checkpoint
from nam_lightning.data import DigitsDataModule
from nam_lightning.kernels import Kernel
from nam_lightning.models import ImageClassifier
from nam_lightning.study import plan, run_study
from nam_lightning.study_units import VARIANTS, UnitRunner, aimed_variants, variant_callback

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def eager_kernels() -> Iterator[None]:
    """NAM's kernels run eagerly in this module's fits, as in its subprocesses
    (``NAM_LIGHTNING_COMPILE=0``): compiling them takes longer than these tiny fits and
    changes nothing that is tested here."""
    with mock.patch.object(Kernel, "__call__", lambda self, *args: self.fn(*args)):
        yield


REPO = Path(__file__).resolve().parents[1]
TINY_STUDY = [
    *TINY,
    "--data.batch_size=16",
    "--variants=[baseline,nam+l1]",
    "--seeds=[0,1]",
    "--flops_targets=[0.4]",
    "--finetune_epochs=1",
]
# baseline trains once per seed; nam+l1 (automatic lambda) once per seed and FLOPs target
TRAININGS = ["baseline/seed0", "nam+l1/seed0/flops0.4", "baseline/seed1", "nam+l1/seed1/flops0.4"]
RUNS = [
    "baseline/seed0/flops0.4",
    "nam+l1/seed0/flops0.4",
    "baseline/seed1/flops0.4",
    "nam+l1/seed1/flops0.4",
]


# NAMCallback(nam=False): the L1 penalty (and pruning) without NAM, i.e. Network Slimming.


@pytest.mark.parametrize("targets", ["bn", "all"])
def test_nam_false_penalises_the_backbone_and_adds_no_nam(targets: str) -> None:
    model = fit({}, NAMCallback(LAMBDA, nam=False, targets=targets))
    assert not any(isinstance(m, NAMSite) for m in model.modules())
    # "all" on a network without NAM is "bn": the loss term on the backbone's gammas.
    reference = fit({"reference_lambda": LAMBDA, "targets": "bn"}, None)
    assert_same_params(tensors(model), tensors(reference))
    # The comparison can fail: without the penalty the parameters differ.
    plain = fit({}, None)
    assert not torch.allclose(tensors(model)["net.1.weight"], tensors(plain)["net.1.weight"])


def test_nam_false_prunes_at_the_end_of_fit() -> None:
    callback = NAMCallback(LAMBDA, nam=False, targets="bn", prune=0.5)
    model = fit({}, callback)
    assert (
        callback.report is not None and callback.report.flops_after < callback.report.flops_before
    )
    assert callback.report.params_after == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, NAMSite) for m in model.modules())
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": "nam"}, ValueError, r"`nam=False` adds no NAM, so targets='nam' has nothing"),
        ({"spatial": True}, ValueError, r"`nam=False` adds no NAM, so spatial=True has nothing"),
        ({"sites": ["net.3.bn2"]}, ValueError, r"`nam=False` adds no NAM, so `sites` has nothing"),
        ({"nam": "no"}, TypeError, r"`nam` must be a bool \(True or False\), got 'no'"),
    ],
)
def test_nam_false_refuses_nam_options(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        NAMCallback(**{"nam": False, **kwargs})


def test_nam_false_without_batchnorm_fails_before_training() -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    model.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    trainer = pl.Trainer(callbacks=[NAMCallback(nam=False)], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"`nam=False` with `targets='all'` selects no BatchNorm"):
        trainer.fit(model)
    assert trainer.global_step == 0


# The study's variants: each trains exactly as its reference formulation written here.

REFERENCES = {
    "baseline": {},  # no NAM, no penalty
    "nam": {"inject": True},  # NAM, no penalty
    "slimming": {"reference_lambda": LAMBDA, "targets": "bn"},  # no NAM
    "nam+l1": {"inject": True, "reference_lambda": LAMBDA, "targets": "all"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_as_its_reference(variant: str) -> None:
    # The command line gives every NAMCallback argument; the variant overrides its own.
    options = {"lambda_": LAMBDA, "targets": "all", "sites": "auto", "spatial": False}
    model = fit({}, variant_callback(variant, options))
    has_nam = any(isinstance(m, NAMSite) for m in model.modules())
    assert has_nam == (variant in ("nam", "nam+l1"))
    assert_same_params(tensors(model), tensors(fit(dict(REFERENCES[variant]), None)))


AIMED = {"slimming": {"nam": False, "targets": "bn"}, "nam+l1": {"targets": "all"}}


@pytest.mark.parametrize("variant", list(AIMED))
def test_aimed_variant_trains_as_the_automatic_lambda_for_its_target(variant: str) -> None:
    # --nam.lambda_ auto: the penalised variants are aimed at the pruning and end with it
    # (the study's is a FLOPs target; this network is too small to meet one within 2%).
    prune = PruneConfig(amount=0.5)
    options = {"lambda_": "auto", "targets": "all", "sites": "auto", "spatial": False}
    callback = variant_callback(variant, options, prune)
    assert isinstance(callback.auto, AutoLambda) and callback.prune == prune
    model = fit({}, callback)
    reference = NAMCallback("auto", prune=prune, **AIMED[variant])
    assert_same_params(tensors(model), tensors(fit({}, reference)))
    assert callback.report is not None and callback.report.removed_channels > 0
    assert any(isinstance(m, NAMSite) for m in model.modules()) == (variant == "nam+l1")


def test_only_the_automatic_lambda_trains_once_per_target() -> None:
    assert aimed_variants(list(VARIANTS), {"lambda_": "auto"}) == ["slimming", "nam+l1"]
    assert aimed_variants(list(VARIANTS), {"lambda_": AutoLambda()}) == ["slimming", "nam+l1"]
    assert aimed_variants(list(VARIANTS), {"lambda_": LAMBDA}) == []


def test_plan_shares_only_unpenalised_trainings_among_targets() -> None:
    units = plan(["baseline", "nam+l1"], [0, 1], [0.4, 0.2], aimed=["nam+l1"])
    # trainings: 1 variant x 2 seeds + 1 variant x 2 seeds x 2 targets; runs: 2 x 2 x 2
    assert len(units) == 2 + 4 + 8
    assert [(u.key, u.training and u.training.key) for u in units[:7]] == [
        ("baseline/seed0", None),
        ("baseline/seed0/flops0.4", "baseline/seed0"),
        ("baseline/seed0/flops0.2", "baseline/seed0"),
        ("nam+l1/seed0/flops0.4", None),
        ("nam+l1/seed0/flops0.4", "nam+l1/seed0/flops0.4"),
        ("nam+l1/seed0/flops0.2", None),
        ("nam+l1/seed0/flops0.2", "nam+l1/seed0/flops0.2"),
    ]
    assert [u.key for u in plan(["nam+l1"], [0], [0.4, 0.2])] == [
        "nam+l1/seed0",
        "nam+l1/seed0/flops0.4",
        "nam+l1/seed0/flops0.2",
    ]  # a fixed lambda: one training for both targets


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"finetune_lr": 0.0}, ValueError, r"`finetune_lr` must be a finite float > 0, got 0.0"),
        ({"finetune_lr": "0.1"}, TypeError, r"`finetune_lr` must be a float, got str"),
        ({"finetune_epochs": 0}, ValueError, r"`finetune_epochs` must be an int >= 1, got 0"),
        ({"finetune_epochs": 1.5}, TypeError, r"`finetune_epochs` must be an int, got 1.5"),
    ],
)
def test_run_study_refuses_bad_fine_tuning_before_any_work(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    arguments: dict[str, Any] = {
        "run_dir": tmp_path / "new",
        "settings": {},
        "trainer_kwargs": {},
        "nam_options": {},
        "pruning": PruneConfig(flops_target=0.4),
        "variants": ["baseline"],
        "seeds": [0],
        "flops_targets": [0.4],
        "finetune_epochs": 1,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        run_study(ImageClassifier(), DigitsDataModule(), **arguments)
    assert not (tmp_path / "new").exists()


# The command, on tiny settings.


def start_study(run_dir: Path) -> subprocess.Popen[bytes]:
    """``nam-lightning study`` on the tiny settings in a new process, its output in
    ``run_dir.log``. NAM's kernels run eagerly there (``NAM_LIGHTNING_COMPILE=0``): compiling
    them takes longer than these tiny runs and changes nothing that is tested."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NAM_LIGHTNING_COMPILE": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "nam_lightning.cli", "study", *TINY_STUDY]
    with open(f"{run_dir}.log", "wb") as log:
        return subprocess.Popen(
            [*command, f"--run_dir={run_dir}"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def finish(process: subprocess.Popen[bytes], run_dir: Path) -> None:
    process.wait(timeout=300)
    assert process.returncode == 0, Path(f"{run_dir}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny") / "study"
    finish(start_study(run_dir), run_dir)
    return run_dir


def read_study(run_dir: Path) -> dict[str, Any]:
    study: dict[str, Any] = json.loads((run_dir / "study.json").read_text())
    return study


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_tiny_study_writes_every_run_and_the_three_artifacts(study_dir: Path) -> None:
    study = read_study(study_dir)
    assert sorted(study["trainings"]) == sorted(TRAININGS)
    assert sorted(study["runs"]) == sorted(RUNS)
    for key, run in study["runs"].items():
        trained = study["trainings"][run["training"]]
        assert run["training"] == (key if run["variant"] == "nam+l1" else key.rsplit("/", 1)[0])
        assert 0 <= run["pruned_acc"] <= 1 and 0 <= run["finetuned_acc"] <= 1
        assert run["params"] < trained["params"]
        assert run["flops"] / trained["flops"] == pytest.approx(0.4, abs=0.02)
        assert run["latency_ms"] > 0 and run["unpruned_latency_ms"] > 0
    # The penalty is the variant's: none for baseline; nam+l1 (--nam.lambda_ auto, the
    # default) records the automatic lambda's final value.
    for key, trained in study["trainings"].items():
        assert trained["auto"] == key.startswith("nam+l1"), key
        assert (trained["lambda_"] > 0) == trained["auto"], key
    image = matplotlib.image.imread(study_dir / "pareto.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert (study_dir / "config.yaml").is_file()


def test_checkpoints_of_the_trainings(study_dir: Path) -> None:
    """Each training's model is saved before the callback prunes it (NAM only in nam+l1's);
    an aimed training also saves the model its callback pruned, which its run fine-tunes."""
    study = read_study(study_dir)
    for variant, name in (("baseline", "baseline-seed0"), ("nam+l1", "nam+l1-seed0-flops0.4")):
        state = torch.load(study_dir / "trained" / f"{name}.ckpt", weights_only=True)
        assert any(".nam." in k for k in state["state_dict"]) == (variant == "nam+l1"), variant
    trained = load_checkpoint(ImageClassifier, study_dir / "trained" / "nam+l1-seed0-flops0.4.ckpt")
    pruned = load_checkpoint(
        ImageClassifier, study_dir / "trained" / "nam+l1-seed0-flops0.4-pruned.ckpt"
    )
    record = study["trainings"]["nam+l1/seed0/flops0.4"]
    assert sum(p.numel() for p in trained.parameters()) == record["params"]
    # unpruned: the backbone's FLOPs are those of the baseline's unpruned model
    assert record["flops"] == study["trainings"]["baseline/seed0"]["flops"]
    run = study["runs"]["nam+l1/seed0/flops0.4"]
    assert sum(p.numel() for p in pruned.parameters()) == run["params"]
    assert not (study_dir / "trained" / "baseline-seed0-pruned.ckpt").exists()


def test_table_is_mean_and_std_over_seeds(study_dir: Path) -> None:
    study = read_study(study_dir)
    table = (study_dir / "study.md").read_text()
    for variant in ("baseline", "nam+l1"):
        runs = [study["runs"][f"{variant}/seed{s}/flops0.4"] for s in (0, 1)]
        trained = [study["trainings"][r["training"]] for r in runs]
        cells = [
            mean_std([100 * t["test_acc"] for t in trained]),
            mean_std([100 * r["pruned_acc"] for r in runs]),
            mean_std([100 * r["finetuned_acc"] for r in runs]),
        ]
        accuracy = " | ".join(f"{m:.2f} +- {s:.2f}" for m, s in cells)
        lam_mean, lam_std = mean_std([t["lambda_"] for t in trained])
        lam = f"{lam_mean:.2g} +- {lam_std:.1g}" if variant == "nam+l1" else "0"
        params = f"{(runs[0]['params'] + runs[1]['params']) / 2:,.0f}"
        mflops = f"{sum(r['flops'] / r['images'] for r in runs) / 2e6:.2f}"
        row = f"| 0.4 | {variant} | 2 | {lam} | {accuracy} | {params} | {mflops} |"
        assert row in table, table


def test_started_again_on_a_finished_study_trains_nothing(study_dir: Path) -> None:
    before = read_study(study_dir)
    stamps = {p: p.stat().st_mtime_ns for p in (study_dir / "trained").iterdir()}
    refuse = {"side_effect": AssertionError("a unit ran again")}
    with (
        mock.patch.object(UnitRunner, "train", **refuse),
        mock.patch.object(UnitRunner, "prune_and_finetune", **refuse),
    ):
        cli("study", *TINY_STUDY, f"--run_dir={study_dir}")
    after = read_study(study_dir)
    assert after["trainings"] == before["trainings"] and after["runs"] == before["runs"]
    assert {p: p.stat().st_mtime_ns for p in (study_dir / "trained").iterdir()} == stamps


def test_other_settings_are_refused_and_change_nothing(study_dir: Path) -> None:
    before = {p: p.read_bytes() for p in study_dir.rglob("*") if p.is_file()}
    message = usage_error(
        "study",
        *TINY_STUDY,
        "--trainer.max_epochs=2",
        "--nam.lambda_=0.1",
        f"--run_dir={study_dir}",
    )
    assert "holds a study with other settings" in message
    assert "nam.lambda_: 'auto' -> 0.1" in message and "trainer.max_epochs: 1 -> 2" in message
    assert {p: p.read_bytes() for p in study_dir.rglob("*") if p.is_file()} == before


def test_a_directory_of_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "report.md").write_text("a run's report")
    message = usage_error("study", *TINY_STUDY, f"--run_dir={tmp_path}")
    assert "holds files (report.md) but no study.json" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ("--seeds=[0,0]", r"`seeds` must not repeat a value, got \[0, 0\]"),
        ("--flops_targets=[1.5]", r"`flops_targets` must be fractions .* in \(0, 1\), got \[1.5\]"),
        ("--variants=[]", r"`variants` must be a non-empty list"),
        ("--pruning.importance=nam", r"`pruning.importance` must be 'bn' in a study"),
        ("--pruning.amount=0.5", r"`pruning.amount` \(0.5\) does not apply to a study"),
    ],
)
def test_bad_study_options(tmp_path: Path, option: str, match: str) -> None:
    message = usage_error("study", *TINY_STUDY, option, f"--run_dir={tmp_path / 'new'}")
    assert re.search(match, message), message
    assert not (tmp_path / "new").exists()


def test_study_killed_halfway_completes_when_started_again(study_dir: Path, tmp_path: Path) -> None:
    """A copy of the tiny study in a subprocess is SIGKILLed as soon as its first aimed
    training (nam+l1, seed 0) is saved, before its run; started again, it runs only the rest
    (that run from the saved pruned model) and ends with the numbers of the unbroken study."""
    run_dir = tmp_path / "killed"
    process = start_study(run_dir)
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if (run_dir / "study.json").exists() and TRAININGS[1] in read_study(run_dir)["trainings"]:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, Path(f"{run_dir}.log").read_text()[-3000:]
    killed = read_study(run_dir)
    assert TRAININGS[1] not in killed["runs"], "killed too late: the aimed run was done"
    done = [*killed["trainings"], *killed["runs"]]
    assert len(done) < len(TRAININGS) + len(RUNS)
    trained = sorted((run_dir / "trained").iterdir())
    assert [p.name for p in trained] == [
        "baseline-seed0.ckpt",
        "nam+l1-seed0-flops0.4-pruned.ckpt",
        "nam+l1-seed0-flops0.4.ckpt",
    ]
    stamps = {p: p.stat().st_mtime_ns for p in trained}

    finish(start_study(run_dir), run_dir)
    resumed, unbroken = read_study(run_dir), read_study(study_dir)
    # the finished trainings were not redone
    assert {p: p.stat().st_mtime_ns for p in trained} == stamps
    fields = ("test_acc", "lambda_", "pruned_acc", "finetuned_acc", "params", "flops")
    for part in ("trainings", "runs"):
        assert sorted(resumed[part]) == sorted(unbroken[part])
        for key, record in resumed[part].items():
            expected = unbroken[part][key]
            for field in fields:
                assert record.get(field) == expected.get(field), (key, field)
    for name in ("study.md", "pareto.png"):
        assert (run_dir / name).is_file()
