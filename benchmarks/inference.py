"""Inference latency of NAM, unfolded and folded (``fold_nam``), on resnet50 on the CPU: eager,
compiled, and exported to ONNX under onnxruntime.

Five eval-mode variants of one torchvision resnet50 share their backbone weights: without
NAM; with NAM written straightforwardly (``StraightforwardNAM`` of ``train_step.py``: BatchNorm,
weights, sigmoid, multiply, as PyTorch operators); with our NAM at its 16 blocks
(``inject_nam``), which in eval mode under no gradient computes each site, its BatchNorm
included, in one pass from the running statistics; a copy of ours after ``fold_nam``, where
each site has become one parameter-free module with those constants baked in; and that model
pruned to half its FLOPs (``flops_target=0.5, round_to=8``, pruned before folding), the form a
pruned model is deployed in. Every BatchNorm (NAM's included) gets random scale factors,
shifts and running statistics, so the outputs are meaningful; ours, unfolded and folded, are
checked against the straightforward one (max abs difference), the pruned forms against the
pruned model unfolded.
The variants take turns in every repetition, so a slow spell of the machine hits them alike;
the order alternates between repetitions. The table shows the median latency, its ratio to
the model without NAM in the same form, and the paired ratio (the median over repetitions of
the ratio within each repetition). The target: the folded model within 3% of the model
without NAM, in each form.

``--compile`` adds the model without NAM, the folded and the pruned model under
``torch.compile(fullgraph=True)``. ``--onnx`` exports the model without NAM, the folded and
the pruned model with ``torch.onnx.export(..., dynamo=True)``, as the run directory's
``model.onnx`` is written, and times them under onnxruntime (CPU, ``--threads`` intra-op
threads, its default graph optimisations), each output checked against PyTorch's (1e-4).
Exported, a folded site is a BatchNormalization, a depthwise 1x1 convolution for the gate's
logit, a Sigmoid and a Mul (``FoldedNAM._exported_gate``): onnxruntime folds the
BatchNormalization into the convolution before it and the Sigmoid into the depthwise one, so
a site costs that convolution and one Mul, in its blocked layout (NCHWc). The residual Add and
ReLU after it, which in the model without NAM fuse into the block's last convolution, cost a
pass each in the 12 blocks without a downsampling convolution (in the other 4 they fuse into
that one). onnxruntime's CPU kernels fuse no chain of elementwise operators, and no ONNX
operator computes ``x * sigmoid(a * x + b)`` per channel, so these passes stay.

Last, the folded sites are timed alone on the inputs they get in the model, against the
BatchNorms they replace in the model without NAM (``bn3`` of each block), in turns: what the
sites add. With ``--compile``, also each site's compiled pass with the residual add and ReLU
after it (what Inductor fuses) against the same pass without the sigmoid (the model without
NAM's BatchNorm, add and ReLU), on the same inputs: the memory traffic is the same, so the
difference is the gate's arithmetic (a multiply-add, an exp2, an add and a division per
element), which an exact sigmoid cannot avoid.

Eager CPU latency depends on the memory allocator as much as on the arithmetic: glibc hands
large freed blocks back to the operating system, and the fresh pages of the next allocation
are faulted in and zeroed one by one. So the script first has glibc keep freed memory in the
process (``common.keep_freed_memory``) and the table shows the cost of the arithmetic, with the
minor page faults per forward pass (median) to show that none are left; ``--default-malloc``
leaves the allocator as configured.

Run from the repository root::

    python benchmarks/inference.py [--batch 8] [--size 224] [--repeats 7] [--threads 2]
        [--compile] [--onnx] [--default-malloc]
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from common import (
    image_parser,
    module_inputs,
    paired_medians,
    parse_args,
    take_turns,
    timed_forward,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from train_step import StraightforwardNAM, add_straightforward_nam

from nam_lightning import NAMSite, inject_nam, prune_channels
from nam_lightning.fold import FoldedNAM, fold_nam
from nam_lightning.pipeline import export_onnx

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


def _site_pass(z: torch.Tensor, constants: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A folded site's pass, BatchNorm included, with the residual add and ReLU after it, as
    Inductor fuses them: ``relu((A * z + B) * sigmoid(p * z + q) + r)``, the sigmoid written as
    ``fold_nam``'s kernel does (``constants``: rows A, B, -log2(e) p, -log2(e) q)."""
    scale, shift, gate_scale, gate_shift = constants
    return torch.relu((scale * z + shift) / (1 + torch.exp2(gate_scale * z + gate_shift)) + r)


def _affine_pass(z: torch.Tensor, constants: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The pass of the model without NAM at the same place: BatchNorm, add, ReLU."""
    scale, shift = constants[0], constants[1]
    return torch.relu(scale * z + shift + r)


def sigmoid_cost(folded: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Seconds of the compiled sites' passes (with the residual add and ReLU) and of the same
    passes without the gate (the model without NAM's), on the sites' inputs in the model,
    summed over the sites, in turns: what the gate's arithmetic costs once compiled."""
    gen = torch.Generator().manual_seed(0)
    args = [
        (z, torch.randn(4, 1, z.shape[1], 1, 1, generator=gen), torch.randn_like(z))
        for _, z in module_inputs(folded, x, FoldedNAM).values()
    ]
    passes = {"site": torch.compile(_site_pass), "affine": torch.compile(_affine_pass)}

    def over_sites(name: str) -> Callable[[], None]:
        def run() -> None:
            for a in args:
                passes[name](*a)

        return run

    times = take_turns({name: over_sites(name) for name in passes}, repeats, warmup=1)
    return statistics.median(times["site"]), statistics.median(times["affine"])


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


class OnnxRuntimeModel:
    """An exported model under onnxruntime on the CPU, called as a PyTorch model is."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {"images": x.numpy()})
        return torch.from_numpy(logits)


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def main() -> None:
    parser = image_parser(__doc__, 7, "timed forward passes")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the models without NAM, folded and pruned under torch.compile "
        "(up to ~40 s of compiling each)",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export the models without NAM, folded and pruned to ONNX and time them "
        "under onnxruntime (up to ~60 s of exporting each)",
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
    pruned = copy.deepcopy(nam)  # pruned with NAM in place, then folded: as deployed
    prune_start = time.perf_counter()
    # traced on one image: the FLOPs ratio that the target refers to is the same at any batch
    pruning = prune_channels(pruned, x[:1], flops_target=0.5, round_to=8, measure=False)
    prune_s = time.perf_counter() - prune_start
    pruned_folded = copy.deepcopy(pruned)
    fold_nam(pruned_folded)

    models: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "no NAM": plain,
        "NAM, straightforward": straightforward,
        "NAM": nam,
        "NAM folded": folded,
        "NAM folded, pruned": pruned_folded,
    }
    if args.compile:
        for key in ("no NAM", "NAM folded", "NAM folded, pruned"):
            models[f"{key}, compiled"] = torch.compile(models[key], fullgraph=True)
    export_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnx:
            exported = {
                "no NAM": plain,
                "NAM folded": folded,
                "NAM folded, pruned": pruned_folded,
            }
            for i, (key, model) in enumerate(exported.items()):
                start = time.perf_counter()
                path = Path(tmp) / f"{i}.onnx"
                export_onnx(model, x, path)  # as `nam-lightning run` writes model.onnx
                export_s[key] = time.perf_counter() - start
                models[f"{key}, onnxruntime"] = OnnxRuntimeModel(path, args.threads)
        seconds: dict[str, list[float]] = {key: [] for key in models}
        faults: dict[str, list[int]] = {key: [] for key in models}
        with torch.inference_mode():
            outputs = {key: m(x) for key, m in models.items()}  # also the warm-up (compiling)
            pruned_reference = pruned(x)
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
    print(
        f"pruned (flops_target=0.5, round_to=8) in {prune_s:.1f} s: FLOPs "
        f"{pruning.flops_ratio:.3f}, parameters {pruning.params_ratio:.3f} of the model's"
    )
    if export_s:
        print(
            "exported to ONNX (torch.onnx.export, dynamo=True; onnxruntime "
            f"{onnxruntime_version()}) in "
            + ", ".join(f"{seconds_:.0f} s ({key})" for key, seconds_ in export_s.items())
        )
    reference = outputs["NAM, straightforward"]
    scale = reference.abs().max().item()
    effect = (reference - outputs["no NAM"]).abs().max().item()
    print(f"outputs up to {scale:.3g}; max |NAM - no NAM| = {effect:.3g}")
    for key in models:
        if key == "NAM" or key.startswith("NAM folded"):
            want, name = (reference, "NAM, straightforward")
            if "pruned" in key:
                want, name = pruned_reference, "NAM pruned"
            diff = (outputs[key] - want).abs().max().item()
            print(f"max |{key} - {name}| = {diff:.3g}")
            if key.endswith("onnxruntime"):  # what export_model checks of model.onnx
                torch.testing.assert_close(outputs[key], want, rtol=1e-4, atol=1e-4, msg=key)
    print()
    median = {key: statistics.median(times) for key, times in seconds.items()}
    base_of = {key: base_key(key) for key in models}  # the model without NAM in the same form
    paired = {  # the median over repetitions of the ratio within each repetition
        key: statistics.median(t / b for t, b in zip(times, seconds[base_of[key]], strict=True))
        for key, times in seconds.items()
    }
    width = max(map(len, models))
    print(
        f"{'variant':<{width}} {'median ms':>10} {'min ms':>9} {'vs no NAM':>10} {'paired':>8} "
        f"{'page faults':>12}"
    )
    for key, times in seconds.items():
        print(
            f"{key:<{width}} {median[key] * 1e3:>10.1f} {min(times) * 1e3:>9.1f} "
            f"{median[key] / median[base_of[key]]:>9.3f}x {paired[key]:>7.3f}x "
            f"{statistics.median(faults[key]):>12.0f}"
        )
    print()
    for key in ("NAM folded", "NAM folded, compiled", "NAM folded, onnxruntime"):
        if key in median:
            ratio = median[key] / median[base_of[key]]
            verdict = "met" if max(ratio, paired[key]) <= TARGET else "NOT met"
            print(
                f"target, {key} within {TARGET - 1:.0%} of {base_of[key]}: "
                f"{verdict} ({ratio:.3f}x, paired {paired[key]:.3f}x)"
            )
    with torch.inference_mode():
        sites_s, bns_s = site_times(plain, folded, x, args.repeats)
        if args.compile:
            gate_s, affine_s = sigmoid_cost(folded, x, args.repeats)
    print(
        f"\nthe {folded_count} folded sites, each alone on its input in the model: "
        f"{sites_s * 1e3:.1f} ms; the {folded_count} BatchNorms they replace (no NAM): "
        f"{bns_s * 1e3:.1f} ms; a forward pass of the folded model: "
        f"{median['NAM folded'] * 1e3:.0f} ms"
    )
    if args.compile:
        extra = gate_s - affine_s
        print(
            f"compiled, the 16 sites' passes with the residual add and ReLU: {gate_s * 1e3:.1f} "
            f"ms; the same passes without the gate (as without NAM): {affine_s * 1e3:.1f} ms; "
            f"the gate's arithmetic: {extra * 1e3:.1f} ms = "
            f"{extra / median['no NAM, compiled']:.1%} of the compiled model without NAM"
        )


def base_key(key: str) -> str:
    """The model without NAM that ``key`` is compared with: the one in the same form."""
    for form in ("compiled", "onnxruntime"):
        if key.endswith(f", {form}"):
            return f"no NAM, {form}"
    return "no NAM"


if __name__ == "__main__":
    main()
