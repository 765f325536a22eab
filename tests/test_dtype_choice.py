"""Which dtype a run gets: `auto` is float32 on CPU; bfloat16 asked for on a CPU that only emulates it
runs, with a warning that says so."""

from __future__ import annotations

import logging

import pytest
import torch

from trainer.learning import learner
from trainer.learning.learner import resolve_dtype


def test_auto_is_float32_on_cpu() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_without_native_bf16_warns(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture, native: bool) -> None:
    # the one stand-in: a CPU's bf16 support cannot be switched on this machine, so both answers are faked
    monkeypatch.setattr(learner, "cpu_has_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="trainer.learning"):
        assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert bool(warned) is not native, warned
