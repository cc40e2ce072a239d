"""``nam-lightning study``: does NAM + L1 give a better model at equal FLOPs than the simpler
alternatives, beyond the spread between seeds? The plan of its units, running them, resuming.

For each variant, seed and FLOPs target: train, prune to the target, test, fine-tune, test.
The variants (:data:`~nam_lightning.study_units.VARIANTS`) differ only in the
:class:`~nam_lightning.NAMCallback` of their training; every one is pruned the same way
(backbone BatchNorm ``|gamma|``, one global threshold) and fine-tuned without penalty, as
``nam-lightning run`` fine-tunes:

- ``baseline``: no NAM, no penalty (pruning a normally trained network);
- ``nam``: NAM, no penalty (what the attention alone does);
- ``slimming``: L1 on the backbone BatchNorms, no NAM (Network Slimming, Liu et al. 2017);
- ``nam+l1``: NAM and the penalty (this library's default).

A training without penalty is shared by all FLOPs targets of its variant and seed (each
target prunes a copy of it). A penalised variant under the automatic lambda trains once per
target, aimed at it (:mod:`~nam_lightning.study_units`).

The run directory holds ``study.json`` (the settings and every finished unit of work),
``trained/``, ``logs/``, and the rendered ``study.md`` and ``pareto.png``
(:mod:`~nam_lightning.study_report`). Each finished unit (a training, or a pruned and
fine-tuned run) is written at once, to a temporary file renamed over the old one, so a study
killed at any point resumes where it stopped when started again on its directory; the
settings that decide the numbers (:func:`study_settings`) must then be the same. Which
variants, seeds and targets are run may change: finished units are reused and the table
shows the ones asked for.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from .checks import check_finite_float
from .models import ImageClassifier
from .pruning import PruneConfig
from .study_report import duration, render_markdown, summarize, write_pareto
from .study_units import VARIANTS, Unit, UnitRunner, aimed_variants, checkpoints

_STUDY_JSON = "study.json"
_LOCK = "study.lock"
_CONFIG = "config.yaml"  # written by the command line; allowed in a new study's directory
_FORMAT = 2

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


def plan(
    variants: Sequence[str],
    seeds: Sequence[int],
    targets: Sequence[float],
    aimed: Collection[str] = (),
) -> list[Unit]:
    """Every unit of the study in the order it runs: seed by seed, each variant's training
    followed by its pruned runs (so a study stopped early has whole seeds). The ``aimed``
    variants train once per target, each training followed by its run; the others train
    once for all targets."""
    units = []
    for seed in seeds:
        for variant in variants:
            if variant in aimed:
                for target in map(float, targets):
                    training = Unit(variant, seed, target)
                    units += [training, Unit(variant, seed, target, training)]
            else:
                training = Unit(variant, seed)
                units += [training, *(Unit(variant, seed, float(t), training) for t in targets)]
    return units


def study_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """What decides each run's numbers, from the command's configuration (a plain dict with
    ``model``, ``data``, ``trainer``, ``nam``, ``pruning``, ``finetune_epochs`` and
    ``finetune_lr``); a study
    resumes only with the same. Display and logging options are left out, and so are the
    variants, seeds and targets (they select runs; they do not change one)."""
    settings = {
        key: config[key]
        for key in ("model", "data", "trainer", "nam", "pruning", "finetune_epochs", "finetune_lr")
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
    saved = path / _STUDY_JSON
    if not saved.exists():
        others = [p.name for p in path.iterdir()] if path.exists() else []
        others = sorted(name for name in others if name not in (_CONFIG, _LOCK))
        if others:
            raise FileExistsError(
                f"--run_dir {path} holds files ({', '.join(others[:3])}) but no {_STUDY_JSON}: it "
                "is not a study's directory. Pick a new or empty directory."
            )
        return {"format": _FORMAT, "settings": settings, "trainings": {}, "runs": {}}
    try:
        study = json.loads(saved.read_text())
        if study.get("format") != _FORMAT:
            raise ValueError(
                f"format {study.get('format')!r}, not {_FORMAT}: written by another version "
                "of nam-lightning; start a new study in another --run_dir"
            )
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"--run_dir {path}: {_STUDY_JSON} cannot be read ({err})") from err
    changed = _differences(study["settings"], settings)
    if changed:
        raise ValueError(
            f"--run_dir {path} holds a study with other settings ({'; '.join(changed[:6])}): "
            f"resume it with its own (`nam-lightning --config {path / _CONFIG}`), or "
            "start a new study in another --run_dir."
        )
    return dict(study)


def run_study(
    model: ImageClassifier,
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
    finetune_lr: float = 0.01,
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
        nam_options: NAMCallback arguments, under each variant's own. With ``lambda_="auto"``
            the penalised variants train once per FLOPs target.
        pruning: how to prune (the FLOPs target is each of ``flops_targets``).
        variants, seeds, flops_targets: the runs.
        finetune_epochs, finetune_lr: fine-tuning after pruning: its epochs, and the rate it
            starts at (cosine decay, no warm-up), as in ``nam-lightning run``.
        print_fn: where the progress lines go (default: standard output).
    """
    say = print_fn or functools.partial(print, flush=True)
    check_study_options(variants, seeds, flops_targets)
    check_finite_float("finetune_lr", finetune_lr)
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int):
        raise TypeError(f"`finetune_epochs` must be an int, got {finetune_epochs!r}")
    if finetune_epochs < 1:
        raise ValueError(f"`finetune_epochs` must be an int >= 1, got {finetune_epochs}")
    check_pruning(pruning)
    path = Path(run_dir)
    open_study(path, settings)  # refuse before creating anything
    path.mkdir(parents=True, exist_ok=True)
    runner = UnitRunner(
        model,
        datamodule,
        path,
        trainer_kwargs,
        nam_options,
        pruning,
        finetune_epochs,
        finetune_lr,
    )
    with _locked(path), _quiet_lightning():
        study = open_study(path, settings)
        units = plan(variants, seeds, flops_targets, aimed_variants(variants, nam_options))
        todo = _pending(study, units, path)
        if todo:  # the machine the numbers come from (the last one that ran units)
            study["machine"] = _machine()
        _write_json(path / _STUDY_JSON, study)
        trainings = sum(u.training is None for u in units)
        say(
            f"study: {path}: {len(units)} units ({trainings} trainings, "
            f"{len(units) - trainings} pruned and fine-tuned runs); "
            f"{len(units) - len(todo)} done before, {len(todo)} to go"
        )

        def cost(unit: Unit) -> float:  # in epochs, for the estimate of the time left
            if unit.training is not None:
                return float(finetune_epochs)
            return float(trainer_kwargs.get("max_epochs") or 1)

        start = time.perf_counter()
        done_cost = 0.0
        for k, unit in enumerate(todo):
            began = time.perf_counter()
            if unit.training is None:
                record = runner.train(unit)
                study["trainings"][unit.key] = record
            else:
                trained = study["trainings"][unit.training.key]
                record = runner.prune_and_finetune(unit, trained)
                study["runs"][unit.key] = record
            record["seconds"] = time.perf_counter() - began
            _write_json(path / _STUDY_JSON, study)
            done_cost += cost(unit)
            elapsed = time.perf_counter() - start
            left = elapsed / done_cost * sum(cost(u) for u in todo[k + 1 :])
            say(
                f"study: {len(units) - len(todo) + k + 1}/{len(units)} {unit.describe()}: "
                f"{_outcome(record)} | elapsed {duration(elapsed)}, about "
                f"{duration(left)} left"
            )
        _write_artifacts(path, study, variants, seeds, flops_targets)
    say(f"study: done; {path / 'study.md'}, {path / 'pareto.png'}")
    return study


def _write_artifacts(
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


def _pending(study: dict[str, Any], units: list[Unit], run_dir: Path) -> list[Unit]:
    """The units still to run. A training is redone when it is not recorded, or when a file
    it left is gone while one of its runs is still to do."""
    runs_left = {u.training for u in units if u.training is not None and u.key not in study["runs"]}
    pending = []
    for unit in units:
        if unit.training is not None:
            if unit.key not in study["runs"]:
                pending.append(unit)
        elif unit.key not in study["trainings"] or (
            unit in runs_left and not all(p.is_file() for p in checkpoints(run_dir, unit))
        ):
            pending.append(unit)
    return pending


def _outcome(record: Mapping[str, Any]) -> str:
    if "finetuned_acc" in record:
        return (
            f"pruned {100 * record['pruned_acc']:.2f}%, fine-tuned "
            f"{100 * record['finetuned_acc']:.2f}% at {record['flops_ratio']:.2f} of the FLOPs"
        )
    aimed = f", final lambda {record['lambda_']:.2g}" if record["auto"] else ""
    return f"test {100 * record['test_acc']:.2f}%{aimed}"


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
    with open(run_dir / _LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"Another study is running in {run_dir} (it holds {run_dir / _LOCK}); wait for "
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
