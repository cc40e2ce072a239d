"""NAMCallback under 2-process CPU DDP (gloo). Each run is its own process: the DDP launcher
re-runs the script for rank 1, which must not be the pytest session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")


def run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), mode],
        cwd=SCRIPT.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_ddp_penalty_is_exact_and_ranks_agree(tmp_path: Path) -> None:
    for mode in ("callback", "reference"):
        done = run(tmp_path, mode)
        assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load(tmp_path / "callback_rank0.pt"), load(tmp_path / "callback_rank1.pt")
    reference = load(tmp_path / "reference_rank0.pt")
    assert rank0.keys() == rank1.keys() == reference.keys()
    assert any("nam.channel.bn.weight" in k for k in rank0)
    for key in rank0:
        torch.testing.assert_close(rank0[key], reference[key], rtol=0, atol=1e-6, msg=key)
        # Parameters are identical across ranks; BN running statistics are per rank (no SyncBN
        # on CPU), so only parameters are compared between ranks.
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)


def test_ddp_spawn_fails_before_training_with_advice(tmp_path: Path) -> None:
    done = run(tmp_path, "spawn")
    assert done.returncode != 0
    assert "Use strategy='ddp'" in done.stderr
    assert not (tmp_path / "spawn_rankmain.pt").exists()


@pytest.mark.parametrize("mode", ["spawn-injected"])
def test_ddp_spawn_works_when_nam_is_injected_first(tmp_path: Path, mode: str) -> None:
    done = run(tmp_path, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load(tmp_path / f"{mode}_rankmain.pt")
    nam_running_vars = [v for k, v in state.items() if k.endswith("nam.channel.bn.running_var")]
    assert len(nam_running_vars) == 2
    # The main process got the trained NAM statistics back from the workers.
    assert all(not torch.equal(v, torch.ones_like(v)) for v in nam_running_vars)


def test_ddp_prune_gives_identical_models_and_finetunes(tmp_path: Path) -> None:
    done = run(tmp_path, "prune")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NAMCallback: pruned the model" in done.stdout + done.stderr
    rank0, rank1 = load(tmp_path / "prune_rank0.pt"), load(tmp_path / "prune_rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert rank0[key].shape == rank1[key].shape, key
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    # Pruned: the first conv lost channels.
    assert rank0["net.0.weight"].shape[0] < 8

    done = run(tmp_path, "finetune")
    assert done.returncode == 0, done.stderr[-3000:]
    tuned = load(tmp_path / "finetune_rank0.pt")
    assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in rank0.items()}
    assert not torch.equal(tuned["net.7.weight"], rank0["net.7.weight"])  # it trained


def test_ddp_auto_lambda_is_equal_on_both_ranks_and_so_are_the_models(tmp_path: Path) -> None:
    done = run(tmp_path, "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    lambdas = [load(tmp_path / f"lambdas_rank{rank}.pt") for rank in (0, 1)]
    assert len(lambdas[0]) == 10 and torch.equal(lambdas[0], lambdas[1])
    assert len(set(lambdas[0].tolist())) > 3  # the controller moved it step by step
    rank0, rank1 = load(tmp_path / "auto_rank0.pt"), load(tmp_path / "auto_rank1.pt")
    assert rank0["net.0.weight"].shape[0] < 8  # pruned at the end
    for key in rank0:
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
