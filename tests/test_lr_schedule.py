"""`optim.schedule`: the learning rate of each step (constant, linear, cosine, with warmup), the
learner trains at it, and a training run logs it and leaves it in the optimizer state it checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.test_grpo_loss import _samples, make_learner
from tests.test_train_e2e import env_url, read_metrics, tiny_model, write_config  # noqa: F401 (fixtures)
from trainer.commands.train import main
from trainer.config import OptimConfig
from trainer.learning.schedule import lr_at


def test_constant_is_lr_at_every_step() -> None:
    optim = OptimConfig(lr=1e-3)
    assert [lr_at(s, 5, optim) for s in range(1, 6)] == [1e-3] * 5


def test_warmup_ramps_linearly_then_holds() -> None:
    optim = OptimConfig(lr=1e-3, warmup_steps=4)
    assert [lr_at(s, 10, optim) for s in (1, 2, 4, 5, 10)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])


def test_linear_falls_from_lr_to_the_floor_at_the_last_step() -> None:
    optim = OptimConfig(lr=1e-3, schedule="linear", min_lr_ratio=0.1)
    # steps 1..5: progress 0, 1/4, 1/2, 3/4, 1 between 1e-3 and 1e-4
    assert [lr_at(s, 5, optim) for s in range(1, 6)] == pytest.approx([1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4])
    assert lr_at(9, 5, optim) == pytest.approx(1e-4)  # a run extended past its steps stays at the floor


def test_cosine_after_warmup_is_half_way_at_the_middle() -> None:
    optim = OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    # warmup 1, 2; decay over steps 3..7 (progress 0, 1/4, 1/2, 3/4, 1)
    want = [1e-3, 2e-3, 2e-3, 1e-3 * (1 + math.cos(math.pi / 4)), 1e-3, 1e-3 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert [lr_at(s, 7, optim) for s in range(1, 8)] == pytest.approx(want, abs=1e-12)


def test_an_unknown_schedule_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="step")  # type: ignore[arg-type]


def test_the_learner_trains_at_the_lr_it_is_given(tiny_model: Path) -> None:  # noqa: F811
    learner = make_learner(tiny_model)
    samples = _samples(learner, [(4, 3), (6, 2)])

    def trainable() -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in learner.model.parameters() if p.requires_grad])

    before = trainable()
    learner.train_step(samples, lr=0.0)
    assert torch.equal(trainable(), before)  # lr 0: nothing moves
    learner.train_step(samples, lr=1e-2)
    assert not torch.equal(trainable(), before)
    assert {g["lr"] for g in learner.optimizer.param_groups} == {1e-2}


def test_a_training_run_logs_the_schedule_and_checkpoints_it(tmp_path: Path, tiny_model: Path,  # noqa: F811
                                                             env_url: str) -> None:  # noqa: F811
    optim = {"lr": 1e-2, "schedule": "linear", "warmup_steps": 1, "min_lr_ratio": 0.5}
    config_path = write_config(tmp_path, tiny_model, env_url, optim=optim, checkpoint_every=3)
    assert main([str(config_path)]) == 0
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run")]
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3])  # warmup 1 step, then 1e-2 falling to 5e-3 at step 3
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([5e-3])
