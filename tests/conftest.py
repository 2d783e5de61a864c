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


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None.

    Triton 3.6's interpreter (3.8's no longer; 3.7's unchecked) turns a scalar argument used as a
    loop bound into a Python int with `int()` of a one-element array, which numpy 2.4 refuses:
    every kernel that loops up to its vocabulary or length would fail, each test with a long
    traceback. One tiny kernel tells. Compiled kernels on a GPU are not affected.
    """
    import numpy
    import triton
    import triton.language as tl
    from triton.runtime.errors import InterpreterError

    @triton.jit
    def count_blocks(out_ptr, n, BLOCK: tl.constexpr):
        count = 0
        for _ in range(0, n, BLOCK):
            count += 1
        tl.store(out_ptr, count)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_blocks[(1,)](out, 3, BLOCK=1)
    except InterpreterError as error:
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels with numpy "
                f"{numpy.__version__} ({error.__cause__ or error}); install 'numpy<2.4' or triton>=3.8")
    return None


def pytest_sessionstart(session):
    if os.environ.get("TRITON_INTERPRET") == "1":
        problem = _interpreter_problem()
        if problem:
            pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


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
