"""`bench/pipeline.py --model tiny`: the synchronous and the pipelined loop, one after the other, really
train (two `openrft train` processes) and the script prints each one's figures and the ratio line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import pipeline


@pytest.mark.slow  # two training processes: ~25 s on an idle 2-core machine, 104 s at load 7
def test_pipeline_bench_runs_both_loops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline.main(["--model", "tiny", "--steps", "2", "--staleness", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("ratios vs S=0: S=1: steps/min x")
    summary = json.loads((tmp_path / "pipeline.json").read_text())
    assert set(summary) == {"S=0", "S=1"}
    assert summary["S=0"]["staleness_mean"] == 0 and summary["S=1"]["steps_per_min"] > 0
    # each variant trained in its own run directory, with its own max_staleness
    for s in (0, 1):
        config = (tmp_path / f"S_{s}" / "config.yaml").read_text()
        assert f"max_staleness: {s}" in config
        assert len((tmp_path / f"S_{s}" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_malformed_variant_is_refused_before_any_training(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--variant 'fast': expected NAME:KEY=VALUE"):
        pipeline.main(["--model", "tiny", "--variant", "fast", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
