"""Rollouts: driving groups of rollouts on env servers to a scored result each.

`EnvPool` (pool.py) holds the env servers: health, routing, batched waiting. `RolloutScheduler`
(scheduler.py) runs each rollout: init, wait, cancel at the deadline, bounded retries, scoring
(rewards.py). A `ModelEndpoint` (endpoints.py) is where the envs send their model calls. Env
servers the trainer starts itself are local_envs.py's; diagnosis.py says why nothing trained.
"""

from trainer.rollouts.endpoints import ExternalEndpoint, GatewayEndpoint, ModelEndpoint
from trainer.rollouts.pool import EnvPool, EnvSlot, EnvsUnreachable
from trainer.rollouts.scheduler import CircuitOpen, RolloutScheduler

__all__ = ["CircuitOpen", "EnvPool", "EnvSlot", "EnvsUnreachable", "ExternalEndpoint", "GatewayEndpoint",
           "ModelEndpoint", "RolloutScheduler"]
