"""The training progress line: ETA, steps per minute and rollouts per second.

Rates count only this process's steps (a resumed run's earlier steps took no time here), and the
rollouts of the step in progress count as they finish, so rollouts/s moves during a long step.
"""

from __future__ import annotations

import time
from typing import Any

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]"


class Pace:
    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.steps = 0
        self.rollouts = 0

    def rollout_done(self) -> None:
        self.rollouts += 1

    def step_done(self) -> None:
        self.steps += 1

    def fields(self) -> dict[str, str]:
        elapsed = max(1e-9, self._clock() - self.started)
        return {"steps/min": f"{60 * self.steps / elapsed:.2f}", "rollouts/s": f"{self.rollouts / elapsed:.2f}"}


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar over the run's steps with ETA in its line."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True,
                bar_format=BAR_FORMAT)
