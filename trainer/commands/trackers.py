"""`report_to: [tensorboard, wandb, mlflow]`: each step's metrics line also goes to the trackers people
use, each through its own official library (the `trackers` extra), with no network by default:

- tensorboard: event files under RUN_DIR/tensorboard (`torch.utils.tensorboard.SummaryWriter`);
- wandb: `mode: offline` under RUN_DIR/wandb (`wandb sync` uploads it later), or online when configured;
- mlflow: a local file store, RUN_DIR/mlruns, unless `trackers.mlflow_uri` names a server. MLflow 3 keeps
  the file store in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`; it is set for a `file:` URI
  only (the light `mlflow-skinny` has no SQL store).

Only finite numbers are logged (NaN and infinities have no portable meaning across the three).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from trainer.config import TrainConfig


class TrackerError(RuntimeError):
    """A tracker in `report_to` cannot start (its library is missing); the message says what to install."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def _needs(module: str, name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackerError(f"report_to: {name} needs its library: pip install 'openrft[trackers]' ({exc})") from None


class TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        _needs("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a step is seconds to minutes: readers see it at once

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        wandb = _needs("wandb", "wandb")
        self.run = wandb.init(project=config.trackers.project, name=config.trackers.run_name or run_dir.name,
                              dir=str(run_dir), mode=config.trackers.wandb_mode,
                              config=config.model_dump(mode="json"), reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        uri = config.trackers.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _needs("mlflow", "mlflow")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(config.trackers.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.trackers.project)
        self.run_id = self.client.create_run(experiment_id, run_name=config.trackers.run_name or run_dir.name).info.run_id
        if (run_dir / "config.yaml").is_file():
            self.client.log_artifact(self.run_id, str(run_dir / "config.yaml"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The run's trackers, fed each step's metrics line."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @classmethod
    def open(cls, config: TrainConfig, run_dir: Path) -> Trackers:
        opened: list[Tracker] = []
        try:
            for name in config.report_to:
                opened.append(TensorBoard(run_dir) if name == "tensorboard"
                              else WandB(config, run_dir) if name == "wandb" else MLflow(config, run_dir))
        except BaseException:
            cls(opened).close()
            raise
        return cls(opened)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.trackers:
            return
        step = int(metrics["step"])
        scalars = {k: float(v) for k, v in metrics.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

