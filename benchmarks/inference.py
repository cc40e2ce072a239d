"""Inference latency of NAM, unfolded and folded (``fold_nam``), on resnet50 on the CPU.

Four eval-mode variants of one torchvision resnet50 share their backbone weights: without
NAM; with NAM written straightforwardly (``StraightforwardNAM`` of ``train_step.py``: BatchNorm,
weights, sigmoid, multiply, as PyTorch operators); with our NAM at its 16 blocks
(``inject_nam``), which in eval mode under no gradient computes each site, its BatchNorm
included, in one pass from the running statistics; and a copy of ours after ``fold_nam``, where
each site has become one parameter-free module with those constants baked in. Every BatchNorm
(NAM's included) gets random scale factors, shifts and running statistics, so the outputs are
meaningful; ours, unfolded and folded, are checked against the straightforward one (max abs
difference).
The variants take turns in every repetition, so a slow spell of the machine hits them alike;
the order alternates between repetitions. The table shows the median latency, its ratio to
the model without NAM, and the paired ratio (the median over repetitions of the ratio within
each repetition). The target: the
folded model within 3% of the model without NAM. ``--compile`` adds the model without NAM and
the folded model under ``torch.compile(fullgraph=True)``, compared with each other. Last, the
folded sites are timed alone on the inputs they get in the model, against the BatchNorms they
replace in the model without NAM (``bn3`` of each block), in turns: what the sites add.

Eager CPU latency depends on the memory allocator as much as on the arithmetic: glibc hands
large freed blocks back to the operating system, and the fresh pages of the next allocation
are faulted in and zeroed one by one. So the script first has glibc keep freed memory in the
process (``common.keep_freed_memory``) and the table shows the cost of the arithmetic, with the
minor page faults per forward pass (median) to show that none are left; ``--default-malloc``
leaves the allocator as configured.

Run from the repository root::

    python benchmarks/inference.py [--batch 8] [--size 224] [--repeats 7] [--threads 2]
        [--compile] [--default-malloc]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from common import module_inputs, paired_medians, parse_args, timed_forward
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from train_step import StraightforwardNAM, add_straightforward_nam

from nam_lightning import NAMSite, inject_nam
from nam_lightning.fold import FoldedNAM, fold_nam

TARGET = 1.03  # folded latency / latency without NAM


def site_times(
    plain: nn.Module, folded: nn.Module, x: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """Seconds of the folded model's sites and of the BatchNorms they replace in the model
    without NAM (the blocks' ``bn3``), each module timed alone on its input in the model
    (median of ``repeats``), the pairs in turns, summed over the sites."""
    sites = module_inputs(folded, x, FoldedNAM)
    bns = module_inputs(plain, x, nn.BatchNorm2d)
    total = [0.0, 0.0]
    for name, site in sites.items():
        pair = (site, bns[name])  # a folded site takes the place of the BatchNorm: layer1.0.bn3
        for i, seconds in enumerate(paired_medians(pair, repeats)):
            total[i] += seconds
    return total[0], total[1]


@torch.no_grad()
def randomise_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
    """Random gamma (both signs), beta and running statistics for every BatchNorm."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            n = m.num_features
            sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
            m.weight.copy_(torch.empty(n).uniform_(0.25, 1.0, generator=generator) * sign)
            m.bias.copy_(torch.empty(n).uniform_(-0.25, 0.25, generator=generator))
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.25)
            m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (224)")
    parser.add_argument("--repeats", type=int, default=7, help="timed forward passes (7)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd no-NAM and folded models (up to ~40 s of compiling)",
    )
    args = parse_args(parser, positive=("batch", "size", "repeats", "threads"), malloc_option=True)
    torch.manual_seed(0)

    plain = torchvision.models.resnet50(weights=None, num_classes=1000)
    randomise_batchnorms(plain, torch.Generator().manual_seed(0))
    nam = copy.deepcopy(plain)
    sites = inject_nam(nam)
    nams = nn.ModuleList(m.nam for m in nam.modules() if isinstance(m, NAMSite))
    randomise_batchnorms(nams, torch.Generator().manual_seed(1))  # the backbone's stay shared
    straightforward = copy.deepcopy(plain)
    add_straightforward_nam(straightforward)
    ours = (m for m in nam.modules() if isinstance(m, NAMSite))
    theirs = (m for m in straightforward.modules() if isinstance(m, StraightforwardNAM))
    for site, written_out in zip(ours, theirs, strict=True):  # the same NAM statistics
        written_out.bn.load_state_dict(site.nam.channel.bn.state_dict())
    plain.eval()
    straightforward.eval()
    nam.eval()
    folded = copy.deepcopy(nam)
    fold_start = time.perf_counter()
    folded_count = fold_nam(folded)
    fold_ms = (time.perf_counter() - fold_start) * 1e3
    x = torch.randn(args.batch, 3, args.size, args.size)  # (B, C, H, W)

    models = {
        "no NAM": plain,
        "NAM, straightforward": straightforward,
        "NAM": nam,
        "NAM folded": folded,
    }
    if args.compile:
        models["no NAM, compiled"] = torch.compile(plain, fullgraph=True)
        models["NAM folded, compiled"] = torch.compile(folded, fullgraph=True)
    seconds: dict[str, list[float]] = {key: [] for key in models}
    faults: dict[str, list[int]] = {key: [] for key in models}
    with torch.inference_mode():
        outputs = {key: m(x) for key, m in models.items()}  # also the warm-up (compiling) pass
        for rep in range(args.repeats):
            # the order alternates, so no variant always runs right after the same one
            order = list(models) if rep % 2 == 0 else list(reversed(models))
            for key in order:
                elapsed, fault_count = timed_forward(models[key], x)
                seconds[key].append(elapsed)
                faults[key].append(fault_count)

    print(
        f"resnet50, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
        f"eval mode, inference_mode; median of {args.repeats} alternating forward passes; "
        f"allocator: {args.malloc}"
    )
    print(f"NAM sites: {len(sites)}; folded: {folded_count} (fold_nam took {fold_ms:.1f} ms)")
    reference = outputs["NAM, straightforward"]
    scale = reference.abs().max().item()
    effect = (reference - outputs["no NAM"]).abs().max().item()
    print(f"outputs up to {scale:.3g}; max |NAM - no NAM| = {effect:.3g}")
    for key in models:
        if key == "NAM" or key.startswith("NAM folded"):
            diff = (outputs[key] - reference).abs().max().item()
            print(f"max |{key} - NAM, straightforward| = {diff:.3g}")
    print()
    median = {key: statistics.median(times) for key, times in seconds.items()}
    # a compiled model is compared with the compiled model without NAM
    base_of = {key: "no NAM, compiled" if key.endswith("compiled") else "no NAM" for key in models}
    paired = {  # the median over repetitions of the ratio within each repetition
        key: statistics.median(t / b for t, b in zip(times, seconds[base_of[key]], strict=True))
        for key, times in seconds.items()
    }
    print(
        f"{'variant':<22} {'median ms':>10} {'min ms':>9} {'vs no NAM':>10} {'paired':>8} "
        f"{'page faults':>12}"
    )
    for key, times in seconds.items():
        print(
            f"{key:<22} {median[key] * 1e3:>10.1f} {min(times) * 1e3:>9.1f} "
            f"{median[key] / median[base_of[key]]:>9.3f}x {paired[key]:>7.3f}x "
            f"{statistics.median(faults[key]):>12.0f}"
        )
    print()
    for folded_key, base_key in [
        ("NAM folded", "no NAM"),
        ("NAM folded, compiled", "no NAM, compiled"),
    ]:
        if folded_key in median:
            ratio = median[folded_key] / median[base_key]
            verdict = "met" if max(ratio, paired[folded_key]) <= TARGET else "NOT met"
            print(
                f"target, {folded_key} within {TARGET - 1:.0%} of {base_key}: "
                f"{verdict} ({ratio:.3f}x, paired {paired[folded_key]:.3f}x)"
            )
    with torch.inference_mode():
        sites_s, bns_s = site_times(plain, folded, x, args.repeats)
    print(
        f"\nthe {folded_count} folded sites, each alone on its input in the model: "
        f"{sites_s * 1e3:.1f} ms; the {folded_count} BatchNorms they replace (no NAM): "
        f"{bns_s * 1e3:.1f} ms; a forward pass of the folded model: "
        f"{median['NAM folded'] * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
