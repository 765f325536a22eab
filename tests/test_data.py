"""Dataset loading (errors name file:line and field) and the resumable task order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data import DatasetError, TaskStream, load_tasks

GOOD = {"messages": [{"role": "user", "content": "hi"}], "ground_truth": "4", "metadata": {"k": 1}}


def test_loads_tasks(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "tools": [{"type": "function"}]}) + "\n")
    tasks = load_tasks(path)
    assert len(tasks) == 2 and tasks[0].ground_truth == "4" and tasks[0].metadata == {"k": 1}
    assert tasks[1].tools == [{"type": "function"}]


def test_malformed_lines_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"ground_truth": 1}),
        json.dumps({"messages": []}),
        json.dumps([1, 2]),
        json.dumps({"messages": [{"content": "no role"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_tasks(path)
    msg = str(info.value)
    assert f"{path}:2: not valid JSON" in msg
    assert f"{path}:3: field 'messages'" in msg
    assert f"{path}:4: field 'messages'" in msg
    assert f"{path}:5: a task must be a JSON object" in msg
    assert f"{path}:6: field 'messages.0.role'" in msg
    assert ":1:" not in msg


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_tasks(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        load_tasks(tmp_path / "e.jsonl")


def test_stream_is_deterministic_covers_each_epoch_and_resumes() -> None:
    a = TaskStream(size=5, seed=3)
    full = [a.take(3) for _ in range(4)]
    flat = [i for chunk in full for i in chunk]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert flat[:5] != flat[5:10]  # reshuffled per epoch
    # same seed, same order; a different seed, a different order
    same, other = TaskStream(size=5, seed=3), TaskStream(size=5, seed=4)
    assert [same.take(3) for _ in range(4)] == full
    assert [other.take(3) for _ in range(4)] != full
    # resume from a saved cursor continues the exact order
    b = TaskStream(size=5, seed=3)
    b.take(3)
    b.take(3)
    c = TaskStream(size=5, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.take(3), c.take(3)] == full[2:]
    assert TaskStream(size=4, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]


def test_resume_with_another_dataset_is_refused() -> None:
    with pytest.raises(DatasetError, match="cannot resume"):
        TaskStream(size=6, seed=3).load_state_dict(TaskStream(size=5, seed=3).state_dict())
