"""What the benchmark scripts share: their command-line checks, CPU thread setting, the memory
allocator's setting and a timed forward pass."""

from __future__ import annotations

import argparse
import ctypes
import functools
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64 bits
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def image_parser(doc: str | None, repeats: int, repeats_help: str) -> argparse.ArgumentParser:
    """A parser with the options every resnet50 benchmark takes: ``--batch`` (8), ``--size``
    (224), ``--repeats`` and ``--threads`` (2); its description is ``doc``'s first paragraph."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (224)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"{repeats_help} ({repeats})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return parser


def parse_args(
    parser: argparse.ArgumentParser, positive: tuple[str, ...], malloc_option: bool = False
) -> argparse.Namespace:
    """Parse the command line, refuse a non-positive value of any option in ``positive`` (a
    usage error naming it), and use ``--threads`` CPU threads.

    With ``malloc_option``, the process's allocator keeps freed memory (see
    :func:`keep_freed_memory`) unless ``--default-malloc`` is given; ``args.malloc`` says which.
    """
    if malloc_option:
        parser.add_argument(
            "--default-malloc",
            action="store_true",
            help="leave the allocator as configured: glibc then returns large freed blocks to "
            "the OS and every pass page-faults them back (latencies move by up to ~20%% "
            "between processes)",
        )
    args = parser.parse_args()
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    if malloc_option:
        args.malloc = "as configured" if args.default_malloc else keep_freed_memory()
    return args


def keep_freed_memory() -> str:
    """Have glibc's malloc keep freed blocks of up to 32 MiB in the process; says what was set.

    By default glibc serves a large block with a fresh ``mmap`` (or trims the heap after a
    large free), so every forward pass faults its activations' pages back in and the kernel
    zeroes them: system time that depends on the process's allocation history more than on
    the model, so that two processes timing the same models can disagree by 20%. Kept in the
    process, as PyTorch's CUDA caching allocator or jemalloc keep them, the pages are faulted
    once, and the timings measure the arithmetic. Blocks above 32 MiB (glibc's largest mmap
    threshold; larger batches) still go to ``mmap``. The same as starting Python with
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647``.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "as configured (not glibc)"
    libc = ctypes.CDLL("libc.so.6")
    if not (
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ):
        return "as configured (mallopt refused)"
    return "glibc keeping freed blocks up to 32 MiB (mallopt)"


def timed_forward(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> tuple[float, int]:
    """Seconds and minor page faults (fresh memory pages touched) of one forward pass."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    model(x)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def module_inputs(
    model: nn.Module, x: torch.Tensor, kind: type[nn.Module]
) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Each submodule of ``model`` of type ``kind`` by name, with the input it gets in a forward
    pass of ``x``: to time it alone on the data it sees in the model."""
    seen: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda m, args, out, name=name: seen.update({name: (m, args[0])}))
        for name, m in model.named_modules()
        if isinstance(m, kind)
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def take_turns(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int,
    timer: Callable[[Callable[[], Any]], float] | None = None,
) -> dict[str, list[float]]:
    """Each ``fn`` run ``warmup`` times (compiling, autotuning), then ``reps`` timed runs in
    turns, the order alternating; returns the seconds of each timed run. ``timer(fn)`` times
    one run (default: wall-clock seconds of ``fn()``)."""
    if timer is None:
        timer = _wall_seconds
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {key: [] for key in fns}
    keys = list(fns)
    for rep in range(reps):
        for key in keys if rep % 2 == 0 else keys[::-1]:
            seconds[key].append(timer(fns[key]))
    return seconds


def _wall_seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_medians(
    pair: tuple[tuple[Callable[[torch.Tensor], Any], torch.Tensor], ...], repeats: int
) -> list[float]:
    """Median seconds of each ``(module, input)`` in ``pair`` over ``repeats`` forward passes,
    after one warm-up round, taking turns (:func:`take_turns`)."""
    runs = {str(i): functools.partial(m, x) for i, (m, x) in enumerate(pair)}
    return [statistics.median(t) for t in take_turns(runs, repeats, warmup=1).values()]
