"""Fault 11: a dataset with bad lines, and a config with values of the wrong type, given to the real
CLI (`python -m trainer.cli train`, as `openrft train` runs). Each stops at once with exit code 2 and
every problem named with where it is (file:line and field, or file and key) -- never a traceback --
and nothing is started or written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.faults.harness import REPO
from tests.helpers import free_port


def train_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.cli", "train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)


def write_config(tmp_path: Path, dataset: Path, **extra: object) -> Path:
    config = {"model": str(tmp_path / "model"), "dataset": str(dataset),
              "envs": [{"url": f"http://127.0.0.1:{free_port()}"}], "run_dir": str(tmp_path / "run"),
              "progress": False, **extra}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dataset_with_bad_lines(tmp_path: Path) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_bytes("\n".join([
        good,                                                    # 1 fine
        "{oops",                                                 # 2 not JSON
        "[1, 2]",                                                # 3 not an object
        "",                                                      # 4 blank: skipped
        json.dumps({"messages": []}),                            # 5 no message
        json.dumps({"messages": [{"content": "no role"}]}),      # 6 a message without its role
        good,                                                    # 7 fine
    ]).encode() + b'\n{"messages": [{"role": "user", "content": "\xff"}]}\n')  # 8 not UTF-8
    result = train_cli(str(write_config(tmp_path, dataset)))
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "Traceback" not in err
    for needle in [f"{dataset}:2: not valid JSON", f"{dataset}:3: a task must be a JSON object",
                   f"{dataset}:5: field 'messages'", f"{dataset}:6: field 'messages.0.role'",
                   f"{dataset}:8: not UTF-8"]:
        assert needle in err, (needle, err)
    assert f"{dataset}:1:" not in err and f"{dataset}:4:" not in err and f"{dataset}:7:" not in err
    assert not (tmp_path / "run").exists()


def test_config_with_wrong_types(tmp_path: Path) -> None:
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    path = write_config(tmp_path, dataset, steps="three", rollout={"deadline_s": "soon", "max_retries": 1.5},
                        sampling={"max_tokens": -1})
    result = train_cli(str(path), "--set", "group_size=abc", "--set", "envs=http://x")  # every problem at once
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    where = f"{path} (with --set)"
    for key, value in [("steps", "'three'"), ("rollout.deadline_s", "'soon'"), ("rollout.max_retries", "1.5"),
                       ("sampling.max_tokens", "-1"), ("group_size", "'abc'"), ("envs", "'http://x'")]:
        assert f"{where}: {key}: " in result.stderr and f"(got {value})" in result.stderr, (key, result.stderr)

    (tmp_path / "list.yaml").write_text("- model\n- dataset\n")
    result = train_cli(str(tmp_path / "list.yaml"))
    assert result.returncode == 2 and "top level must be a mapping" in result.stderr
    assert not (tmp_path / "run").exists()
