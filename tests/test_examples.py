"""The example scripts run as the README says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_resnet_digits_example_trains_and_reloads(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "resnet_digits.py"),
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # NAM's kernels uncompiled: compiling them in a fresh process costs ~8 s, tested elsewhere
        env={**os.environ, "NAM_LIGHTNING_COMPILE": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical outputs: True" in done.stdout
    assert (tmp_path / "last.ckpt").is_file()
    metrics = next(line for line in done.stdout.splitlines() if line.startswith("metrics:"))
    assert "nam/l1_penalty" in metrics and "val_acc" in metrics
