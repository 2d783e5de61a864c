"""Shared test setup.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
triton is first imported, which rftengine does lazily, so setting it here is early enough.
On a CUDA machine the kernels are compiled and the same tests run on the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    """Run a test once on the torch reference and once on the Triton kernels."""
    monkeypatch.setenv("RFTENGINE_BACKEND", request.param)
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on tiny models and tensors, thread hand-off costs more
    than the work on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def terminal(monkeypatch):
    """Progress bars drawn as on a terminal (they are off when the output is captured, as it
    is under pytest): for the tests that check the bars themselves."""
    monkeypatch.setattr("rftengine.methods.loop.interactive_terminal", lambda: True)


@pytest.fixture
def notices(caplog):
    """The config alias notices logged during the test (``notices()`` -> their lines), with the
    once-per-process memory of ``announce`` cleared before and after."""
    import logging

    from rftengine.methods.config_base import announce

    announce.cache_clear()
    caplog.set_level(logging.WARNING, logger="rftengine")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "rftengine"]
    announce.cache_clear()
