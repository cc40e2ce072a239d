"""How much of the FLOPs saved by channel pruning turns into CPU speed, on resnet50 with NAM.

A torchvision resnet50 gets NAM at its 16 blocks and random BatchNorm scale factors (a fresh
model has every gamma at 1: a tie, nothing to rank), then copies are pruned five ways: half of
the channels (``amount=0.5``) and half of the FLOPs (``flops_target=0.5``), each with free
channel counts and with ``round_to=8`` (and, for the FLOPs target, ``round_to=16``, the width
of an AVX-512 vector of floats). The first table shows, for each, the wall time of the pruning
call (graph tracing, surgery, FLOP counts, and for a FLOPs target the bisection) and the
parameter and FLOP ratios.

The second table shows the eval-mode latency of the original and each pruned model, in the
forms a model runs in on a CPU, all of them timed in turns in one process (median of the
repetitions, the order alternating):

- ``eager``: the model as trained, in eval mode (NCHW, NAM unfolded: under no gradient each
  site is one pass computed from the running statistics);
- ``deployed``: after ``fold_nam`` (each NAM site one fused pass) in channels_last memory
  format, the CPU's native layout for convolutions (no reordering around each one);
- ``compiled`` (``--compile``): the deployed model under ``torch.compile`` with Inductor's
  ``freezing`` (BatchNorms folded into the convolutions, weights prepacked); the script prints
  how long compiling took (up to ~40 s per model without Inductor's cache).

Two ways to say how much of the FLOPs gain becomes speed (1.0: all of it):

- ``time saved / FLOPs saved``: ``(1 - latency ratio) / (1 - FLOPs ratio)``, the latency
  reduction as a share of the FLOPs reduction (the target: at least 0.85 at half the FLOPs
  with ``round_to=8``);
- ``speedup / FLOPs cut``: ``(1 / latency ratio) / (1 / FLOPs ratio)``, the stricter one.

The process's allocator keeps freed memory first (``common.keep_freed_memory``): under glibc's
defaults each pass faults its activations' pages back in, and that system time, which depends
on the process's allocation history, moved the target configuration's deployed ratio between
0.78 and 0.97 from one process to the next. The ``page faults`` column (median per pass) shows
what is left; ``--default-malloc`` leaves the allocator as configured.

With ``--convs`` a third table takes the models apart: every convolution of the original and of
the models pruned to half the FLOPs with ``round_to=8`` and ``16`` is timed alone on the input
it gets in the model, in NCHW (as the eager model runs it) and in channels_last (as the
deployed one does), the original's and the pruned one's in turns; per stage, the table shows
the FLOPs ratio next to the time ratio, and the pruned stage width (the residual channels).
Where the time ratio is well above the FLOPs ratio, the convolutions of that stage turn less
of the FLOPs cut into speed.

Run from the repository root::

    python benchmarks/prune_resnet50.py [--batch 8] [--size 224] [--repeats 7] [--threads 2]
        [--compile] [--convs] [--default-malloc]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from common import image_parser, module_inputs, paired_medians, parse_args, timed_forward
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

from nam_lightning import fold_nam, inject_nam, prune_channels

CONFIGS: list[tuple[str, dict[str, Any]]] = [  # (label, prune_channels keyword arguments)
    ("amount=0.5", {"amount": 0.5, "round_to": None}),
    ("amount=0.5", {"amount": 0.5, "round_to": 8}),
    ("flops_target=0.5", {"flops_target": 0.5, "round_to": None}),
    ("flops_target=0.5", {"flops_target": 0.5, "round_to": 8}),
    ("flops_target=0.5", {"flops_target": 0.5, "round_to": 16}),  # AVX-512: 16 floats a vector
]
TARGET_CONFIG = 3  # flops_target=0.5, round_to=8
TARGET = 0.85  # time saved / FLOPs saved
CONV_CONFIGS = (3, 4)  # the --convs table: half the FLOPs with round_to=8 and 16


@torch.no_grad()
def randomise_gammas(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.weight.uniform_(0.5, 1.0)


def deployed(model: nn.Module) -> nn.Module:
    """A copy with NAM folded, in channels_last memory format."""
    result = copy.deepcopy(model)
    fold_nam(result)
    return result.to(memory_format=torch.channels_last)


def conv_breakdown(
    original: nn.Module, pruned: nn.Module, x: torch.Tensor, repeats: int
) -> list[tuple[str, ...]]:
    """Per stage (stem, layer1..4, then all): the pruned width (the stem's output channels, a
    stage's residual channels), the FLOPs ratio and the time ratio of its convolutions, each
    timed alone on its input in NCHW and in channels_last, the two models' in turns."""
    rows = []
    a, b = (module_inputs(m, x, nn.Conv2d) for m in (original, pruned))
    stages: dict[str, dict[str, list[float]]] = {}
    for name in a:
        stage = name.split(".")[0] if name.startswith("layer") else "stem"
        totals = stages.setdefault(stage, {"flops": [0, 0], "nchw": [0, 0], "cl": [0, 0]})
        for i, (conv, inp) in enumerate((a[name], b[name])):
            with FlopCounterMode(display=False) as counter:
                conv(inp)
            totals["flops"][i] += counter.get_total_flops()
        for form in ("nchw", "cl"):
            fmt = torch.channels_last if form == "cl" else torch.contiguous_format
            pair = tuple(
                (copy.deepcopy(conv).to(memory_format=fmt), inp.contiguous(memory_format=fmt))
                for conv, inp in (a[name], b[name])
            )
            for i, seconds in enumerate(paired_medians(pair, repeats)):
                totals[form][i] += seconds
    stages["all"] = {
        key: [sum(t[key][i] for t in stages.values()) for i in (0, 1)]
        for key in ("flops", "nchw", "cl")
    }
    for stage, totals in stages.items():
        if stage == "all":
            rows.append(("all", "-", *row_values(totals)))
            continue
        last = b["conv1" if stage == "stem" else f"{stage}.0.conv3"][0]
        assert isinstance(last, nn.Conv2d)
        width = str(last.out_channels)
        rows.append((stage, width, *row_values(totals)))
    return rows


def row_values(totals: dict[str, list[float]]) -> tuple[str, ...]:
    """FLOPs ratio, then 'ms -> ms (ratio)' in NCHW and channels_last."""
    return (
        f"{totals['flops'][1] / totals['flops'][0]:.3f}",
        *(
            f"{totals[form][0] * 1e3:.1f} -> {totals[form][1] * 1e3:.1f} "
            f"({totals[form][1] / totals[form][0]:.3f})"
            for form in ("nchw", "cl")
        ),
    )


def print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = image_parser(__doc__, 7, "timed forward passes")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the deployed models under torch.compile with freezing (up to ~40 s each)",
    )
    parser.add_argument(
        "--convs",
        action="store_true",
        help="also time every convolution alone, per stage, in NCHW and channels_last (~1 min)",
    )
    args = parse_args(parser, positive=("batch", "size", "repeats", "threads"), malloc_option=True)
    torch.manual_seed(0)

    model = torchvision.models.resnet50(weights=None, num_classes=1000)
    sites = inject_nam(model)
    randomise_gammas(model)
    model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)  # (B, C, H, W)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    pruned: dict[int, nn.Module] = {}
    reports: dict[int, Any] = {}
    prune_s: dict[int, float] = {}
    for i, (_, kwargs) in enumerate(CONFIGS):
        pruned[i] = copy.deepcopy(model)
        start = time.perf_counter()
        reports[i] = prune_channels(pruned[i], x, **kwargs, measure=False)
        prune_s[i] = time.perf_counter() - start

    forms = ["eager", "deployed"] + (["compiled"] if args.compile else [])
    # (config index or "original", form) -> (callable, input)
    runs: dict[tuple[object, str], tuple[Callable[[torch.Tensor], Any], torch.Tensor]] = {}
    for key, m in [("original", model), *pruned.items()]:
        runs[key, "eager"] = (m, x)
        runs[key, "deployed"] = (deployed(m), x_cl)
        if args.compile:
            frozen = torch.compile(runs[key, "deployed"][0], options={"freezing": True})
            runs[key, "compiled"] = (frozen, x_cl)

    seconds: dict[tuple[object, str], list[float]] = {key: [] for key in runs}
    faults: dict[tuple[object, str], list[int]] = {key: [] for key in runs}
    compile_s = 0.0
    with torch.inference_mode():
        for key, (m, inp) in runs.items():
            warm_up, _ = timed_forward(m, inp)  # and compiling
            if key[1] == "compiled":
                compile_s += warm_up
        # All models take turns in every repetition, so a slow spell of the machine hits them
        # alike; the order alternates, so none always runs right after the same one.
        for rep in range(args.repeats):
            for key in list(runs) if rep % 2 == 0 else list(reversed(runs)):
                m, inp = runs[key]
                elapsed, fault_count = timed_forward(m, inp)
                seconds[key].append(elapsed)
                faults[key].append(fault_count)
    median = {key: statistics.median(times) for key, times in seconds.items()}
    fault_median = {key: statistics.median(counts) for key, counts in faults.items()}

    print(
        f"resnet50 + NAM at {len(sites)} sites, random BatchNorm gammas, global |gamma|\n"
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, eval mode, batch "
        f"{args.batch} x 3 x {args.size} x {args.size}; latency: median of {args.repeats} "
        f"forward passes, the models taking turns; allocator: {args.malloc}"
        + (f"; compiling took {compile_s:.0f} s" if args.compile else "")
        + "\n"
    )
    print_table(
        ("pruned to", "round_to", "prune s", "params ratio", "FLOPs ratio"),
        [
            (
                label,
                str(kwargs["round_to"]),
                f"{prune_s[i]:.1f}",
                f"{reports[i].params_ratio:.3f}",
                f"{reports[i].flops_ratio:.3f}",
            )
            for i, (label, kwargs) in enumerate(CONFIGS)
        ],
    )
    print()

    rows = []
    saved_share: dict[tuple[int, str], float] = {}
    for i, (label, kwargs) in enumerate(CONFIGS):
        flops_ratio = reports[i].flops_ratio
        for form in forms:
            original, latency = median["original", form], median[i, form]
            latency_ratio = latency / original
            saved_share[i, form] = (1 - latency_ratio) / (1 - flops_ratio)
            rows.append(
                (
                    label,
                    str(kwargs["round_to"]),
                    form,
                    f"{original * 1e3:.0f} -> {latency * 1e3:.0f}",
                    f"{fault_median['original', form]:.0f} -> {fault_median[i, form]:.0f}",
                    f"{latency_ratio:.3f}",
                    f"{saved_share[i, form]:.2f}",
                    f"{flops_ratio / latency_ratio:.2f}",
                )
            )
    print_table(
        (
            "pruned to",
            "round_to",
            "form",
            "latency ms",
            "page faults",
            "latency ratio",
            "time saved / FLOPs saved",
            "speedup / FLOPs cut",
        ),
        rows,
    )
    print()
    label, kwargs = CONFIGS[TARGET_CONFIG]
    for form in forms:
        share = saved_share[TARGET_CONFIG, form]
        verdict = "met" if share >= TARGET else "NOT met"
        print(
            f"target, {label} with round_to={kwargs['round_to']}, {form}: time saved / FLOPs "
            f"saved >= {TARGET}: {verdict} ({share:.2f})"
        )

    if args.convs:
        print(
            "\nEach convolution alone on its input in the model, median of "
            f"{args.repeats}, original and pruned in turns; ms summed per stage "
            "(original -> pruned (ratio)); width: the pruned stage's residual channels\n"
        )
        header = ("stage", "width", "FLOPs ratio", "NCHW ms", "channels_last ms")
        with torch.inference_mode():
            for i in CONV_CONFIGS:
                label, kwargs = CONFIGS[i]
                print(f"{label}, round_to={kwargs['round_to']}:")
                print_table(header, conv_breakdown(model, pruned[i], x, args.repeats))
                print()


if __name__ == "__main__":
    main()
