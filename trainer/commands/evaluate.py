"""`openrft eval CONFIG`: mean reward and pass@k of a model on a dataset, through the same envs and
scheduler as training, with no training.

The model is one of: the base model (`model`), base + a PEFT adapter (`eval.adapter`), both served
by the in-process gateway; or any OpenAI-compatible URL (`eval.url`), which the envs call directly
(no gateway, no token capture). Each task gets `eval.samples` rollouts (n). A rollout that fails
(env error, deadline, invalid score) counts as reward 0 and not passed, and is counted by kind.
pass@k is the unbiased estimator 1 - C(n - c, k) / C(n, k) averaged over tasks (c = rollouts with
reward 1), for each k <= n in `eval.k`.

Writes `eval.out` (default RUN_DIR/eval.json) and the rollouts next to it (`*_rollouts.jsonl`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, EnvEndpoint, TrainConfig, load_config
from trainer.data import DatasetError, load_tasks
from trainer.gateway.server import ServeError
from trainer.generation.vllm_servers import VLLMError
from trainer.rollouts.diagnosis import Tally, deadline_hint, explain
from trainer.rollouts.episodes import episode_metrics
from trainer.rollouts.local_envs import LocalEnvError, local_envs
from trainer.rollouts.rewards import EvaluatorLoadError, load_evaluator
from trainer.rollouts import EnvPool, EnvsUnreachable, ExternalEndpoint, GatewayEndpoint, ModelEndpoint, RolloutScheduler
from trainer.types import failure_counts, GroupResult, RolloutResult

logger = logging.getLogger("trainer.commands.evaluate")
PASS = 1.0 - 1e-6


@dataclass
class EvalResult:
    model: str
    dataset: str
    tasks: int
    samples: int
    mean_reward: float
    pass_at_k: dict[int, float]
    failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    finished: int = 0
    notes: list[str] = field(default_factory=list)  # what went wrong and what to change, when something did
    episodes: dict[str, float] = field(default_factory=dict)  # tool use, turns, terminations (rollouts/episodes.py)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pass_at_k"] = {f"pass@{k}": v for k, v in self.pass_at_k.items()}
        return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(groups: list[GroupResult], model: str, dataset: str, samples: int, ks: list[int],
              seconds: float) -> EvalResult:
    rollouts = [r for g in groups for r in g.rollouts]
    rewards = [r.reward if r.ok else 0.0 for r in rollouts]
    passes = [sum(1 for r in g.rollouts if r.ok and r.reward >= PASS) for g in groups]
    return EvalResult(
        model=model, dataset=dataset, tasks=len(groups), samples=samples,
        mean_reward=statistics.fmean(rewards) if rewards else 0.0,
        pass_at_k={k: statistics.fmean(pass_at_k(samples, c, k) for c in passes) for k in sorted(set(ks)) if k <= samples},
        failures=dict(failure_counts(groups)), seconds=seconds, finished=sum(r.ok for r in rollouts),
        episodes=episode_metrics(rollouts),
    )


def _describe(config: TrainConfig) -> str:
    if config.eval.url:
        return f"{config.eval.url} ({config.eval.model_name})"
    return f"{config.model} + {config.eval.adapter}" if config.eval.adapter else config.model


def _load_policy(config: TrainConfig) -> tuple[Any, Any, str]:
    """(model, tokenizer, dtype name) to generate with: base + adapter for the transformers backend;
    for vLLM servers (which load the model and adapter themselves) the tokenizer alone."""
    from trainer.learning.learner import resolve_device, resolve_dtype
    from trainer.models import load_policy, load_tokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.backend == "vllm":
        return None, load_tokenizer(config.model), str(dtype).removeprefix("torch.")
    model, tokenizer = load_policy(config.model, config.eval.adapter, device=device, dtype=dtype, merge=False)
    return model, tokenizer, str(dtype).removeprefix("torch.")


def _lora_rank(config: TrainConfig) -> int:
    """The adapter's LoRA rank (vLLM servers must be started for it), else the config's."""
    from trainer.models.loading import adapter_config

    if config.eval.adapter:
        return int(adapter_config(config.eval.adapter).get("r", config.lora.rank))
    return config.lora.rank


async def _run(config: TrainConfig, endpoint: ModelEndpoint, pool: EnvPool, tasks: list[Any],
               progress: Any) -> list[GroupResult]:
    s = config.sampling
    scheduler = RolloutScheduler(
        pool, endpoint,
        completion_params={"model": config.eval.model_name, "temperature": s.temperature, "top_p": s.top_p,
                           "max_tokens": s.max_tokens},
        evaluator=load_evaluator(config.evaluator) if config.evaluator else None,
        deadline_s=config.rollout.deadline_s, max_retries=config.rollout.max_retries,
        max_in_flight=config.rollout.max_in_flight, run_id=f"eval-{uuid.uuid4().hex[:8]}",
    )

    def tick(result: RolloutResult) -> None:
        progress.update(1)

    return await scheduler.run_groups(list(enumerate(tasks)), config.eval.samples, step=0, on_rollout=tick)


async def _evaluate(config: TrainConfig, envs: list[EnvEndpoint]) -> tuple[EvalResult, list[GroupResult]]:
    from tqdm import tqdm

    from trainer.gateway.server import serve_gateway

    dataset = config.eval.dataset or config.dataset
    tasks = load_tasks(dataset)[: config.eval.limit]
    if config.evaluator:
        load_evaluator(config.evaluator)  # fail before any rollout
    pool = EnvPool(envs, routing=config.rollout.routing, poll_s=config.rollout.poll_s)
    started = time.perf_counter()
    progress = tqdm(total=len(tasks) * config.eval.samples, desc="eval", unit="rollout", disable=not config.progress)
    try:
        for warning in await pool.probe():
            logger.warning("%s (skipped while down)", warning)
        if config.eval.url:
            groups = await _run(config, ExternalEndpoint(config.eval.url, config.eval.api_key), pool, tasks, progress)
        else:
            from trainer.gateway import Gateway
            from trainer.generation import create_backend

            model, tokenizer, dtype = _load_policy(config)
            backend = create_backend(config.backend, config.model, model, tokenizer, generation=config.generation,
                                   vllm=config.vllm, lora_rank=_lora_rank(config), dtype=dtype, seed=config.seed,
                                   log_dir=Path(config.run_dir) / "vllm")
            try:
                if config.eval.adapter and backend.needs_adapter_dir:  # vLLM: the servers load it by directory
                    await backend.weights_updated(Path(config.eval.adapter))
                gateway = Gateway(backend, tokenizer, model_name=config.eval.model_name,
                                  default_max_tokens=config.sampling.max_tokens)
                async with serve_gateway(gateway.app, config.gateway.host, config.gateway.port,
                                         config.gateway.public_url) as url:
                    groups = await _run(config, GatewayEndpoint(gateway, url), pool, tasks, progress)
            finally:
                backend.close()
    finally:
        progress.close()
        await pool.aclose()
    result = summarize(groups, _describe(config), str(dataset), config.eval.samples, config.eval.k,
                       time.perf_counter() - started)
    tally = Tally.of([r for g in groups for r in g.rollouts])
    hint = deadline_hint(tally, config.rollout.deadline_s, config.rollout.max_in_flight, config.sampling.max_tokens)
    if tally.total and not tally.finished:
        result.notes.append(f"every rollout failed ({tally.total}): the mean reward says nothing of the model")
        result.notes += explain(tally)
    if hint:
        result.notes.append(hint)
    return result, groups


def evaluate(config: TrainConfig) -> EvalResult:
    """Evaluate as `config.eval` says; write the JSON result and the rollouts; return the result."""
    from trainer.commands.runtime import torch_threads

    with torch_threads(config), local_envs(config.envs) as envs:
        result, groups = asyncio.run(_evaluate(config, envs))
    out = Path(config.eval.out) if config.eval.out else Path(config.run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    with out.with_name(out.stem + "_rollouts.jsonl").open("w") as fh:
        for g in groups:
            for r in g.rollouts:
                fh.write(json.dumps(r.dump(), default=str) + "\n")
    return result


def print_table(result: EvalResult, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"openrft eval: {result.model}")
    table.add_column("dataset")
    table.add_column("tasks", justify="right")
    table.add_column("n", justify="right")
    table.add_column("mean reward", justify="right")
    for k in result.pass_at_k:
        table.add_column(f"pass@{k}", justify="right")
    table.add_column("failed", justify="right")
    table.add_row(result.dataset, str(result.tasks), str(result.samples), f"{result.mean_reward:.3f}",
                  *(f"{v:.3f}" for v in result.pass_at_k.values()),
                  ", ".join(f"{k}: {n}" for k, n in result.failures.items()) or "0")
    console = Console()
    console.print(table)
    ep = result.episodes
    if ep.get("tools/calls_per_rollout") or ep.get("tools/invalid_calls") or ep.get("episode/turns", 0) > 1:
        ends = ", ".join(f"{k.split('/', 1)[1]} {int(v)}" for k, v in ep.items() if k.startswith("termination/"))
        console.print(f"tool calls / rollout {ep['tools/calls_per_rollout']:.2f} (rate {ep['tools/call_rate']:.0%}), "
                      f"call validity {ep['tools/validity']:.1%}, turns {ep['episode/turns']:.2f}, ends: {ends}")
    console.print(f"written: {out}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft eval", description="mean reward and pass@k of a model on a dataset")
    parser.add_argument("config", help="YAML or JSON config (the training config works; see its `eval` section)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set eval.samples=8 sampling.temperature=0.7")
    parser.add_argument("--adapter", help="PEFT adapter dir on top of `model` (= --set eval.adapter=...)")
    parser.add_argument("--url", help="evaluate any OpenAI-compatible base URL instead (= --set eval.url=...)")
    parser.add_argument("--out", help="where to write the JSON result (= --set eval.out=...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    for key in ("adapter", "url", "out"):
        if getattr(args, key):
            overrides.append(f"eval.{key}={getattr(args, key)}")
    try:
        config = load_config(args.config, overrides, defaults={"model": ""})
        if not config.model and not config.eval.url:
            raise ConfigError(f"{args.config}: missing required config key 'model' (or give eval.url / --url)")
        result = evaluate(config)
    except (ConfigError, DatasetError, EnvsUnreachable, EvaluatorLoadError, FileNotFoundError, LocalEnvError, ServeError,
            VLLMError) as exc:
        print(f"openrft eval: error: {exc}", file=sys.stderr)
        return 2
    print_table(result, Path(config.eval.out) if config.eval.out else Path(config.run_dir) / "eval.json")
    for note in result.notes:
        print(f"openrft eval: {note}", file=sys.stderr)
    return 0 if result.finished or not result.tasks else 1
