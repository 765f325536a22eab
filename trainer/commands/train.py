"""`openrft train CONFIG [--set k=v ...] [--resume]`: the GRPO training loop against remote envs.

One process, one asyncio loop: the gateway (uvicorn, loopback by default) serves the envs' model
calls from the live peft model while the scheduler drives the envs; between steps the learner
updates the adapter (in a worker thread, holding the backend's lock).

Each step: take `tasks_per_step` tasks (deterministic, resumable order) -> `group_size` rollouts
each -> rewards -> advantages per group (groups with too few finished rollouts are dropped, groups
whose rewards are all equal are skipped; both counted) -> the recorded tokens become training
sequences -> one GRPO update -> metrics line, rollouts dump, maybe a checkpoint. The groups come
from `GroupFeed` (commands/pipeline.py), which with `async.max_staleness` > 0 runs the next steps'
groups while this one learns, and with `rollout.dynamic_sampling` fills a step with groups that teach.

Run directory: config.yaml, metrics.jsonl, rollouts/step_NNNNNN.jsonl, tokens/step_NNNNNN.jsonl (what
was trained: trainer/dashboard/tokens.py), checkpoints/step_NNNNNN/{adapter/, trainer_state.pt}, adapter/ (the latest adapter).
`--resume` restores adapter, optimizer, RNG, step and data cursor from the newest checkpoint, drops
metrics and dumps of the steps after it, and continues: no sample is trained twice and the data
order goes on where it stopped. (Sampling noise itself is not replayed bit for bit.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from env_sdk import Task
from trainer.commands.allocator import release_free_pages
from trainer.commands.progress import Pace, progress_bar
from trainer.commands.pipeline import GroupFeed, sample_metrics, sampler_backend
from trainer.commands.runtime import peak_memory_mb, seed_everything, torch_threads
from trainer.commands.trackers import TrackerError, Trackers
from trainer.config import (
    ConfigError,
    EnvEndpoint,
    TrainConfig,
    load_config,
    save_config,
)
from trainer.dashboard.tokens import write_tokens
from trainer import traces
from trainer.data import DatasetError, TaskStream, load_tasks
from trainer.gateway.server import ServeError, serve_gateway
from trainer.generation.factory import create_backend, sync_weights
from trainer.generation.timed import TimedBackend
from trainer.generation.vllm_servers import VLLMError
from trainer.learning import distributed
from trainer.learning.batch import build_batch, reward_metrics
from trainer.learning.checkpoints import (
    STATE_FILE,
    checkpoint_dir,
    groups_trained,
    latest_checkpoint,
    save_checkpoint,
    start_from_adapter,
    truncate_logs,
)
from trainer.learning.schedule import lr_at
from trainer.rollouts import (
    CircuitOpen,
    EnvPool,
    EnvsUnreachable,
    GatewayEndpoint,
    RolloutScheduler,
)
from trainer.rollouts.diagnosis import (
    Tally,
    deadline_hint,
    nothing_trained,
    untrained_reason,
)
from trainer.rollouts.episodes import episode_metrics
from trainer.rollouts.local_envs import LocalEnvError, local_envs
from trainer.rollouts.rewards import EvaluatorLoadError, load_evaluator
from trainer.types import GenerationBackend, GroupResult, RolloutResult, failure_counts

if TYPE_CHECKING:
    from trainer.learning.learner import Learner

logger = logging.getLogger("trainer.commands.train")


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why."""


class NothingTrained(RunError):
    """Every step of the run (or the last `rollout.max_untrained_steps`) trained no sample: rollouts
    failed or groups tied. The message counts why and says what to check; `openrft train` exits 1."""


# --- the loop -------------------------------------------------------------------------------


def _prepare_run_dir(config: TrainConfig, resume: bool) -> Path:
    run_dir = Path(config.run_dir)
    if not resume and (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        raise RunError(f"run_dir {run_dir} already holds a run (metrics.jsonl); pass --resume to continue it "
                       "or set another run_dir")
    (run_dir / "rollouts").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    return run_dir


async def _train(config: TrainConfig, resume: bool, envs: list[EnvEndpoint]) -> Path:
    import torch

    from trainer.gateway import Gateway
    from trainer.learning.learner import Learner

    tasks = load_tasks(config.dataset)
    evaluator = load_evaluator(config.evaluator) if config.evaluator else None
    pool = EnvPool(envs, routing=config.rollout.routing, poll_s=config.rollout.poll_s)
    try:
        for warning in await pool.probe():
            logger.warning("%s (skipped while down)", warning)
        run_dir = _prepare_run_dir(config, resume)
        seed_everything(config.seed)
        learner = Learner.from_config(config)
        stream = TaskStream(len(tasks), seed=config.seed, shuffle=config.shuffle)
        start = 0
        if resume and (ckpt := latest_checkpoint(run_dir)) is not None:
            state = torch.load(ckpt / STATE_FILE, weights_only=False, map_location=learner.device)
            learner.load_adapter_weights(ckpt / "adapter")
            learner.load_state_dict(state)
            stream.load_state_dict(state["data"])
            start = int(state["step"])
            logger.warning("resuming %s from step %d", run_dir, start)
        elif config.init_adapter:
            try:
                start_from_adapter(learner, config.init_adapter, config.lora)
            except ValueError as exc:
                raise RunError(str(exc)) from None
        distributed.join(learner)  # the other learner ranks, if any, take rank 0's weights and optimizer
        truncate_logs(run_dir, start)
        if start >= config.steps:
            return run_dir
        if config.trace.enabled:
            traces.enable(run_dir, config.trace.otlp_endpoint)

        backend = TimedBackend(sampler_backend(config, learner, make_backend, start))
        try:
            if start:  # a backend with its own copy of the model must serve the resumed weights
                await backend.weights_updated(checkpoint_dir(run_dir, start) / "adapter")
            elif config.init_adapter:
                await backend.weights_updated(Path(config.init_adapter))
            gateway = Gateway(backend, learner.tokenizer, default_max_tokens=config.sampling.max_tokens)
            async with serve_gateway(gateway.app, config.gateway.host, config.gateway.port, config.gateway.public_url) as url:
                scheduler = RolloutScheduler(
                    pool, GatewayEndpoint(gateway, url),
                    completion_params={"model": "policy", "temperature": config.sampling.temperature,
                                       "top_p": config.sampling.top_p, "max_tokens": config.sampling.max_tokens},
                    evaluator=evaluator, deadline_s=config.rollout.deadline_s, max_retries=config.rollout.max_retries,
                    max_in_flight=config.rollout.max_in_flight, run_id=uuid.uuid4().hex[:12],
                    max_consecutive_failures=config.rollout.max_consecutive_failures,
                )
                await _loop(config, run_dir, start, tasks, stream, learner, backend, scheduler)
        finally:  # also when a step fails: servers a backend started must not outlive the run
            backend.close()
        return run_dir
    finally:
        traces.disable()
        await pool.aclose()


def make_backend(config: TrainConfig, learner: Learner, model: Any = None) -> GenerationBackend:
    """The run's generation backend, sampling from the learner's live model (or `model`, its twin for
    pipelined steps; or vLLM servers)."""
    return create_backend(config.backend, config.model, learner.model if model is None else model, learner.tokenizer,
                          generation=config.generation, vllm=config.vllm, lora_rank=config.lora.rank,
                          dtype=str(learner.dtype).removeprefix("torch."), seed=config.seed,
                          log_dir=Path(config.run_dir) / "vllm")


async def _loop(config: TrainConfig, run_dir: Path, start: int, tasks: list[Task], stream: TaskStream,
                learner: Learner, backend: TimedBackend, scheduler: RolloutScheduler) -> None:
    lock = backend.lock or contextlib.nullcontext()
    trained_before = groups_trained(run_dir) > 0  # by the steps a resumed run keeps
    untrained: list[GroupResult] = []  # the groups of the current streak of steps that trained nothing
    untrained_steps = all_equal = 0
    bar, pace = progress_bar(config.steps, start, config.progress), Pace()
    trackers = Trackers.open(config, run_dir)
    feed = GroupFeed(config, tasks, stream, scheduler, start, backend.inner)
    try:
        for step in range(start + 1, config.steps + 1):
            t0 = time.perf_counter()
            backend.take()
            forwards_before = backend.stats.forward_calls if backend.stats else 0
            retries_before, retried_before = scheduler.retries, Counter(scheduler.retried)
            live: list[float] = []
            last_refresh = [0.0]

            def on_rollout(result: RolloutResult) -> None:  # the bar shows this step's reward as rollouts end
                pace.rollout_done()
                if result.ok:
                    live.append(result.reward)
                now = time.monotonic()
                if live and now - last_refresh[0] > 0.5:
                    last_refresh[0] = now
                    bar.set_postfix(reward=f"{statistics.fmean(live):.3f}", rollouts=len(live), **pace.fields(),
                                    refresh=True)

            taken = await feed.next_step(step, on_rollout)
            groups = taken.groups
            t_rollouts = time.perf_counter() - t0
            gen_s, gen_tokens = backend.take()
            forwards = (backend.stats.forward_calls if backend.stats else 0) - forwards_before
            batch = build_batch(groups, config)
            hint = deadline_hint(Tally.of([r for g in groups for r in g.rollouts]), config.rollout.deadline_s,
                                 config.rollout.max_in_flight, config.sampling.max_tokens)
            if hint:
                logger.warning("step %d: %s", step, hint)
            if batch.samples:
                untrained, untrained_steps, all_equal, trained_before = [], 0, 0, True
            else:
                untrained += groups
                untrained_steps += 1
                all_equal += batch.all_equal
                reason = untrained_reason(groups, dropped=batch.dropped, all_equal=batch.all_equal)
                logger.warning("step %d trained nothing: %s", step, reason)

            t1 = time.perf_counter()
            lr = lr_at(step, config.steps, config.optim)

            def learn() -> dict[str, float]:
                with lock:
                    return learner.train_step(batch.samples, lr=lr)

            learn_ns = time.time_ns()
            with feed.learning(taken.metrics):
                stats = await asyncio.to_thread(learn)
            traces.trained(step, batch.samples, start_ns=learn_ns, end_ns=time.time_ns())
            await sync_weights(backend, learner, run_dir, step)
            feed.advance(step)
            release_free_pages()  # bounded memory under jemalloc's kept pages (commands/allocator.py)
            t_learn = time.perf_counter() - t1
            t_step = time.perf_counter() - t0

            metrics: dict[str, Any] = {"step": step, **reward_metrics(groups)}
            metrics.update({
                "loss": stats["loss"], "kl": stats["kl"], "clip_frac": stats["clip_frac"], "lr": lr,
                "tokens_per_s": gen_tokens / t_step if t_step > 0 else 0.0,
                "generate/tokens_per_s": gen_tokens / gen_s if gen_s > 0 else 0.0,
                "time/generate": gen_s, "time/env": max(0.0, t_rollouts - gen_s), "time/learn": t_learn,
                "time/step": t_step,
                # how well generation batched: sampled tokens per model forward (1 = one at a time)
                "generate/forward_calls": float(forwards),
                "generate/tokens_per_forward": gen_tokens / forwards if forwards else 0.0,
                **{f"failures/{kind}": float(n) for kind, n in sorted(failure_counts(groups).items())},
                **{f"retries/{kind}": float(n) for kind, n in sorted((scheduler.retried - retried_before).items())},
                "groups/dropped": float(batch.dropped), "groups/all_equal": float(batch.all_equal),
                "groups/trained": float(batch.trained_groups), "rollouts/retries": float(scheduler.retries - retries_before),
                "samples": float(len(batch.samples)), "tokens/trained": stats["tokens"],
                "grad_norm": stats["grad_norm"], "logprob_abs_diff": stats.get("logprob_abs_diff", 0.0),
                **episode_metrics([r for g in groups for r in g.rollouts]),  # tools, turns, terminations, prefix_mismatch
                "peak_memory_mb": peak_memory_mb(learner.device),
                **_tool_call_metrics(groups),
                **taken.metrics, **sample_metrics(batch.samples, step, stats),
            })
            with (run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            trackers.log(metrics)
            with (run_dir / "rollouts" / f"step_{step:06d}.jsonl").open("w") as fh:
                for g in groups:
                    for r in g.rollouts:
                        fh.write(json.dumps({"step": step, **r.dump(), "trained": r.rollout_id in batch.trained_ids},
                                            default=str) + "\n")
            write_tokens(run_dir, step, batch.samples)
            limit = config.rollout.max_untrained_steps
            if untrained_steps and ((limit and untrained_steps >= limit) or (step == config.steps and not trained_before)):
                if trained_before:  # keep what the earlier steps learned, resumable
                    save_checkpoint(run_dir, step, learner, feed.consumed)
                tally = Tally.of([r for g in untrained for r in g.rollouts])
                raise NothingTrained(nothing_trained(tally, steps=untrained_steps, all_equal=all_equal,
                                                     what=f"steps {step - untrained_steps + 1}-{step}"))
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(run_dir, step, learner, feed.consumed)
            failures = ",".join(f"{kind}:{n}" for kind, n in failure_counts(groups).most_common())
            pace.step_done()
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", loss=f"{metrics['loss']:.4f}",
                            fail=failures or 0, **({} if batch.samples else {"trained": "nothing"}), **pace.fields())
            bar.update(1)
            if not math.isfinite(metrics["loss"]):
                raise RunError(f"step {step}: the loss is {metrics['loss']}; stopping (see {run_dir}/metrics.jsonl)")
    except CircuitOpen as exc:  # the envs are broken: stop, keeping every step that finished
        done = step - 1
        if done > start and latest_checkpoint(run_dir) != checkpoint_dir(run_dir, done):
            save_checkpoint(run_dir, done, learner, feed.consumed)
        raise RunError(f"step {step}: stopped by the circuit breaker: {exc}. Steps 1-{done} are saved; "
                       "fix the env servers, then continue with --resume") from None
    finally:
        await feed.aclose()
        bar.close()
        trackers.close()


def _tool_call_metrics(groups: list[GroupResult]) -> dict[str, float]:
    """Tool calls per rollout, when any rollout of the step made one (the dashboard's tools chart)."""
    calls = [sum(len(m.get("tool_calls") or []) for m in r.messages if isinstance(m, dict))
             for g in groups for r in g.rollouts]
    return {"tools/calls_per_rollout": statistics.fmean(calls)} if any(calls) else {}


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train as `config` says; return the run directory."""
    with torch_threads(config), distributed.launched(config) as ranks:
        if ranks is not None and ranks.rank > 0:  # a learner rank: rank 0 runs the rest
            distributed.follow(config, ranks)
            return Path(config.run_dir)
        try:
            # config.envs stays as written (config.yaml keeps `module:` entries); the pool gets their URLs
            with local_envs(config.envs, log_dir=Path(config.run_dir) / "env_logs") as envs:
                return asyncio.run(_train(config, resume, envs))
        except (distributed.RankLost, distributed.Terminated) as exc:
            ckpt = latest_checkpoint(Path(config.run_dir))
            raise distributed.RankLost(f"{exc}. " + (f"The newest checkpoint is {ckpt}: fix the cause, then relaunch "
                                                     "with --resume (any number of ranks)" if ckpt else
                                                     "No checkpoint was written yet")) from None


USER_ERRORS = (ConfigError, DatasetError, EnvsUnreachable, EvaluatorLoadError, RunError, FileNotFoundError, VLLMError,
               LocalEnvError, ServeError, TrackerError, traces.TracingUnavailable,
               distributed.RankLost)


@contextlib.contextmanager
def _dashboard(config: TrainConfig, port: int | None) -> Any:
    if port is None:
        yield
        return
    from trainer.commands.dashboard import serve_in_thread

    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(serve_in_thread(Path(config.run_dir), port=port))
        except OSError as exc:
            raise RunError(f"--dashboard: {exc}") from None
        print(f"openrft train: dashboard at {url}", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            print(f"openrft train: dashboard stopped; `openrft dashboard {config.run_dir}` shows the run",
                  file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft train", description="train a LoRA adapter with GRPO against remote envs")
    parser.add_argument("config", help="YAML or JSON config file (see trainer/config.py for every key)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set grpo.kl_coef=0.05 steps=20")
    parser.add_argument("--resume", action="store_true", help="continue the run in run_dir from its newest checkpoint")
    parser.add_argument("--dashboard", nargs="?", type=int, const=8765, metavar="PORT",
                        help="serve the live dashboard of this run on 127.0.0.1:PORT (default 8765) while it trains")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="learner ranks on this node: relaunches itself under torchrun (see docs/scale.md)")
    args = parser.parse_args(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return distributed.relaunch(args.nproc, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        with _dashboard(config, args.dashboard if os.environ.get("RANK", "0") == "0" else None):
            run_dir = train(config, resume=args.resume)
    except NothingTrained as exc:
        print(f"openrft train: nothing was trained: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        print(f"openrft train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("openrft train: interrupted", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {run_dir}\nadapter: {run_dir / 'adapter'}")
    return 0
