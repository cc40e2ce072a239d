"""A run SIGKILLed mid-epoch and resumed in a new process ends bitwise equal to an unbroken one.

Each run is its own process (kill_resume_script.py): the killed one dies by SIGKILL (no
teardown, no save on exit), so the resumed process has nothing but the last checkpoint file
written by ``ModelCheckpoint(every_n_train_steps=5, save_last=True)``. The config makes every
piece of state matter: NAMCallback's L1 penalty, momentum SGD (buffers), a per-step
ExponentialLR (its step count), BatchNorm running statistics, and a shuffled loader whose order
changes every epoch. 3 epochs x 8 batches; the process kills itself at the start of step 14,
three steps after the step-10 checkpoint, which is mid-epoch (epoch 1 after 2 of its 8 batches):
the resume has to continue from the third batch of epoch 1, not from an epoch boundary.

Exactness: ``torch.equal`` on every tensor of the state dict (parameters, BN statistics,
num_batches_tracked). Every process runs the same fp32 CPU kernels on one thread with
``deterministic=True``, and the checkpoint stores every piece of state bitwise (weights, buffers,
momentum, scheduler counters, loop progress, the loader's position), so a correct resume repeats
the uninterrupted run's arithmetic exactly; a tolerance would only hide a state that was
restored wrongly but whose effect is small. The comparison can fail: from the same checkpoint,
restarting the epoch at its first batch, or dropping the optimizer and scheduler state, end
1e-2 to 1e-1 away from the reference (checked below). Resuming from an *earlier* correct
checkpoint would give the same parameters again (training is deterministic), so "the wrong
checkpoint" is not a negative check; "the wrong position in the data" is.

What users need for an exact mid-epoch resume with Lightning 2.6 (read from its loops):
- Lightning restores model, optimizer, scheduler, loop counters and callback states by itself,
  but restores the position in the epoch only for a train DataLoader that itself has
  ``state_dict``/``load_state_dict`` (``lightning.fabric.utilities.types._Stateful``; a sampler
  with a state_dict is not consulted), e.g. ``torchdata.stateful_dataloader.StatefulDataLoader``
  or a small subclass like the script's ``ResumableLoader``. With a plain DataLoader Lightning
  warns "You're resuming from a checkpoint that ended before the epoch ended and your dataloader
  is not resumable", restarts the epoch at its first batch and keeps counting from the saved
  batch index: the rest of that epoch trains on the wrong batches.
- Lightning does not save the global RNG states: shuffling must come from a generator seeded
  per epoch (``seed + epoch``, via ``set_epoch``), not from the global generator as in
  ``DataLoader(shuffle=True)``; random augmentation or dropout would need the same care.
- After pruning, the model given to ``fit(ckpt_path=...)`` must already have the pruned
  architecture: rebuild it with ``nam_lightning.load_checkpoint`` (from the pruned file or from
  the checkpoint itself), as the fine-tune test does.

NAM's fused kernels run eagerly in these processes (``NAM_LIGHTNING_COMPILE=0`` unless set):
compiling costs ~7 s per process here and does not change what is tested; the result was the
same (bitwise equal) with compiled kernels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("kill_resume_script.py")
BATCHES_PER_EPOCH = 8


def start(out: Path, mode: str, **extra_env: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **extra_env,
        "OMP_NUM_THREADS": "1",
        "NAM_LIGHTNING_COMPILE": os.environ.get("NAM_LIGHTNING_COMPILE", "0"),
    }
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), mode],
        cwd=SCRIPT.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return process.returncode, stdout, stderr


def run(out: Path, *modes: str, **extra_env: str) -> list[tuple[int, str, str]]:
    """Run independent modes side by side (the machine has 2 cores), wait for all."""
    return [finish(p) for p in [start(out, mode, **extra_env) for mode in modes]]


def check_ok(result: tuple[int, str, str]) -> None:
    code, stdout, stderr = result
    assert code == 0, (stdout + stderr)[-4000:]
    # Lightning saw a resumable loader (else it warns and restarts the epoch at batch 0).
    assert "not resumable" not in stderr


def check_killed_mid_epoch(result: tuple[int, str, str], checkpoints: Path) -> Path:
    """The process died by SIGKILL three steps after its last checkpoint, which is mid-epoch
    and holds non-trivial optimizer, scheduler and loader state. Returns last.ckpt."""
    code, stdout, stderr = result
    assert code == -signal.SIGKILL, (stdout + stderr)[-4000:]
    assert "SIGKILL at global_step=13 batch_idx=5" in stdout
    assert {p.name for p in checkpoints.iterdir()} == {
        "epoch=0-step=5.ckpt",
        "epoch=1-step=10.ckpt",
        "last.ckpt",
    }
    last = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 10 and last["epoch"] == 1
    fit_loop = last["loops"]["fit_loop"]
    processed_in_epoch = fit_loop["epoch_loop.batch_progress"]["current"]["processed"]
    assert processed_in_epoch == 2 and 0 < processed_in_epoch < BATCHES_PER_EPOCH
    assert fit_loop["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert all("momentum_buffer" in s for s in last["optimizer_states"][0]["state"].values())
    assert last["lr_schedulers"][0]["last_epoch"] == 10
    return checkpoints / "last.ckpt"


def load(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return state


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    reference, killed = run(tmp_path, "train", "train-kill")
    check_ok(reference)
    check_killed_mid_epoch(killed, tmp_path / "train_ckpts")

    check_ok(run(tmp_path, "train-resume")[0])
    expected = load(tmp_path / "train_reference.pt")
    assert any("nam.channel.bn.weight" in k for k in expected)  # NAM was trained
    assert_equal(load(tmp_path / "train_resumed.pt"), expected)

    # Negative checks from the same checkpoint: the comparison sees a wrong resume.
    for wrong in ("train_restarted_epoch.pt", "train_no_optimizer_state.pt"):
        assert max_difference(load(tmp_path / wrong), expected) > 1e-3, wrong


def test_auto_lambda_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(
    tmp_path: Path,
) -> None:
    auto = {"NAM_TEST_AUTO_LAMBDA": "1"}
    reference, killed = run(tmp_path, "train", "train-kill", **auto)
    check_ok(reference)
    last = check_killed_mid_epoch(killed, tmp_path / "train_ckpts")
    state = torch.load(last, weights_only=True)["callbacks"]["NAMCallback"]
    assert state["auto"]["lambda_"] != 1e-3 and state["plan"]  # the controller was at work

    check_ok(run(tmp_path, "train-resume", **auto)[0])
    expected = load(tmp_path / "train_reference.pt")
    assert expected["net.4.bn1.weight"].shape[0] < 16  # pruned at the end of training
    assert_equal(load(tmp_path / "train_resumed.pt"), expected)


def test_sigkill_during_finetune_after_pruning_then_resume(tmp_path: Path) -> None:
    # prune: train with NAMCallback(prune=0.5), save_pruned, then the uninterrupted fine-tune.
    check_ok(run(tmp_path, "prune")[0])
    killed = run(tmp_path, "finetune-kill")[0]
    last = check_killed_mid_epoch(killed, tmp_path / "finetune_ckpts")
    state_dict = torch.load(last, weights_only=True)["state_dict"]
    assert state_dict["net.4.bn1.weight"].shape[0] < 16  # the checkpoint is of the pruned model

    check_ok(run(tmp_path, "finetune-resume")[0])
    expected = load(tmp_path / "finetune_reference.pt")
    assert expected["net.4.bn1.weight"].shape == state_dict["net.4.bn1.weight"].shape
    assert_equal(load(tmp_path / "finetune_resumed.pt"), expected)
    # The fine-tune moved the weights (the comparison is not between two copies of pruned.pt).
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=True)["state_dict"]
    assert not torch.equal(pruned["net.7.weight"], expected["net.7.weight"])
