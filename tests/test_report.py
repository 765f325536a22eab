"""The run report on a synthetic run directory in the agreed layout (trainer/commands/train.py writes the
same files; the demo's slow test checks a real one)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from trainer.commands.report import ReportError, build_report, main, write_report


def _rollout(i: int, reward: float | None, answer: str) -> dict:
    return {
        "rollout_id": f"r{i}",
        "group": i // 4,
        "reward": reward,
        "reason": None if reward is not None else "env failed",
        "status": {"code": 100 if reward is not None else 13, "message": "" if reward is not None else "boom"},
        "messages": [
            {"role": "user", "content": f"What is {i} + 1?"},
            {"role": "assistant", "content": answer},
        ],
        "termination_reason": "stop",
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "rollouts").mkdir(parents=True)
    (run / "config.yaml").write_text("model: /m\nsteps: 3\n")
    metrics = [
        {"step": s, "reward/mean": 0.2 * s, "reward/std": 0.1, "pass_rate": 0.2 * s, "loss": 0.1, "kl": 0.01 * s,
         "time/generate": 2.0, "time/env": 0.1, "time/learn": 1.5, "time/step": 3.7, "tokens_per_s": 90.0,
         "failures/env_error": 1 if s == 2 else 0, "peak_memory_mb": 1500.0}
        for s in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "rollouts" / "step_000001.jsonl").write_text(json.dumps(_rollout(99, 0.0, "old step")) + "\n")
    rows = [
        _rollout(0, 1.0, "The answer is 1."),
        _rollout(1, 1.0, "2"),
        _rollout(2, 0.0, "<script>alert('x')</script> 7"),
        _rollout(3, 0.0, "I don't know"),
        _rollout(4, None, ""),
    ]
    (run / "rollouts" / "step_000003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval_after.json").write_text(json.dumps({"mean_reward": 0.5, "pass_at_k": {"pass@1": 0.5}, "tasks": 64}))
    (run / "demo.json").write_text(json.dumps({"held_out_before": 0.1, "held_out_after": 0.6, "train_wall_s": 540.0}))
    return run


def test_report_is_self_contained_with_plots_and_rollouts(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    # four PNG plots, embedded, decodable; nothing fetched from anywhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(png).startswith(b"\x89PNG") for png in images)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # the last step's rollouts as conversations, escaped
    assert "step_000003.jsonl" in page and "old step" not in page
    assert "The answer is 1." in page and "What is 0 + 1?" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; 7" in page
    assert "boom" in page  # a failed rollout counts among the worst
    # summary, failures summed over steps, evaluations and the config
    assert "failures/env_error" in page and "mean_reward" in page and "pass_at_k.pass@1" in page
    assert "held_out_after" in page and "steps: 3" in page


def test_best_are_highest_and_worst_lowest(run_dir: Path) -> None:
    page = build_report(run_dir)
    best, worst = page.split("<h3>Worst</h3>")
    assert "The answer is 1." in best and "I don&#x27;t know" not in best
    assert "I don&#x27;t know" in worst and "The answer is 1." not in worst


def test_missing_metrics_keys_still_render(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    page = build_report(tmp_path)
    assert page.count("data:image/png;base64,") == 4 and "No rollouts recorded." in page


def test_bad_run_dirs_get_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: not valid JSON"):
        build_report(tmp_path)


def test_cli_rebuilds(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
