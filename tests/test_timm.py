"""timm networks end to end: automatic sites, a training step, pruning, reloading, folding.

Each model of the zoo is built by ``timm.create_model`` with random weights (never
``pretrained``: nothing is downloaded) and run at 32 px. The expected site count comes from
timm's own block types, listed here; the reload runs in a fresh process from the file and
``timm.create_model`` alone. Skipped when timm is not installed (the ``timm`` extra).
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

timm = pytest.importorskip("timm")

from timm.layers import BatchNormAct2d  # noqa: E402
from timm.models import _efficientnet_blocks as efficientnet  # noqa: E402
from timm.models import regnet, resnet  # noqa: E402

from nam_lightning import (  # noqa: E402
    NAMChannelAttention,
    NAMSite,
    add_l1_subgradient_,
    fold_nam,
    inject_nam,
    prune_channels,
    save_pruned,
    scale_factors,
)

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
LAMBDA = 1e-4
ZOO = [
    "resnet18",
    "resnet50d",
    "seresnext26d_32x4d",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "mixnet_s",
    "regnety_002",
]
# timm's residual blocks, each with the attribute path of its residual branch's last norm:
# NAM's site, before the skip addition (never the shortcut's norm).
BRANCH_END: dict[type[nn.Module], str] = {
    resnet.BasicBlock: "bn2",
    resnet.Bottleneck: "bn3",
    efficientnet.InvertedResidual: "bn3",
    efficientnet.DepthwiseSeparableConv: "bn2",
    efficientnet.EdgeResidual: "bn2",
    regnet.Bottleneck: "conv3.bn",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def residual_blocks(model: nn.Module) -> dict[str, str]:
    """Block name -> the name of its branch's last norm, for every timm residual block."""
    return {
        name: f"{name}.{BRANCH_END[type(module)]}"
        for name, module in model.named_modules()
        if type(module) in BRANCH_END
    }


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics equal to the batch statistics of ``x`` in every BatchNorm (NAM's
    too), as in a trained model: with the initial ones (mean 0, variance 1) a deep random
    network's eval-mode activations grow without bound."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()
    model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum


@torch.no_grad()
def unit_logits(model: nn.Module, x: torch.Tensor) -> None:
    """Scale the classifier so that the largest eval-mode logit on ``x`` is 1: a random network
    gives logits of order 100, where float32 rounding alone exceeds the tolerances."""
    model.eval()
    scale = model(x).abs().max()
    head = model.get_classifier()
    head.weight.div_(scale)
    head.bias.div_(scale)


@functools.cache
def run(name: str, folder: str) -> dict[str, Any]:
    """The whole path for one model; the results for the tests to check. Cached: the zoo test
    and the reload test share it."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    expected_sites = residual_blocks(model)
    sites = inject_nam(model)
    stem = getattr(model, "bn1", None)
    stem_site = isinstance(stem, BatchNormAct2d) and not isinstance(stem.act, nn.Identity)
    if stem_site:  # the stem's norm, with its activation (SiLU/ReLU/Hardswish) built in
        inject_nam(model, sites=["bn1"])

    # a training step with the L1 penalty on every scale factor
    x = torch.randn(4, 3, SIZE, SIZE)
    labels = torch.randint(0, 10, (4,))
    model.train()
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    factors = scale_factors(model, "all")
    task_grads = [p.grad.clone() for p in factors]
    add_l1_subgradient_(factors, LAMBDA)
    penalty_ok = all(
        torch.equal(p.grad, g + LAMBDA * p.detach().sign())
        for p, g in zip(factors, task_grads, strict=True)
    )
    nam_gammas = [m.bn.weight for m in model.modules() if isinstance(m, NAMChannelAttention)]
    nam_learn = all(bool(g.grad.abs().sum() > 0) for g in nam_gammas)
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    moved = sum(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    model.zero_grad(set_to_none=True)
    calibrate(model, x)

    report = prune_channels(model, x, 0.5, measure=False)
    unit_logits(model, x)
    path = Path(folder) / f"{name}.pt"
    save_pruned(model, path, hyper_parameters={"num_classes": 10})
    torch.save(x, Path(folder) / f"{name}_x.pt")
    model.eval()
    with torch.enable_grad():  # the plain operators, as the fresh process runs them
        output = model(x).detach()
    with torch.no_grad():  # inference: NAM's one-pass kernels
        inference = model(x)
    folded = copy.deepcopy(model)
    folded_count = fold_nam(folded)
    with torch.no_grad():
        folded_output = folded(x)
    return {
        "expected_sites": expected_sites,
        "sites": sites,
        "stem_site": stem_site,
        "loss": float(loss.detach()),
        "penalty_ok": penalty_ok,
        "nam_learn": nam_learn,
        "moved": moved,
        "report": report,
        "sites_after": sum(isinstance(m, NAMSite) for m in model.modules()),
        "output": output,
        "inference": inference,
        "repr": repr(model),
        "folded_count": folded_count,
        "folded_output": folded_output,
        "folded": folded,
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("timm"))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_sites_training_pruning_and_folding(name: str, folder: str) -> None:
    result = run(name, folder)
    expected = result["expected_sites"]
    assert expected, "the zoo model should hold timm residual blocks"
    assert result["sites"] == list(expected.values())  # one per block, at its branch's end
    assert not any("downsample" in site for site in result["sites"])

    assert torch.isfinite(torch.tensor(result["loss"]))
    assert result["penalty_ok"] and result["nam_learn"] and result["moved"] > 0

    report = result["report"]
    assert report.removed_channels > 0
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    assert result["sites_after"] == len(expected) + result["stem_site"]

    assert result["folded_count"] == len(expected) + result["stem_site"]
    assert not any(isinstance(m, NAMSite) for m in result["folded"].modules())
    torch.testing.assert_close(result["inference"], result["output"], rtol=0, atol=1e-5)
    torch.testing.assert_close(result["folded_output"], result["output"], rtol=0, atol=1e-5)
    torch.testing.assert_close(result["folded_output"], result["inference"], rtol=0, atol=1e-5)


# Loads each saved model with timm.create_model (the model name given as a keyword, the class
# count read from the file) and writes {name: (output, repr)} or {name: "Error: message"}. The
# outputs come from the plain operators (eval mode under autograd), as the saving side's.
LOADER = """
import sys, timm, torch
from nam_lightning import load_checkpoint
torch.set_num_threads(1)
folder, names = sys.argv[1], sys.argv[2:]
results = {}
for name in names:
    try:
        model = load_checkpoint(timm.create_model, f"{folder}/{name}.pt", model_name=name)
        model.eval()
        output = model(torch.load(f"{folder}/{name}_x.pt")).detach()
        results[name] = (output, repr(model))
    except Exception as err:
        results[name] = f"{type(err).__name__}: {err}"
torch.save(results, f"{folder}/loaded.pt")
"""


def test_zoo_reloads_bitwise_in_a_fresh_process(folder: str) -> None:
    expected = {name: run(name, folder) for name in ZOO}
    subprocess.run(
        [sys.executable, "-c", LOADER, folder, *ZOO],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1",
            "NAM_LIGHTNING_COMPILE": "0",  # nothing to compile: no kernel runs under autograd
        },
        check=True,
        timeout=300,
    )
    loaded = torch.load(Path(folder) / "loaded.pt", weights_only=True)
    for name in ZOO:
        assert not isinstance(loaded[name], str), f"{name}: {loaded[name]}"
        output, structure = loaded[name]
        assert structure == expected[name]["repr"], name  # same layers, same pruned widths
        assert torch.equal(output, expected[name]["output"]), name
