"""Reading run directories for the dashboard: only files, so a live run, a finished one and one whose
trainer died read the same. A line being written (no newline yet) is left for the next read.

RUNS_DIR is either one run directory (it holds metrics.jsonl or config.yaml) or a folder whose
subfolders (up to two levels down) are runs; a run's id is its path relative to RUNS_DIR.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.dashboard.tokens import expand, tokens_path
from env_sdk.models import SUCCESS_CODES
from trainer.types import status_kind

_STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")


class UnknownRun(LookupError):
    """No run (or step, or rollout) by that id under RUNS_DIR; the message names it."""


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of `path` that parse as JSON objects (a torn or half-written line is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        return []
    rows = []
    for line in text.split("\n")[:-1] if not text.endswith("\n") else text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: they become None (the page draws a gap)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def tool_calls(rollout: dict[str, Any]) -> int:
    return sum(len(m.get("tool_calls") or []) for m in rollout.get("messages") or [] if isinstance(m, dict))


def failure_kind(rollout: dict[str, Any]) -> str | None:
    """The rollout's failure kind as the metrics name it (`failures/<kind>`); None when it finished."""
    code = int((rollout.get("status") or {}).get("code", 0))
    ok = code in SUCCESS_CODES and rollout.get("reward") is not None  # as RolloutResult.ok / .failure_kind
    return None if ok else status_kind(code)


@dataclass
class RunsDir:
    root: Path

    def runs(self) -> list[dict[str, Any]]:
        root = self.root.resolve()
        found = [root] if _is_run(root) else sorted(
            {p.parent for pattern in ("*/metrics.jsonl", "*/config.yaml", "*/*/metrics.jsonl", "*/*/config.yaml")
             for p in root.glob(pattern)})
        out = []
        for path in found:
            metrics = path / "metrics.jsonl"
            out.append({"id": "." if path == root else path.relative_to(root).as_posix(),
                        "name": path.name, "path": str(path),
                        "updated": metrics.stat().st_mtime if metrics.is_file() else None})
        return out

    def run_path(self, run: str) -> Path:
        root = self.root.resolve()
        path = (root / run).resolve()
        if not (path == root or root in path.parents) or not _is_run(path):
            raise UnknownRun(f"no run {run!r} under {root}")
        return path

    def metrics(self, run: str, since: int = 0) -> dict[str, Any]:
        """The metric rows after the first `since` (the page asks only for what is new)."""
        rows = read_jsonl(self.run_path(run) / "metrics.jsonl")
        return {"total": len(rows), "rows": [{k: _finite(v) for k, v in r.items()} for r in rows[since:]]}

    def steps(self, run: str) -> list[int]:
        files = (self.run_path(run) / "rollouts").glob("step_*.jsonl")
        return sorted(int(m.group(1)) for f in files if (m := _STEP_FILE.search(f.name)))

    def _step_rows(self, run: str, step: int) -> list[dict[str, Any]]:
        path = self.run_path(run) / "rollouts" / f"step_{step:06d}.jsonl"
        if not path.is_file():
            raise UnknownRun(f"run {run!r} has no rollouts for step {step}")
        return read_jsonl(path)

    def rollouts(self, run: str, step: int) -> list[dict[str, Any]]:
        """One step's rollouts, summarized for the list (the whole record comes from `rollout`)."""
        out = []
        for r in self._step_rows(run, step):
            messages = r.get("messages") or []
            out.append({"rollout_id": r.get("rollout_id"), "group": r.get("group"), "task_index": r.get("task_index"),
                        "reward": _finite(r.get("reward")), "failure": failure_kind(r), "trained": r.get("trained"),
                        "turns": len(messages), "tool_calls": tool_calls(r), "num_calls": r.get("num_calls"),
                        "termination_reason": r.get("termination_reason")})
        return out

    def rollout(self, run: str, step: int, rollout_id: str) -> dict[str, Any]:
        """A rollout's whole record, its failure kind, and the tokens it trained (when the step dumped them)."""
        for r in self._step_rows(run, step):
            if r.get("rollout_id") == rollout_id:
                break
        else:
            raise UnknownRun(f"run {run!r} step {step} has no rollout {rollout_id!r}")
        samples = []
        for record in read_jsonl(tokens_path(self.run_path(run), step)):
            if record.get("rollout_id") == rollout_id:
                ids, mask, logprobs = expand(record)
                samples.append({"advantage": record.get("advantage"), "ids": ids, "mask": mask, "logprobs": logprobs})
        return {**r, "reward": _finite(r.get("reward")), "failure": failure_kind(r), "samples": samples}

    def evals(self, run: str) -> list[dict[str, Any]]:
        """The held-out evaluations (`eval*.json`) and the demo's summary (`demo.json`), as written."""
        path = self.run_path(run)
        out = []
        for file in [path / "demo.json", *sorted(path.glob("eval*.json"))]:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                out.append({"name": file.name, "data": data})
        return out

    def trace(self, run: str, rollout_id: str) -> list[dict[str, Any]]:
        """The spans of one rollout's trace (RUN_DIR/traces.jsonl, written by the trace exporter)."""
        spans = read_jsonl(self.run_path(run) / "traces.jsonl")
        trace_ids = {s.get("trace_id") for s in spans if (s.get("attributes") or {}).get("openrft.rollout_id") == rollout_id}
        return sorted((s for s in spans if s.get("trace_id") in trace_ids), key=lambda s: s.get("start_ns", 0))
