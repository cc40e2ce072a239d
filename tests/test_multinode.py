"""`nam-lightning run` on several machines, simulated on this one: two "nodes" of one process
each on localhost (gloo, CPU), started the two ways docs/distributed.md shows, torchrun and
SLURM (``srun`` sets each task's ``SLURM_*`` variables; here the test does).

Each node is its own process tree, as on two machines; they share this file system, as nodes
share a network file system, and both are given the same ``--run_dir``. What must hold: both
exit cleanly, the two ranks hold the same pruned model (the SHA-256 of each rank's pruned
parameters, recorded in ``report.json``, equal to each other and to that of the saved
``pruned.ckpt`` worked out here), and one complete run directory is written, by rank 0 alone.

NAM's fused kernels run eagerly here (``NAM_LIGHTNING_COMPILE=0`` unless set), as in
test_kill_resume.py: compiling them costs seconds per process and is not what is tested.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nam_lightning import load_checkpoint
from nam_lightning.models import ImageClassifier
from nam_lightning.pipeline import rank_digests

BIN = Path(sys.executable).parent
RUN_DIR = "runs/shared-run"  # relative: every node runs in the same (shared) directory
TWO_NODES = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.accelerator=cpu"]
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--finetune_epochs=1",
    "--data.batch_size=16",
    "--pruning.amount=0.3",
    "--pruning.flops_target=null",
]
ARTIFACTS = {
    "config.yaml",
    "report.json",
    "report.md",
    "pruned.ckpt",
    "finetuned.ckpt",
    "gamma_hist.png",
    "channels.png",
    "accuracy.png",
}
# What a launcher or scheduler sets: none may leak in from the environment running the tests.
LAUNCH_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NAM_LIGHTNING_RUN_DIR",
)
TIMEOUT_S = 600


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env["OMP_NUM_THREADS"] = "1"
    env["NAM_LIGHTNING_COMPILE"] = os.environ.get("NAM_LIGHTNING_COMPILE", "0")
    return env


def run_nodes(cwd: Path, nodes: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """Start every ``(command, environment)`` at once in ``cwd`` and wait for all; each one's
    exit status and output. Once one fails, or after ``TIMEOUT_S``, the others are stopped: a
    node whose peer is gone would wait for it for half an hour."""
    started = []
    for rank, (command, env) in enumerate(nodes):
        log = open(cwd / f"node{rank}.log", "w+")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append((process, log))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p, _ in started):
        if time.monotonic() > deadline or any(p.poll() for p, _ in started):
            for process, _ in started:
                stop(process)
        time.sleep(0.5)
    results = []
    for process, log in started:
        log.seek(0)
        results.append((process.wait(), log.read()))
        log.close()
    return results


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group (torchrun passes it on to its worker, which runs in a
    session of its own), SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def assert_one_complete_run(cwd: Path, results: list[tuple[int, str]]) -> dict[str, object]:
    """Both nodes succeeded as ranks 0 and 1 of 2; ``cwd`` holds one run directory with every
    artifact, and the ranks' pruned models are the one saved. Returns the report."""
    failed = [
        f"node {r}, exit status {c}:\n{out[-2000:]}" for r, (c, out) in enumerate(results) if c
    ]
    assert not failed, "\n\n".join(failed)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in results[1][1]
    assert "Artifacts in" in results[0][1] and "Artifacts in" not in results[1][1]

    run_dir = cwd / RUN_DIR
    assert sorted(p.name for p in cwd.iterdir()) == ["node0.log", "node1.log", "runs"]
    assert [p.name for p in (cwd / "runs").iterdir()] == ["shared-run"]
    files = {p.name for p in run_dir.iterdir() if p.is_file()}
    assert files >= ARTIFACTS, ARTIFACTS - files
    assert "model.onnx" in files or "model.pt2" in files
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {"train", "finetune"}

    report = json.loads((run_dir / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["trained", "pruned", "fine-tuned"]
    assert report["stages"][1]["flops"] < report["stages"][0]["flops"]
    saved = parameter_sha256(load_checkpoint(ImageClassifier, run_dir / "pruned.ckpt"))
    assert report["pruned_sha256_per_rank"] == [saved, saved]
    return report


def parameter_sha256(model: torch.nn.Module) -> str:
    """Each parameter's name, dtype, shape and raw bytes, in name order, hashed."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        t = param.detach().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def test_torchrun_two_nodes_prune_one_model_into_one_run_dir(tmp_path: Path) -> None:
    """docs/distributed.md's torchrun command, node ranks 0 and 1, one process each."""
    port = str(free_port())
    nodes = []
    for node_rank in ("0", "1"):
        command = [
            str(BIN / "torchrun"),
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node_rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            str(BIN / "nam-lightning"),
            "run",
            *TWO_NODES,
            *TINY,
            f"--run_dir={RUN_DIR}",
        ]
        nodes.append((command, base_env()))
    assert_one_complete_run(tmp_path, run_nodes(tmp_path, nodes))


def test_slurm_two_tasks_prune_one_model_into_one_run_dir(tmp_path: Path) -> None:
    """docs/distributed.md's srun command as srun runs it: the same command once per task, each
    with its task's SLURM variables (2 nodes, 1 task per node). Lightning's SLURM environment
    takes the ranks from them and the main address from ``SLURM_NODELIST``."""
    port = str(free_port())
    nodes = []
    for task in ("0", "1"):
        env = base_env()
        env.update(
            SLURM_JOB_ID="4242",
            SLURM_JOB_NAME="nam-lightning-test",  # not "bash"/"interactive": a batch job
            SLURM_NNODES="2",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="1",
            SLURM_NODELIST="127.0.0.1",
            SLURM_PROCID=task,
            SLURM_NODEID=task,
            SLURM_LOCALID="0",
            MASTER_PORT=port,  # else 15000 + the job id's last digits: maybe in use here
        )
        command = [str(BIN / "nam-lightning"), "run", *TWO_NODES, *TINY, f"--run_dir={RUN_DIR}"]
        nodes.append((command, env))
    assert_one_complete_run(tmp_path, run_nodes(tmp_path, nodes))


class GatheringStrategy:
    """As a DDP strategy's ``all_gather`` on rank 0 of two: this rank's tensor and rank 1's."""

    root_device = torch.device("cpu")

    def __init__(self, rank1: torch.nn.Module) -> None:
        self.rank1 = rank1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        theirs = bytes.fromhex(parameter_sha256(self.rank1))
        return torch.stack([tensor, torch.tensor(list(theirs), dtype=torch.uint8)])


def test_rank_digests_lists_each_rank_and_refuses_different_models() -> None:
    model = torch.nn.Conv2d(3, 4, 1)
    same = copy.deepcopy(model)
    digests = rank_digests(SimpleNamespace(strategy=GatheringStrategy(same)), model)  # type: ignore[arg-type]
    assert digests == [parameter_sha256(model)] * 2

    for change in ("value", "shape"):
        other = copy.deepcopy(model)
        with torch.no_grad():
            if change == "value":
                other.bias[0] += 1e-6
            else:
                other.bias = torch.nn.Parameter(other.bias[:3].clone())
        trainer = SimpleNamespace(strategy=GatheringStrategy(other))
        with pytest.raises(RuntimeError, match="2 ranks hold different pruned models"):
            rank_digests(trainer, model)  # type: ignore[arg-type]
