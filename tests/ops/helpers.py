"""Helpers shared by the ops tests."""

import torch


def assert_close_f64(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``torch.testing.assert_close`` after casting both sides to float64: the ops return
    float32 (or the input dtype) and the oracles float64, and the comparison is about values."""
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol)
