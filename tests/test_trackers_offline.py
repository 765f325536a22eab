"""`report_to: [tensorboard, wandb, mlflow]` on a short real run (tiny model, env on loopback), with no
network: each tracker's scalars are read back with that library's own reader and equal metrics.jsonl.

- tensorboard: `EventAccumulator`;
- mlflow: `MlflowClient.get_metric_history` on the run's local file store;
- wandb (offline): wandb 0.31 ships no Python reader of its offline `.wandb` transaction log (its
  `sync` lives in the Go core), so the test reads the log's framing (LevelDB log format: 32 KiB blocks,
  7-byte record headers) and decodes each record with wandb's own protobuf `Record` class.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.test_train_e2e import env_url, tiny_model, write_config  # noqa: F401 (fixtures)
from trainer.commands.train import main

pytest.importorskip("tensorboard", reason="the `trackers` extra")
pytest.importorskip("wandb", reason="the `trackers` extra")
pytest.importorskip("mlflow", reason="the `trackers` extra")

KEYS = ("reward/mean", "loss", "time/step")


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, out = run_file.read_bytes(), 32768, 7, b"", {}  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                out[record.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                 for i in record.history.item}
    return out


def test_three_trackers_get_the_metrics_offline(tmp_path: Path, tiny_model: Path, env_url: str,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_config(tmp_path, tiny_model, env_url, report_to=["tensorboard", "wandb", "mlflow"],
                          trackers={"project": "trackers-test"})
    assert main([str(config)]) == 0
    run = tmp_path / "run"
    expected = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = {key: [(m["step"], m[key]) for m in expected] for key in KEYS}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in KEYS:
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == want[key]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("trackers-test").experiment_id])
    assert mlflow_run.info.run_name == "run" and mlflow_run.info.status == "FINISHED"
    for key in KEYS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, key))
        assert history == [(s, pytest.approx(v)) for s, v in want[key]]

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    assert sorted(history) == [m["step"] for m in expected]
    for key in KEYS:
        assert [(s, history[s][key]) for s in sorted(history)] == [(s, pytest.approx(v)) for s, v in want[key]]


def test_a_missing_tracker_library_is_a_clear_error(tmp_path: Path, tiny_model: Path, env_url: str,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    config = write_config(tmp_path, tiny_model, env_url, report_to=["wandb"], steps=1)
    assert main([str(config)]) == 2
    assert "report_to: wandb needs its library: pip install 'openrft[trackers]'" in capsys.readouterr().err
