"""Where a training step's groups come from: `GroupFeed` draws tasks in the stream's order, runs their
groups on the envs, and hands them to the loop in draw order. Two knobs shape it:

- `async.max_staleness` = S. With S = 0 step s draws its `tasks_per_step` tasks once step s-1's update
  is done (the synchronous loop). With S > 0 the groups of the next S steps run while the learner
  trains the current one: the sampler is a twin of the model with its own adapter weights
  (generation/versioned.py), so the learner never waits for generation, and each update reaches it
  between two decode steps. A group sampled by policy version v is trained by an update that starts
  from version v + S at the latest; the loss's ratio is against the recorded sampling logprobs.
- `rollout.dynamic_sampling`. A step takes groups in draw order until `tasks_per_step` of them teach
  (rewards differ), or `rollout.max_draws` were taken; tied and dropped groups are counted, not trained.

The budget. With v updates done, a group drawn now may be trained at steps up to v + 1 + S, which need
(v + 1 + S - start) x tasks_per_step useful groups in all. The feed draws while the useful groups it
expects (those of trained steps, the finished ones waiting, and p x those still running, p being the
recent share of groups that teach; 1 without dynamic sampling) fall short of that. Without dynamic
sampling this is exactly tasks_per_step groups per step, S steps ahead. With it, a group that comes
out staler than S (drawn on an optimistic p) is dropped and counted (groups/stale); one still running
when it can no longer be trained within the bound is cancelled at once. With S = 0 that overshoot is
lost, as in DAPO; with S >= 1 the next step takes it.

Resume. A checkpoint saves `consumed`, the task cursor after the last group a trained step took, not
the draw cursor: groups in flight at a checkpoint are drawn again by `--resume`, so none is lost and
none is trained twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from env_sdk import Task
from trainer.config import TrainConfig
from trainer.data import TaskStream
from trainer.generation.versioned import VersionedBackend, shadow_model
from trainer.learning.batch import group_status
from trainer.rollouts import RolloutScheduler
from trainer.types import GenerationBackend, GroupResult, RolloutResult, Sample

if TYPE_CHECKING:
    from trainer.learning.learner import Learner


def sampler_backend(config: TrainConfig, learner: Learner, make: Callable[..., GenerationBackend],
                    version: int) -> GenerationBackend:
    """The run's generation backend: `make(config, learner)` for synchronous steps; for pipelined ones
    (async.max_staleness > 0) one built on a twin of the learner's model, versioned from `version`."""
    if not config.async_.max_staleness:
        return make(config, learner)
    twin, sync = shadow_model(learner.model)
    return VersionedBackend(make(config, learner, model=twin), sync, version=version)


@dataclass
class _Drawn:
    index: int  # dataset index
    cursor: dict[str, Any]  # the stream's state right after this draw
    version: int  # updates done when it was drawn
    job: asyncio.Task[GroupResult]
    status: str | None = None  # when finished: trained / all_equal / dropped (group_status), or failed


@dataclass
class StepGroups:
    groups: list[GroupResult]  # the groups the step took, in draw order (stale ones left out)
    metrics: dict[str, float] = field(default_factory=dict)


class GroupFeed:
    """Draws, runs and hands out groups (see the module docstring). `next_step` returns a step's
    groups; `advance` says an update is done; `consumed` is the task cursor a checkpoint saves."""

    def __init__(self, config: TrainConfig, tasks: Sequence[Task], stream: TaskStream, scheduler: RolloutScheduler,
                 start: int, backend: GenerationBackend | None = None) -> None:
        self.config, self.tasks, self.scheduler = config, tasks, scheduler
        self.stream = stream  # the draw cursor: runs ahead of `consumed` while groups are in flight
        self.consumed = TaskStream(stream.size, stream.seed, stream.shuffle, stream.epoch, stream.position)
        self.tps = config.tasks_per_step
        self.staleness = config.async_.max_staleness
        self.dynamic = config.rollout.dynamic_sampling
        self.max_draws = (config.rollout.max_draws or 4 * self.tps) if self.dynamic else self.tps
        self.start = self.version = start
        self.versioned = backend if isinstance(backend, VersionedBackend) else None
        self.queue: deque[_Drawn] = deque()
        self.draws = 0
        self.useful = 0  # useful groups the trained steps took (tasks_per_step each)
        self.taking = 0  # useful groups the step being collected has taken so far
        self.recent: deque[bool] = deque(maxlen=4 * self.tps)  # whether recently finished groups teach
        self.on_rollout: Callable[[RolloutResult], None] | None = None
        self._changed = asyncio.Event()
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._producer: asyncio.Task[None] | None = None

    # --- drawing -------------------------------------------------------------------------------

    def _expected_useful(self) -> float:
        if not self.dynamic:
            return self.useful + self.taking + len(self.queue)
        p = max(sum(self.recent) / len(self.recent) if self.recent else 1.0, self.tps / self.max_draws)
        done = sum(d.status == "trained" for d in self.queue)
        running = sum(d.status is None for d in self.queue)
        return self.useful + self.taking + done + p * running

    def _fill(self) -> None:
        wanted = (self.version + 1 + self.staleness - self.start) * self.tps
        while self._expected_useful() < wanted:
            self._draw()

    def _draw(self) -> None:
        [index] = self.stream.take(1)
        number, self.draws = self.draws, self.draws + 1
        if self.dynamic:  # which step takes it is not known yet
            step, g = self.version + 1, number
        else:
            step, g = self.start + 1 + number // self.tps, number % self.tps
        job = asyncio.ensure_future(self._run(index, step, g))
        drawn = _Drawn(index, self.stream.state_dict(), self.version, job)
        job.add_done_callback(lambda _: self._finished(drawn))
        self.queue.append(drawn)

    async def _run(self, index: int, step: int, g: int) -> GroupResult:
        [group] = await self.scheduler.run_groups([(index, self.tasks[index])], self.config.group_size, step,
                                                  on_rollout=self._rollout_done, first_group=g)
        return group

    def _rollout_done(self, result: RolloutResult) -> None:
        if self.on_rollout is not None:
            self.on_rollout(result)

    def _finished(self, drawn: _Drawn) -> None:
        if drawn.job.cancelled():
            drawn.status = "failed"
        elif (exc := drawn.job.exception()) is not None:
            drawn.status = "failed"
            if not self._failure.done():  # e.g. the circuit breaker opened: the step stops at once
                self._failure.set_exception(exc)
        else:
            drawn.status = group_status(drawn.job.result(), self.config.rollout.min_group_size)
            self.recent.append(drawn.status == "trained")
        self._changed.set()

    async def _produce(self) -> None:
        while True:
            self._changed.clear()
            self._fill()
            await self._changed.wait()

    # --- the loop's side -----------------------------------------------------------------------

    async def next_step(self, step: int, on_rollout: Callable[[RolloutResult], None] | None = None) -> StepGroups:
        """The groups step `step` trains on (it starts from policy version step - 1)."""
        self.on_rollout = on_rollout
        if self._producer is None:
            self._producer = asyncio.ensure_future(self._produce())
        groups: list[GroupResult] = []
        cursor: dict[str, Any] | None = None
        drawn = kept = stale = 0
        ages: list[int] = []
        while (kept if self.dynamic else drawn) < self.tps and drawn - stale < self.max_draws:
            self._fill()
            head = self.queue[0]
            await asyncio.wait([head.job, self._failure], return_when=asyncio.FIRST_COMPLETED)
            if self._failure.done():
                self._failure.result()  # raises what stopped a group
            self.queue.popleft()
            cursor, drawn = head.cursor, drawn + 1
            if head.job.cancelled():  # doomed to staleness at an earlier step's end
                stale += 1
                continue
            group = head.job.result()
            versions = [c.policy_version for r in group.rollouts for c in r.calls if c.policy_version is not None]
            age = (step - 1) - min(versions, default=head.version)
            if age > self.staleness:
                stale += 1
                continue
            ages.append(age)
            groups.append(group)
            kept += head.status == "trained"
            self.taking = kept if self.dynamic else drawn
        if cursor is not None:
            self.consumed.load_state_dict(cursor)
        for doomed in [d for d in self.queue if d.status is None and d.version < step - self.staleness]:
            doomed.job.cancel()  # it could only be trained staler than the bound: stop paying for it
        self.useful, self.taking = self.useful + self.tps, 0
        self._changed.set()
        metrics = {"sampling/drawn": float(drawn), "sampling/kept": float(kept), "groups/stale": float(stale),
                   "sampling/in_flight": float(len(self.queue)), "staleness/groups_max": float(max(ages, default=0))}
        return StepGroups(groups, metrics)

    def advance(self, version: int) -> None:
        """The update to policy version `version` is done (and the sampler has it)."""
        self.version = version
        self._changed.set()

    @contextlib.contextmanager
    def learning(self, metrics: dict[str, float]) -> Iterator[None]:
        """Around the update: `time/overlapped` = seconds of generation that ran meanwhile."""
        before = self.versioned.busy_s() if self.versioned else 0.0
        yield
        metrics["time/overlapped"] = (self.versioned.busy_s() - before) if self.versioned else 0.0

    async def aclose(self) -> None:
        """Stop drawing and cancel the groups still running (a resumed run draws them again)."""
        jobs = [d.job for d in self.queue] + ([self._producer] if self._producer else [])
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        if self._failure.done():
            self._failure.exception()  # retrieved: no "never retrieved" warning
        self.queue.clear()


def sample_metrics(samples: Sequence[Sample], step: int, stats: dict[str, float]) -> dict[str, float]:
    """Staleness per trained sample (updates between its sampler and the policy this step starts from)
    and the importance ratio against the sampler's logprobs."""
    ages = [(step - 1) - s.policy_version for s in samples if s.policy_version is not None]
    return {
        "staleness/mean": sum(ages) / len(ages) if ages else 0.0,
        "staleness/max": float(max(ages, default=0)),
        "ratio/mean": stats.get("ratio", 1.0),
        "tis_frac": stats.get("tis_frac", 0.0),
    }
