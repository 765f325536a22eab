"""Multi-turn figures of a set of rollouts (a training step's, or an eval's): how the agent used its
tools, how long its episodes ran and how they ended. Read from what the gateway recorded (each
model call's parsed tool calls and the parser's reasons for calls it could not read) and from the
env's termination reason.

Keys (all floats):
  tools/calls_per_rollout    parsed tool calls per finished rollout
  tools/call_rate            share of finished rollouts with at least one parsed tool call
  tools/invalid_calls        attempted tool calls the parser could not read (in all rollouts)
  tools/validity             parsed / attempted calls (1.0 when nothing was attempted)
  tools/invalid/<reason>     the invalid calls by the parser's reason (its first words)
  episode/turns              model calls per finished rollout
  termination/<reason>       finished rollouts by the env's termination reason (submitted,
                             max_turns, length, stop, ...; `unknown` when the env gave none)
  prefix_mismatch            rollouts whose prompts did not extend the previous call's tokens
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Sequence

from trainer.types import RolloutResult


def reason_key(reason: str) -> str:
    """A metric-name-safe short form of a parser reason: `not JSON (Expecting ...)` -> `not_json`."""
    head = reason.split("(")[0].strip().lower()
    return re.sub(r"[^a-z0-9]+", "_", head).strip("_") or "other"


def episode_metrics(rollouts: Sequence[RolloutResult]) -> dict[str, float]:
    finished = [r for r in rollouts if r.ok]
    calls = [sum(len(c.response.get("tool_calls") or []) for c in r.calls) for r in finished]
    invalid = Counter(reason_key(e) for r in rollouts for c in r.calls for e in c.tool_call_errors)
    parsed_all = sum(len(c.response.get("tool_calls") or []) for r in rollouts for c in r.calls)
    attempted = parsed_all + sum(invalid.values())
    out: dict[str, float] = {
        "tools/calls_per_rollout": statistics.fmean(calls) if calls else 0.0,
        "tools/call_rate": statistics.fmean(n > 0 for n in calls) if calls else 0.0,
        "tools/invalid_calls": float(sum(invalid.values())),
        "tools/validity": parsed_all / attempted if attempted else 1.0,
        "episode/turns": statistics.fmean(len(r.calls) for r in finished) if finished else 0.0,
        "prefix_mismatch": float(sum(r.prefix_mismatch for r in rollouts)),
    }
    out.update({f"tools/invalid/{k}": float(n) for k, n in sorted(invalid.items())})
    ends = Counter(r.termination_reason or "unknown" for r in finished)
    out.update({f"termination/{k}": float(n) for k, n in sorted(ends.items())})
    return out
