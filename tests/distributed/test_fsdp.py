"""FSDP2 sharding of the models (``distributed.shard_model``) under torchrun, 2 ranks on gloo."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .launch import run_torchrun, torch_env

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _worker(tmp_path: Path, tie: str, ranks: int) -> dict:
    out = tmp_path / f"{tie}-{ranks}.pt"
    if ranks == 1:
        proc = subprocess.run([sys.executable, str(WORKER), str(out), tie], env=torch_env(),
                              capture_output=True, text=True, timeout=120)
    else:
        proc = run_torchrun([str(WORKER), str(out), tie], nproc=ranks)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_fused_head_gradient_equals_single_process(tmp_path, tie):
    """The fused DPO head reads lm_head.weight (the embedding when tied) outside the head's
    forward: sharded over 2 ranks, with half the pairs each, every gradient (the head's
    included) equals the one-process gradient of the whole batch."""
    one, two = _worker(tmp_path, tie, 1), _worker(tmp_path, tie, 2)
    assert two["units"] == 3  # two decoder layers and the root
    assert two["gathered"]  # inside distributed.gathered the modules hold plain full parameters
    assert two["counted_bytes"] == two["full_bytes"]  # what the rollout's memory check counts
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-6, atol=0)
    assert one["grads"].keys() == two["grads"].keys()
    head = "model.embed_tokens.weight" if tie == "tied" else "lm_head.weight"
    assert one["grads"][head].abs().max() > 0
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
