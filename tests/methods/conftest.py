"""Tiny models and the character tokenizer for the methods tests (built locally, no downloads)."""

import pytest
import torch

from rftengine.toy import char_tokenizer, tiny_causal_lm



@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen2's real tokenizer with a ChatML template (tests/qwen_tokenizer.py; built once, ~4 s)."""
    from tests.qwen_tokenizer import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture
def make_lm(tokenizer):
    """``make_lm(seed=0, **config_overrides)``: a random-init Qwen2-family causal LM (fp32)."""

    def build(seed: int = 0, **overrides):
        overrides.setdefault("hidden_size", 32)
        return tiny_causal_lm(len(tokenizer), "qwen2", seed=seed, **overrides)

    return build


@pytest.fixture
def assert_same_params():
    """``assert_same_params(a, b, rtol, atol)``: every parameter of two modules matches."""

    def check(a: torch.nn.Module, b: torch.nn.Module, *, rtol=1e-5, atol=1e-6):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert pa.keys() == pb.keys()
        for name in pa:
            torch.testing.assert_close(pa[name], pb[name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")

    return check


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every method test on one intra-op thread (tests/conftest.py `one_thread`)."""
