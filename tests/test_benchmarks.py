"""Every benchmark script still imports: they use the library's internals, which move."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(monkeypatch, name: str) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # they import their sibling `common`
    module = importlib.import_module(name)
    assert callable(module.main)
    monkeypatch.delitem(sys.modules, name)
