"""The training progress line: ETA, steps/min and rollouts/s, rendered by tqdm as `openrft train` does
(the live line of a real run is checked in tests/test_dashboard_browser.py)."""

from __future__ import annotations

from typing import Any

from trainer.commands.progress import Pace, progress_bar


def test_pace_counts_this_process_only_and_the_bar_shows_eta(capsys: Any) -> None:
    now = [100.0]
    pace = Pace(clock=lambda: now[0])
    for _ in range(24):
        pace.rollout_done()
    pace.step_done()
    now[0] += 30.0  # 1 step and 24 rollouts in 30 s
    assert pace.fields() == {"steps/min": "2.00", "rollouts/s": "0.80"}

    bar = progress_bar(total=10, initial=4, enabled=True)  # a resumed run: steps 1-4 took no time here
    bar.set_postfix(**pace.fields(), refresh=False)
    bar.update(1)
    bar.refresh()
    bar.close()
    line = capsys.readouterr().err.strip().rsplit("\r", 1)[-1]
    assert "5/10" in line and "ETA" in line and "steps/min=2.00" in line and "rollouts/s=0.80" in line, line
