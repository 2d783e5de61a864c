"""The op tests run on a CUDA machine exactly as they ran here (a static check of tests/ops).

- A test that takes the `backend` fixture must put its tensors on the `device` fixture's
  device: with `RFTENGINE_BACKEND=triton` and no `TRITON_INTERPRET` (a CUDA machine), CPU
  tensors are refused.
- Random inputs are drawn from the CPU generator (seeded by conftest) and moved: drawn on the
  device they differ from what was verified on the CPU, so a test would pass or fail by the
  luck of the GPU's draw.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TEST_FILES = sorted(Path(__file__).parent.glob("test_*.py"))
RNG_CALLS = {"randn", "rand", "randint", "randn_like", "rand_like", "randint_like", "normal"}


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_backend_tests_use_the_device_fixture(path):
    tree = ast.parse(path.read_text())
    missing = [
        f.name for f in _functions(tree)
        if "backend" in {a.arg for a in f.args.args} and "device" not in {a.arg for a in f.args.args}
    ]
    assert not missing, f"{path.name}: take `device` and put the tensors on it: {missing}"


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_random_inputs_come_from_the_cpu_generator(path):
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in RNG_CALLS:
            continue
        if node.func.attr.endswith("_like") or any(k.arg == "device" for k in node.keywords):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, f"{path.name}: draw on the CPU, then .to(device):\n" + "\n".join(bad)
