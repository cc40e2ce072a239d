import os
from collections.abc import Iterator

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n`: the workers share the cores; one intra-op thread each (see one_thread)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine it
    spin-waits for a core another process holds (a CLI `run`: 3 s with one thread, 10-20 s
    with two). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
