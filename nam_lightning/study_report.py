"""The report of ``nam-lightning study``, from the numbers in its ``study.json``: the rows
(mean and spread over seeds per FLOPs target and variant), ``study.md`` and ``pareto.png``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def summarize(
    study: Mapping[str, Any],
    variants: Sequence[str],
    seeds: Sequence[int],
    flops_targets: Sequence[float],
) -> list[dict[str, Any]]:
    """One row per FLOPs target and variant with a finished run: mean and standard deviation
    over the finished seeds, the unpruned accuracy and the final lambda from each run's own
    training. Accuracies are fractions, FLOPs per image."""
    rows = []
    for target in flops_targets:
        for variant in variants:
            runs = sorted(
                (
                    r
                    for r in study["runs"].values()
                    if r["variant"] == variant
                    and r["seed"] in seeds
                    and r["flops_target"] == float(target)
                    and r["training"] in study["trainings"]
                ),
                key=lambda r: r["seed"],
            )
            if not runs:
                continue
            trained = [study["trainings"][r["training"]] for r in runs]
            rows.append(
                {
                    "flops_target": float(target),
                    "variant": variant,
                    "seeds": [r["seed"] for r in runs],
                    "auto": any(t["auto"] for t in trained),
                    "lambda": _spread([t["lambda_"] for t in trained]),
                    "unpruned_acc": _spread([t["test_acc"] for t in trained]),
                    "pruned_acc": _spread([r["pruned_acc"] for r in runs]),
                    "finetuned_acc": _spread([r["finetuned_acc"] for r in runs]),
                    "params": statistics.mean(r["params"] for r in runs),
                    "flops": _spread([r["flops"] / r["images"] for r in runs]),
                    "unpruned_flops": statistics.mean(t["flops"] / t["images"] for t in trained),
                    "latency_ms": _spread([r["latency_ms"] for r in runs]),
                    "speedup": _spread([r["unpruned_latency_ms"] / r["latency_ms"] for r in runs]),
                }
            )
    return rows


def render_markdown(study: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    """``study.md``: the settings, the table and how its numbers were measured."""
    settings = study["settings"]
    data = settings["data"]
    data_name = data.get("class_path", "?").rsplit(".", 1)[-1] if isinstance(data, dict) else data
    trainer = settings["trainer"]
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines = [
        "# Study: accuracy at equal FLOPs, by training variant",
        "",
        f"{data_name}, {settings['model'].get('backbone', '?')}; training epochs: "
        f"{trainer.get('max_epochs')}, fine-tuning epochs: {settings['finetune_epochs']} "
        f"(from lr {settings.get('finetune_lr', '?')}, cosine); seeds "
        f"{', '.join(map(str, seeds))}; {_penalty(study)}",
        "Test accuracy in %, mean +- standard deviation over the seeds; pruned is before "
        "fine-tuning.",
        "",
        "| FLOPs target | variant | seeds | lambda | unpruned | pruned | fine-tuned | params "
        "| MFLOPs/image | latency (ms) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['flops_target']:g} | {row['variant']} | {len(row['seeds'])} "
            f"| {_lambda_cell(row)} "
            f"| {_pm(row['unpruned_acc'], 100)} | {_pm(row['pruned_acc'], 100)} "
            f"| {_pm(row['finetuned_acc'], 100)} | {row['params']:,.0f} "
            f"| {row['flops'][0] / 1e6:.2f} | {_pm(row['latency_ms'], 1)} "
            f"| {row['speedup'][0]:.2f}x |"
        )
    machine = study.get("machine", {})
    seconds = sum(
        u.get("seconds", 0.0) for part in ("trainings", "runs") for u in study[part].values()
    )
    lines += [
        "",
        "Lambda: the L1 penalty's weight; for the automatic lambda its value at the end of "
        "training, mean +- std over seeds. Unpruned: the trained model before pruning (a "
        "training without penalty serves every target; one aimed by the automatic lambda "
        "serves only its own). Params and FLOPs (convolutions and matrix products, "
        "multiply-add = 2) of the pruned model, mean over seeds. Latency: median eval-mode "
        f"forward time of the fine-tuned model on a batch of {_images(study)} test images on "
        "the CPU, timed in turns with its unpruned model; speedup = unpruned latency / pruned "
        "latency, mean over seeds.",
        f"Machine: {machine.get('platform', '?')}, {machine.get('cpus', '?')} CPU cores, torch "
        f"{machine.get('torch', '?')}, device {machine.get('device', '?')}; "
        f"{duration(seconds)} of compute over all units.",
    ]
    return "\n".join(lines) + "\n"


def write_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    """Fine-tuned accuracy against FLOPs per image, a line per variant, error bars over seeds;
    the hollow markers of each colour are the variant's unpruned models (one per training).
    Written to a temporary file and renamed over ``path``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["flops"][0])
        line = ax.errorbar(
            [r["flops"][0] / 1e6 for r in mine],
            [100 * r["finetuned_acc"][0] for r in mine],
            yerr=[100 * r["finetuned_acc"][1] for r in mine],
            marker="o",
            capsize=3,
            label=variant,
        )
        ax.errorbar(
            [r["unpruned_flops"] / 1e6 for r in mine],
            [100 * r["unpruned_acc"][0] for r in mine],
            yerr=[100 * r["unpruned_acc"][1] for r in mine],
            marker="o",
            mfc="none",
            capsize=3,
            linestyle="none",
            color=line[0].get_color(),
        )
    ax.set_xscale("log")
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%g"))  # 3, not 3 x 10^0
    ax.set_xlabel("MFLOPs per image (log scale; hollow: unpruned)")
    ax.set_ylabel("test accuracy after fine-tuning (%)")
    ax.set_title("Accuracy at equal FLOPs (mean +- std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def duration(seconds: float) -> str:
    """``1m 05s``, or ``1h 02m`` from an hour on."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _penalty(study: Mapping[str, Any]) -> str:
    """How the penalised variants (slimming, nam+l1) were penalised."""
    penalised = [t for t in study["trainings"].values() if t["variant"] in ("slimming", "nam+l1")]
    if any(t["auto"] for t in penalised):
        return (
            "automatic lambda (slimming, nam+l1): one training per FLOPs target, the penalty "
            "aimed at the channels pruning to that target removes."
        )
    fixed = sorted({f"{t['lambda_']:g}" for t in penalised})
    return f"L1 lambda {', '.join(fixed) or 'none'} (slimming, nam+l1)."


def _lambda_cell(row: Mapping[str, Any]) -> str:
    mean, std = row["lambda"]
    if not row["auto"]:
        return f"{mean:g}"
    return f"{mean:.2g}" if math.isnan(std) else f"{mean:.2g} +- {std:.1g}"


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation of one value is NaN."""
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def _pm(value: tuple[float, float], scale: float) -> str:
    mean, std = value
    return f"{scale * mean:.2f}" if math.isnan(std) else f"{scale * mean:.2f} +- {scale * std:.2f}"


def _images(study: Mapping[str, Any]) -> str:
    sizes = {r["images"] for r in study["runs"].values()}
    return "/".join(map(str, sorted(sizes))) or "?"
