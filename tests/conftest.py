"""Set before any test module imports torch: see trainer/__init__.py (OMP_WAIT_POLICY). Also the tiny
model fixture the training tests share (a module may define its own `tiny_model` to override it)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model built offline (trainer/models/tiny.py), once per test module."""
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
