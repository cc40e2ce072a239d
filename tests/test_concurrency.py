"""Two ``nam-lightning run`` jobs at the same time, each in its own process and run directory.

The two jobs (different seeds, so different results) start together as subprocesses
(``python -m nam_lightning.cli run``, one torch thread each) and write to two directories. Both
must succeed and each directory must hold the full artifacts; the first must hold exactly what
the same command writes when it runs alone (the jobs are alike but for their seeds: the second
is checked only for differing from the first, to save a third run):

- byte for byte: metrics CSVs, hparams, the PNG plots (no ONNX export: ``--export=false``;
  test_cli.py checks the exported model);
- every tensor (weights, optimizer and scheduler state) and every other value of every
  checkpoint, once the run directory's path in them (``ModelCheckpoint``'s ``dirpath``,
  ``best_model_path``, ...) is replaced by a placeholder;
- ``report.json`` except its wall-clock timings (latencies, speedup, pruning seconds), and
  ``report.md`` as rendered from it; ``config.yaml`` except its ``run_dir`` line;
- TensorBoard event files only by count: their names and records hold wall-clock times.

On the CPU with one thread, a seeded run is deterministic, so "equal" is exact equality.

While the first job is writing, a third run into its directory (in this process) is refused
without ``--overwrite``; the first job's directory then still equals the solo run's, so the
refused run wrote, moved and deleted nothing there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_helpers import AMOUNT, DIGITS, TINY, assert_run_artifacts, files_under, usage_error

from nam_lightning.pipeline import render_markdown

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [*TINY, *DIGITS, *AMOUNT, "--finetune_epochs=1", "--export=false"]
JOBS = {"a": [], "b": ["--seed_everything=1", "--data.seed=1"]}
TIMINGS = {
    "latency_ms",
    "latency_before",
    "latency_after",
    "speedup",
    "seconds",
    "surgery_seconds",
    "measure_seconds",
}  # wall-clock
TIMEOUT = 300
PLACEHOLDER = "<run_dir>"


def log_of(run_dir: Path) -> Path:
    return run_dir.with_suffix(".log")


def start(args: list[str], run_dir: Path) -> subprocess.Popen[str]:
    """``python -m nam_lightning.cli run *args --run_dir=run_dir`` in the background, one
    thread, its output to ``run_dir.log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "NAM_LIGHTNING_RUN_DIR"):
        env.pop(key, None)  # a plain run, not a DDP worker, not a shared default directory
    with open(log_of(run_dir), "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "nam_lightning.cli", "run", *args, f"--run_dir={run_dir}"],
            cwd=run_dir.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def finish(job: subprocess.Popen[str], run_dir: Path) -> None:
    log = log_of(run_dir)
    try:
        code = job.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()
        raise
    assert code == 0, f"{job.args} exited with {code}:\n{log.read_text()[-3000:]}"


def run_alone(args: list[str], run_dir: Path) -> None:
    finish(start(args, run_dir), run_dir)


def wait_for_config(run_dir: Path, job: subprocess.Popen[str]) -> None:
    """Until the job has written its whole ``config.yaml``: its directory holds a run."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            config = None
        if isinstance(config, dict) and (config.get("run") or {}).get("run_dir") == str(run_dir):
            return
        assert job.poll() is None, f"{job.args} ended before writing its config"
        time.sleep(0.05)
    pytest.fail(f"{run_dir / 'config.yaml'} did not appear")


def normalise(value: Any, run_dir: str) -> Any:
    """Checkpoint contents with the run directory's path replaced by a placeholder."""
    if isinstance(value, str):
        return value.replace(run_dir, PLACEHOLDER)
    if isinstance(value, dict):
        return {normalise(k, run_dir): normalise(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(normalise(v, run_dir) for v in value)
    return value


def assert_same(got: Any, want: Any, where: str) -> None:
    """Exact equality, tensors included (dtype, shape and every value)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def is_event_file(rel: Path) -> bool:
    return rel.name.startswith("events.out.tfevents.")


def layout(run_dir: Path) -> list[str]:
    """Relative paths of the files, each TensorBoard event file's name (times, host, pid) cut."""
    return sorted(
        str(rel.parent / "events.out.tfevents.*") if is_event_file(rel) else str(rel)
        for rel in (p.relative_to(run_dir) for p in files_under(run_dir))
    )


def assert_same_run(run_dir: Path, alone: Path) -> None:
    """``run_dir`` holds what ``alone`` holds, up to the directory's path and wall-clock times."""
    assert layout(run_dir) == layout(alone)
    for path in files_under(alone):
        rel = path.relative_to(alone)
        got, want = run_dir / rel, path
        if is_event_file(rel):
            continue  # counted in the layout; wall-clock times inside
        if rel.suffix == ".ckpt":
            assert_same(
                normalise(torch.load(got, weights_only=True), str(run_dir)),
                normalise(torch.load(want, weights_only=True), str(alone)),
                str(rel),
            )
        elif rel == Path("report.json"):
            report = json.loads(got.read_text())
            assert_same(
                without_timings(report), without_timings(json.loads(want.read_text())), str(rel)
            )
            assert (run_dir / "report.md").read_text() == render_markdown(report)
        elif rel == Path("report.md"):
            continue  # rendered from report.json (checked above); latencies in it
        elif rel == Path("config.yaml"):
            assert got.read_text().replace(str(run_dir), PLACEHOLDER) == want.read_text().replace(
                str(alone), PLACEHOLDER
            )
        else:
            assert got.read_bytes() == want.read_bytes(), str(rel)


def test_two_runs_at_the_same_time_match_runs_done_alone(tmp_path: Path) -> None:
    # A refused run in this process first: imports and parser set up before the jobs start, so
    # the refusal below happens quickly, while job "a" is still writing.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "report.json").write_text("{}")
    assert "--overwrite" in usage_error("run", *RUN, f"--run_dir={taken}")

    together = {name: tmp_path / "together" / name for name in JOBS}
    (tmp_path / "together").mkdir()
    jobs = {name: start([*RUN, *JOBS[name]], run_dir) for name, run_dir in together.items()}
    try:
        # a third run into "a"'s directory while "a" writes there: refused
        wait_for_config(together["a"], jobs["a"])
        config_before = (together["a"] / "config.yaml").read_bytes()
        message = usage_error("run", *RUN, "--seed_everything=2", f"--run_dir={together['a']}")
        assert "--overwrite" in message and str(together["a"]) in message
        refused_while_writing = jobs["a"].poll() is None
        assert (together["a"] / "config.yaml").read_bytes() == config_before
        for name, job in jobs.items():
            finish(job, together[name])
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.wait()
    assert refused_while_writing, "job 'a' had already finished when the third run was refused"

    for run_dir in together.values():
        assert_run_artifacts(run_dir, num_classes=10, exported=False)
    assert not list((tmp_path / "together").glob("runs"))  # nothing went to a default directory

    # the first run again, alone
    (tmp_path / "alone").mkdir()
    alone = tmp_path / "alone" / "a"
    run_alone([*RUN, *JOBS["a"]], alone)
    assert_same_run(together["a"], alone)

    # the two jobs did differ: equal results above are not two copies of one run
    first = torch.load(together["a"] / "finetuned.ckpt", weights_only=True)["state_dict"]
    second = torch.load(together["b"] / "finetuned.ckpt", weights_only=True)["state_dict"]
    assert any(
        isinstance(v, torch.Tensor) and not torch.equal(v, second[k])
        for k, v in first.items()
        if k in second and isinstance(second[k], torch.Tensor)
    )
