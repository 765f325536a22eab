"""`learner.fsdp: true`: under `torchrun --nproc-per-node 2` (gloo, CPU, real processes, tiny model) the
model is sharded with FSDP2, each rank holding about half the parameters. A one-process state (rank 0's
first step alone) is sharded onto the ranks and a second step taken on the shards; its metrics, the
gathered adapter and optimizer state equal two steps in one process, and the adapter loads there.
grad_norm pins the gradient reduction: were FSDP's reduce-scatter an average (its default) rather
than a sum, it would be halved (AdamW alone would hide a scale). Without `backend: vllm` the config
is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ranks_step import (
    init_lora,
    lora_state,
    make_config,
    make_samples,
    run_under_torchrun,
)
from trainer.config import ConfigError, load_config
from trainer.learning.learner import Learner

ATOL = 1e-5  # fp32; a step moves weights by about lr = 1e-2


@pytest.fixture(scope="module")
def fsdp_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run_under_torchrun(tiny_model, out, "fsdp")
    return out


@pytest.fixture(scope="module")
def one_process(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Learner, dict[str, float], Path]:
    learner = Learner.from_config(make_config(tiny_model, "token_mean"))
    init_lora(learner)
    samples = make_samples(learner.model.config.vocab_size)
    learner.train_step(samples)
    metrics = learner.train_step(samples)
    return learner, metrics, learner.save_adapter(tmp_path_factory.mktemp("one") / "adapter")


def test_each_rank_holds_half_the_model(fsdp_run: Path) -> None:
    for rank in (0, 1):
        counts = torch.load(fsdp_run / f"rank{rank}.pt")
        assert counts["local"] < 0.55 * counts["params"]


def test_sharded_step_equals_one_process(fsdp_run: Path, one_process: tuple[Learner, dict[str, float], Path]) -> None:
    learner, metrics, _ = one_process
    sharded = torch.load(fsdp_run / "metrics.pt")
    assert sharded.keys() == metrics.keys()
    for key in metrics:
        assert sharded[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    expected = learner.optimizer.state_dict()
    gathered = torch.load(fsdp_run / "optimizer.pt")
    assert [{**g, "betas": tuple(g["betas"])} for g in gathered["param_groups"]] == expected["param_groups"]
    assert gathered["state"].keys() == expected["state"].keys()
    for i, state in expected["state"].items():
        assert float(gathered["state"][i]["step"]) == float(state["step"]) == 2.0
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(gathered["state"][i][k], state[k], atol=1e-6, rtol=1e-4)


def test_gathered_adapter_equals_one_process_and_loads(tiny_model: Path, fsdp_run: Path,
                                                       one_process: tuple[Learner, dict[str, float], Path]) -> None:
    from safetensors.torch import load_file

    learner, _, adapter = one_process
    sharded = load_file(str(fsdp_run / "adapter" / "adapter_model.safetensors"))
    alone = load_file(str(adapter / "adapter_model.safetensors"))
    assert sharded.keys() == alone.keys() and alone
    assert max(float((sharded[k] - alone[k]).abs().max()) for k in alone) < ATOL
    fresh = Learner.from_config(make_config(tiny_model, "token_mean"))
    init_lora(fresh)
    before = lora_state(fresh)
    fresh.load_adapter_weights(fsdp_run / "adapter")
    loaded, trained = lora_state(fresh), lora_state(learner)
    assert max(float((before[k] - trained[k]).abs().max()) for k in trained) > 100 * ATOL
    assert max(float((loaded[k] - trained[k]).abs().max()) for k in trained) < ATOL


def test_fsdp_needs_the_vllm_backend(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"learner.fsdp needs backend: vllm"):
        load_config(None, defaults={"model": str(tiny_model), "dataset": "d.jsonl", "envs": [{"url": "http://127.0.0.1:9"}],
                                    "learner": {"fsdp": True}})
    assert load_config(None, defaults={"model": str(tiny_model), "dataset": "d.jsonl", "backend": "vllm",
                                       "envs": [{"url": "http://127.0.0.1:9"}], "learner": {"fsdp": True}}).learner.fsdp
