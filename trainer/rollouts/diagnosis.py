"""Why a step trained nothing, or an eval scored nothing, in words a user can act on.

A run whose rollouts all failed, or whose groups all tied, hands back an adapter trained on no
sample; these messages say so, count the failures by kind, name the envs and the first failure,
and say what to check next (`openrft train` stops with exit 1 on them: see trainer/commands/train.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.types import GroupResult, RolloutResult

#: What to check first for each failure kind.
NEXT_STEP = {
    "deadline_exceeded": "rollouts ran past rollout.deadline_s: raise it, or lower rollout.max_in_flight or "
                         "sampling.max_tokens so that a batch of generations ends in time",
    "unavailable": "the env server is down, restarting or answering 5xx: check its log, then "
                   "`openrft conformance URL`",
    "resource_exhausted": "the env server stayed at capacity: raise its max_concurrency or lower "
                          "rollout.max_in_flight",
    "internal": "the env's agent raised: the env server's log has the traceback",
    "score_invalid": "the score was missing, NaN or outside [0, 1]: check the evaluator (or the env's reward)",
    "unauthenticated": "the env server refused the token: check envs[].token",
    "invalid_argument": "the env server refused the /init body: run `openrft conformance URL`",
    "data_loss": "the env server's answers are not protocol v1: run `openrft conformance URL`",
    "not_found": "the env server forgot the rollouts (restarted?): check its log",
}


@dataclass(frozen=True)
class Tally:
    """The rollouts of a step or an eval, by outcome."""

    total: int
    finished: int
    failures: Counter[str]
    envs: tuple[str, ...]
    first_failure: str

    @classmethod
    def of(cls, rollouts: Sequence[RolloutResult]) -> Tally:
        failed = [r for r in rollouts if not r.ok]
        return cls(
            total=len(rollouts),
            finished=len(rollouts) - len(failed),
            failures=Counter(r.failure_kind or "unknown" for r in failed),
            envs=tuple(dict.fromkeys(r.env_url for r in failed if r.env_url)),
            first_failure=f"{failed[0].failure_kind}: {failed[0].status.message}" if failed else "",
        )

    def kinds(self) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in self.failures.most_common())

    def mostly_deadline(self) -> bool:
        return self.total > 0 and self.failures["deadline_exceeded"] * 2 > self.total


def deadline_hint(tally: Tally, deadline_s: float, max_in_flight: int, max_tokens: int) -> str | None:
    """A hint when most rollouts ended at the deadline, else None."""
    if not tally.mostly_deadline():
        return None
    return (f"{tally.failures['deadline_exceeded']} of {tally.total} rollouts ended at the deadline "
            f"(rollout.deadline_s = {deadline_s:g}): raise rollout.deadline_s, or lower rollout.max_in_flight "
            f"({max_in_flight}) or sampling.max_tokens ({max_tokens}) so each batch of generations ends in time")


def untrained_reason(groups: Sequence[GroupResult], *, dropped: int, all_equal: int) -> str:
    """One line: why no group of this step trained."""
    tally = Tally.of([r for g in groups for r in g.rollouts])
    parts = []
    if tally.failures:
        parts.append(f"{tally.total - tally.finished} of {tally.total} rollouts failed ({tally.kinds()})")
    if dropped:
        parts.append(f"{dropped} group(s) had too few finished rollouts (rollout.min_group_size)")
    if all_equal:
        rewards = sorted({round(r.reward, 3) for g in groups for r in g.finished if r.reward is not None})
        shown = ", ".join(f"{x:g}" for x in rewards[:4])
        parts.append(f"{all_equal} group(s) had all-equal rewards ({shown})")
    return "; ".join(parts) or "no groups"


def explain(tally: Tally, *, all_equal: int = 0) -> list[str]:
    """Lines under a headline that says nothing was learned or scored: failures by kind, the envs,
    the first failure, and what to check next."""
    lines = []
    if tally.failures:
        lines.append(f"failures by kind: {tally.kinds()}")
        lines.append(f"env(s): {', '.join(tally.envs) or '?'}; first failure: {tally.first_failure}")
        top = tally.failures.most_common(1)[0][0]
        lines.append(f"next: {NEXT_STEP.get(top, 'see the rollouts dump for each failure message')}")
    if all_equal:
        lines.append(f"{all_equal} group(s) finished with all-equal rewards: nothing to learn from. Next: read a few "
                     "rollouts in RUN_DIR/rollouts/ and check the evaluator; a model that never (or always) "
                     "succeeds needs easier (harder) tasks, a larger group_size or sampling.temperature, or a "
                     "supervised warm start")
    return lines


def nothing_trained(tally: Tally, *, steps: int, all_equal: int, what: str) -> str:
    """The message a run that trained nothing stops with."""
    head = (f"{what}: no sample was trained in {steps} step(s); {tally.finished} of {tally.total} rollouts "
            f"finished, {tally.total - tally.finished} failed")
    return "\n  ".join([head, *explain(tally, all_equal=all_equal)])
