#!/usr/bin/env bash
# Run every benchmark in this folder, one after the other, with the `python` on PATH.
# Run from anywhere: bash benchmarks/run_all.sh  (extra arguments are not passed on).
set -euo pipefail

cd "$(dirname "$0")/.."
# the CPU benchmarks; gpu.py needs a CUDA GPU and runs on its own
scripts=(penalty_step.py prune_speed.py prune_resnet50.py train_step.py eval_sizes.py inference.py soak.py)
for script in "${scripts[@]}"; do
    echo
    echo "================================================================"
    echo "== benchmarks/${script}  ($(date '+%Y-%m-%d %H:%M:%S'), load: $(cut -d' ' -f1-3 /proc/loadavg))"
    echo "================================================================"
    python "benchmarks/${script}"
done
