"""Shared fixtures of the fault suite: one tiny model per session, flaky env processes per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import flaky_envs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("faults-tiny") / "model")


@pytest.fixture
def envs(tmp_path: Path) -> Iterator[Any]:
    """`envs("--fault", "hang", ...)` starts a flaky env process; all are stopped after the test."""
    with flaky_envs(tmp_path) as make:
        yield make
