"""`RUN_DIR/report.html`: one self-contained page (plots as base64 PNGs, no server, no
scripts) that says how a run went: reward and pass rate per step, KL, where each step's time
went, held-out evaluations when the run has them, and the best and worst rollouts of the
last step as readable conversations.

`openrft report RUN_DIR` rebuilds it; the trainer and the demo call `write_report`.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROLLOUTS_SHOWN = 3  # best and worst, each


class ReportError(ValueError):
    """The run directory is missing something the report needs; the message names it."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(metrics, 1):
        y = _number(row.get(key))
        if y is not None:
            xs.append(_number(row.get("step")) or float(i))
            ys.append(y)
    return xs, ys


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(metrics: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, str]], str]] = [
        ("Reward", [("reward/mean", "mean")], "reward"),
        ("Pass rate", [("pass_rate", "reward = 1")], "fraction of rollouts"),
        ("KL to the base model", [("kl", "kl")], "kl"),
        (
            "Step timings",
            [("time/step", "step"), ("time/generate", "generate"), ("time/env", "env"), ("time/learn", "learn")],
            "seconds",
        ),
    ]
    if any((_number(m.get("tools/calls_per_rollout")) or 0) > 0 or (_number(m.get("episode/turns")) or 0) > 1
           for m in metrics):  # a multi-turn / tool run (rollouts/episodes.py)
        panels.append(("Tool use", [("tools/calls_per_rollout", "tool calls / rollout"), ("episode/turns", "turns"),
                                    ("tools/invalid_calls", "invalid calls")], "per rollout (invalid: count)"))
    out = []
    for title, keys, ylabel in panels:
        fig, ax = plt.subplots(figsize=(5.2, 3.0))
        drawn = False
        for key, label in keys:
            xs, ys = _series(metrics, key)
            if not xs:
                continue
            drawn = True
            ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=label)
            if key == "reward/mean":
                _, std = _series(metrics, "reward/std")
                if len(std) == len(ys):
                    # rewards live in [0, 1]: the band is clipped to it
                    low = [max(0.0, y - s) for y, s in zip(ys, std)]
                    high = [min(1.0, y + s) for y, s in zip(ys, std)]
                    ax.fill_between(xs, low, high, alpha=0.2)  # ± std
        if not drawn:
            ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=ax.transAxes)
        elif len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        out.append((title, _png(fig)))
        plt.close(fig)
    return out


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(str(p.get("text", p)) if isinstance(p, dict) else str(p) for p in content)
    return json.dumps(content)


def _conversation(rollout: dict[str, Any]) -> str:
    parts = []
    for message in rollout.get("messages") or []:
        role = str(message.get("role", "?"))
        body = html.escape(_content_text(message.get("content")))
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments")
            args = args if isinstance(args, str) else json.dumps(args)
            body += f'<div class="call">→ {html.escape(str(fn.get("name")))}({html.escape(args)})</div>'
        parts.append(f'<div class="msg {html.escape(role)}"><div class="role">{html.escape(role)}</div><pre>{body}</pre></div>')
    if not parts:
        parts.append('<div class="msg"><pre>(no messages recorded)</pre></div>')
    status = rollout.get("status") or {}
    facts = [
        f"reward {rollout.get('reward')}",
        f"group {rollout.get('group')}",
        f"termination {rollout.get('termination_reason')}",
    ]
    if rollout.get("reason"):
        facts.append(f"reason: {rollout['reason']}")
    if isinstance(status, dict) and status.get("message"):
        facts.append(f"status {status.get('code')}: {status['message']}")
    head = html.escape(" · ".join(facts))
    return f'<div class="rollout"><div class="facts">{html.escape(str(rollout.get("rollout_id", "")))} — {head}</div>{"".join(parts)}</div>'


def _best_and_worst(rollouts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    scored = [r for r in rollouts if _number(r.get("reward")) is not None]
    scored.sort(key=lambda r: _number(r["reward"]) or 0.0, reverse=True)
    n = min(ROLLOUTS_SHOWN, len(scored) // 2 or len(scored))
    best = scored[:n]
    failed = [r for r in rollouts if _number(r.get("reward")) is None]  # errors are the worst of all
    worst = (failed + scored[::-1])[: ROLLOUTS_SHOWN]
    return best, [r for r in worst if r not in best] or worst


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _fmt(value: Any) -> str:
    number = _number(value)
    if number is None:
        return str(value)
    return f"{number:.4g}" if not number.is_integer() else str(int(number))


def _summary(metrics: list[dict[str, Any]]) -> list[tuple[str, str]]:
    last = metrics[-1]
    rows = [("steps", _fmt(last.get("step", len(metrics))))]
    for key in ("reward/mean", "pass_rate", "kl", "time/step", "tokens_per_s", "peak_memory_mb"):
        if key in last:
            rows.append((f"last {key}", _fmt(last[key])))
    total = sum(_number(m.get("time/step")) or 0.0 for m in metrics)
    if total:
        rows.append(("training time (sum of steps)", f"{total:.0f} s"))
    failures: dict[str, float] = {}
    for m in metrics:
        for key, value in m.items():
            if key.startswith("failures/") and _number(value):
                failures[key] = failures.get(key, 0.0) + (_number(value) or 0.0)
    rows += [(key, _fmt(value)) for key, value in sorted(failures.items())]
    return rows


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        elif _number(value) is not None or isinstance(value, str):
            rows.append((f"{prefix}{key}", _fmt(value)))
    return rows


def _evaluations(run_dir: Path) -> str:
    """`demo.json` (the demo's summary) and any `eval*.json` (e.g. the demo's before/after)."""
    sections = []
    for path in [run_dir / "demo.json", *sorted(run_dir.glob("eval*.json"))]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(data, dict):
            sections.append(f"<h3>{html.escape(path.name)}</h3>{_table(_flat(data))}")
    return "".join(sections)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em} .sub{color:#666;margin-top:0}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plots img{border:1px solid #ddd;border-radius:4px}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f6f6f6;font-weight:600}
.rollout{border:1px solid #ccc;border-radius:6px;margin:.8em 0;padding:.5em}
.facts{font-size:.85em;color:#555;margin-bottom:.4em}
.msg{margin:.3em 0;padding:.3em .6em;border-radius:4px;background:#f4f4f4}
.msg.user{background:#eef4ff} .msg.assistant{background:#effaf0} .msg.tool{background:#fff7e6}
.role{font-size:.75em;text-transform:uppercase;color:#777}
pre{white-space:pre-wrap;word-break:break-word;margin:.2em 0;font-family:ui-monospace,monospace;font-size:.9em}
.call{color:#8a4b00}
"""


def build_report(run_dir: str | Path) -> str:
    """The report page of `run_dir` as an HTML string."""
    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: not found (is {run} a run directory written by `openrft train`?)")
    metrics = _read_jsonl(metrics_path)
    if not metrics:
        raise ReportError(f"{metrics_path}: no steps recorded yet")

    step_files = sorted((run / "rollouts").glob("step_*.jsonl"))
    rollouts_html = "<p>No rollouts recorded.</p>"
    if step_files:
        last = step_files[-1]
        rollouts = _read_jsonl(last)
        best, worst = _best_and_worst(rollouts)
        rollouts_html = (
            f"<p>From {html.escape(last.name)} ({len(rollouts)} rollouts).</p>"
            f"<h3>Best</h3>{''.join(map(_conversation, best)) or '<p>none scored</p>'}"
            f"<h3>Worst</h3>{''.join(map(_conversation, worst)) or '<p>none</p>'}"
        )
    plots = "".join(f'<img alt="{html.escape(t)}" src="data:image/png;base64,{png}">' for t, png in _plots(metrics))
    config = run / "config.yaml"
    config_html = (
        f"<details><summary>config.yaml</summary><pre>{html.escape(config.read_text(encoding='utf-8'))}</pre></details>"
        if config.is_file()
        else ""
    )
    evaluations = _evaluations(run)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>openrft run {html.escape(run.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>openrft run report</h1><p class='sub'>{html.escape(str(run.resolve()))}</p>"
        f"<h2>Summary</h2>{_table(_summary(metrics))}"
        + (f"<h2>Held-out evaluation</h2>{evaluations}" if evaluations else "")
        + f"<h2>Training curves</h2><div class='plots'>{plots}</div>"
        f"<h2>Rollouts of the last step</h2>{rollouts_html}{config_html}</body></html>"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` and return its path."""
    path = Path(run_dir) / "report.html"
    path.write_text(build_report(run_dir), encoding="utf-8")
    return path


def main(argv: list[str]) -> int:
    """`openrft report RUN_DIR`."""
    parser = argparse.ArgumentParser(prog="openrft report", description="rebuild RUN_DIR/report.html")
    parser.add_argument("run_dir", type=Path, help="a run directory written by `openrft train`")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except ReportError as exc:
        print(f"openrft report: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
