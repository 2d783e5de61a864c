"""Fixtures of the CLI tests."""

from pathlib import Path

import pytest
from .cli_helpers import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
