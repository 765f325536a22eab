"""`learner.fsdp: true`: the learner's model sharded over the ranks with FSDP2 (`fully_shard`).

Each decoder layer is one FSDP unit and the root (embeddings, final norm, LM head) another, so a
rank holds 1/N of the frozen base weights, of the LoRA weights and of AdamW's state; a layer's
full weights exist only while it runs (all-gathered, then freed). FSDP's reduce-scatter replaces
the data-parallel gradient sum, as a plain SUM (divide factor 1): the sequence weights
already hold the whole step's normalisation, so the result equals one process.

Sharding happens after rank 0's state (a loaded checkpoint included) has been broadcast, so
checkpoints stay in the one-process format: `lora_state` / `optimizer_state` gather the full LoRA
weights and optimizer state onto rank 0's CPU (collectives: every rank takes part), never the
frozen base weights. Resuming with any world size, with or without fsdp, loads them unsharded.

What a sharded model cannot do (docs/scale.md): generate in-process (config: `backend: vllm`);
prefix sharing (the KV cache carries gradients into a layer around FSDP's backward hooks), and
the LM head run apart under checkpointing (it bypasses the root unit): both are off under it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from trainer.learning.learner import Learner
    from trainer.learning.prefix import MicroBatch

_OPTIONS: dict[str, bool] = {"full_state_dict": True, "cpu_offload": True}


def _trainable_names(learner: Learner) -> list[str]:
    """The optimizer's parameters by name, in its order (Learner builds it from `parameters()`)."""
    return [n for n, p in learner.model.named_parameters() if p.requires_grad]


def shard(learner: Learner, world_size: int) -> None:
    """Shard the learner's model over the `world_size` ranks (every rank calls this, on equal state)
    and rebuild its optimizer over the shards, keeping its state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = _trainable_names(learner)
    state = _by_name(learner.optimizer.state_dict(), names)
    mesh = init_device_mesh("cuda" if learner.device.startswith("cuda") else "cpu", (world_size,))
    for layer in learner.model.get_base_model().get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(learner.model, mesh=mesh)
    for module in learner.model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    kind = type(learner.optimizer)
    accepted = inspect.signature(kind).parameters
    group = {k: v for k, v in learner.optimizer.param_groups[0].items() if k in accepted and k != "params"}
    learner.optimizer = kind([p for p in learner.model.parameters() if p.requires_grad], **group)
    if state["state"]:
        set_optimizer_state_dict(learner.model, learner.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
    learner.grpo = learner.grpo.model_copy(update={"share_prefix": False})
    learner._head_chunks = False


def lora_state(learner: Learner) -> dict[str, torch.Tensor]:
    """The full LoRA weights (peft's key names) on rank 0's CPU; {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(learner.model, options=StateDictOptions(**_OPTIONS, ignore_frozen_params=True))


def optimizer_state(learner: Learner) -> dict[str, Any]:
    """The full optimizer state on rank 0's CPU, in `torch.optim.Optimizer.state_dict()`'s format (as one
    process saves it); {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    state = get_optimizer_state_dict(learner.model, learner.optimizer, options=StateDictOptions(**_OPTIONS))
    if not state:
        return {}
    index = {n: i for i, n in enumerate(_trainable_names(learner))}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def balance(batches: list[MicroBatch], learner: Learner) -> list[MicroBatch]:
    """Every rank must run as many forward passes as the others (each one all-gathers weights with all
    ranks): pad this rank's micro-batches with empty ones (no loss tokens, weight 0) to the most any has."""
    from trainer.types import Sample

    most = torch.tensor([len(batches)], dtype=torch.int64, device=learner.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    pad = learner.pad_id
    empty = Sample([pad, pad], [0, 0], [0.0, 0.0])
    return batches + [learner._collate([empty], [0.0]) for _ in range(int(most) - len(batches))]
