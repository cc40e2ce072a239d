"""The default job over seeds and FLOPs targets: what ``nam-lightning run`` gives, with its spread.

Runs ``nam-lightning run --seed_everything S --pruning.flops_target T`` for every seed and
target (each in its own run directory under ``--out``; a finished run is not run again), then
prints one row per run and a mean +- std row per target:

- test accuracy trained / pruned (before fine-tuning) / fine-tuned;
- the final lambda and the FLOPs kept (pruned / trained);
- the largest fall of validation accuracy below the best epoch before it, counted from epoch 4
  on, in sparsity training and in fine-tuning (a recipe that collapses shows here).

    python benchmarks/seeds.py                                  # seeds 0 1 2, targets 0.4 0.2
    python benchmarks/seeds.py --seeds 0 --out runs/small -- --nam.lambda_ '{"start": 1e-4}'

Anything after ``--`` is passed to every ``nam-lightning run``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run(out: Path, seed: int, target: float, extra: list[str]) -> Path:
    run_dir = out / f"target{target}-seed{seed}"
    if (run_dir / "report.json").is_file():
        return run_dir
    command = [
        sys.executable, "-m", "nam_lightning.cli", "run",
        f"--seed_everything={seed}", f"--pruning.flops_target={target}",
        f"--run_dir={run_dir}", "--overwrite=true", "--trainer.enable_progress_bar=false",
        *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    print(f"  {run_dir.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return run_dir


def worst_fall(metrics: Path, first_epoch: int = 3) -> float:
    """The largest fall of ``val/acc`` below the best epoch before it, from epoch index
    ``first_epoch`` (0-based) on, in points."""
    accs: dict[int, float] = {}
    with open(metrics) as f:
        for row in csv.DictReader(f):
            if row.get("val/acc"):
                accs[int(row["epoch"])] = 100 * float(row["val/acc"])
    ordered = [accs[e] for e in sorted(accs)]
    falls = [max(ordered[:i]) - ordered[i] for i in range(max(1, first_epoch), len(ordered))]
    return max([0.0, *falls])


def row(run_dir: Path) -> dict[str, Any]:
    report = json.loads((run_dir / "report.json").read_text())
    trained, pruned, tuned = report["stages"]
    return {
        "trained": 100 * trained["test_acc"],
        "pruned": 100 * pruned["test_acc"],
        "fine-tuned": 100 * tuned["test_acc"],
        "lambda": report.get("lambda"),
        "flops kept": pruned["flops"] / trained["flops"],
        "fall (train)": worst_fall(run_dir / "train" / "metrics.csv"),
        "fall (fine-tune)": worst_fall(run_dir / "finetune" / "metrics.csv"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.2])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("extra", nargs="*", help="options for nam-lightning run, after --")
    args = parser.parse_args()
    rows = {
        (target, seed): row(run(args.out, seed, target, args.extra))
        for target in args.targets
        for seed in args.seeds
    }
    keys = list(next(iter(rows.values())))
    print("| FLOPs target | seed | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for target in args.targets:
        for seed in args.seeds:
            values = rows[target, seed]
            print(f"| {target} | {seed} | " + " | ".join(_fmt(k, values[k]) for k in keys) + " |")
        if len(args.seeds) > 1:
            cells = []
            for k in keys:
                xs = [rows[target, s][k] for s in args.seeds]
                mean, std = statistics.mean(xs), statistics.stdev(xs)
                cells.append(f"{_fmt(k, mean)} +- {_fmt(k, std)}")
            print(f"| {target} | mean +- std | " + " | ".join(cells) + " |")


def _fmt(key: str, value: float) -> str:
    if key == "lambda":
        return f"{value:.3g}"
    if key == "flops kept":
        return f"{value:.3f}"
    return f"{value:.2f}"


if __name__ == "__main__":
    main()
