import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def one_thread():
    """Tiny ops on an oversubscribed 2-core machine run fastest (and bit-reproducibly) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def end_spawned_worker() -> None:
    """Exit a spawned gloo worker once its results are saved, skipping interpreter finalization: there gloo's threads
    can still hold finished async works whose tensors then need the GIL, and the process aborts (SIGABRT, "terminate
    called without an active exception"; seen in several runs in a row on 2 busy cores)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
