"""The tool demo on the real model (slow tier: `pytest -m slow tests/test_tool_demo_slow.py`; tens of
minutes on a 2-core CPU): `openrft demo --env calculator` as a user runs it, base -> SFT on the env's
demos -> SFT + RFT against the env served as its own process, on 64 held-out tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_tool_demo_warm_start_then_rft(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--env", "calculator", "--run-dir", str(run_dir),
                           "--set", "progress=false"], check=False, capture_output=True, text=True, timeout=3500,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "tool_demo.json").read_text())
    base, sft, rft = (summary["rows"][k] for k in ("base", "SFT", "SFT + RFT"))
    assert summary["held_out_tasks"] == 64
    assert base["tool_call_rate"] == 0.0  # the cold start: the base model never calls the tool
    assert sft["tool_call_rate"] > 0.5  # the warm start teaches the format and the habit
    assert rft["success"] >= sft["success"] + 0.15  # RFT is what makes the agent good (the target)
    assert 1.0 - rft["invalid_call_rate"] >= 0.95 and rft["prefix_mismatch"] == 0
    assert summary["sft_steps"] == 6 and summary["rft_steps"] == 4
    assert "Tool use" in (run_dir / "rft" / "report.html").read_text()
