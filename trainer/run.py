"""`openrft train CONFIG [--set k=v ...] [--resume]`: the GRPO training loop against remote envs.

One process, one asyncio loop: the gateway (uvicorn, loopback by default) serves the envs' model
calls from the live peft model while the scheduler drives the envs; between steps the learner
updates the adapter (in a worker thread, holding the backend's lock).

Each step: take `tasks_per_step` tasks (deterministic, resumable order) -> `group_size` rollouts
each -> rewards -> advantages per group (groups with too few finished rollouts are dropped, groups
whose rewards are all equal are skipped; both counted) -> the recorded tokens become training
sequences -> one GRPO update -> metrics line, rollouts dump, maybe a checkpoint.

Run directory: config.yaml, metrics.jsonl, rollouts/step_NNNNNN.jsonl,
checkpoints/step_NNNNNN/{adapter/, trainer_state.pt}, adapter/ (the latest adapter).
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
import random
import resource
import shutil
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, EnvEndpoint, TrainConfig, load_config, save_config
from trainer.data import DatasetError, TaskStream, load_tasks
from trainer.diagnosis import Tally, deadline_hint, nothing_trained, untrained_reason
from trainer.local_envs import LocalEnvError, local_envs
from trainer.rewards import EvaluatorLoadError, load_evaluator
from trainer.scheduler import (
    CircuitOpen,
    EnvPool,
    EnvsUnreachable,
    GatewayEndpoint,
    GroupResult,
    RolloutScheduler,
    failure_counts,
)
from trainer.vllm_backend import VLLMError

logger = logging.getLogger("trainer.run")

STATE_FILE = "trainer_state.pt"


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why."""


class NothingTrained(RunError):
    """Every step of the run (or the last `rollout.max_untrained_steps`) trained no sample: rollouts
    failed or groups tied. The message counts why and says what to check; `openrft train` exits 1."""


# --- generation backend ---------------------------------------------------------------------


def make_backend(config: TrainConfig, learner: Any) -> Any:
    """The generation backend named by `config.backend` (the one place backends are built)."""
    if config.backend == "transformers":
        from trainer.backend import TransformersBackend

        return TransformersBackend(
            learner.model, learner.tokenizer, max_batch_size=config.generation.max_batch_size,
            collect_window_s=config.generation.collect_window_s, seed=config.seed,
        )
    if config.backend == "vllm":
        from trainer.vllm_backend import VLLMBackend

        v = config.vllm
        common: dict[str, Any] = dict(api_key=v.api_key, request_timeout_s=v.request_timeout_s,
                                      load_timeout_s=v.load_timeout_s)
        if v.urls:
            return VLLMBackend(v.urls, **common)
        dtype = v.dtype if v.dtype != "auto" else str(learner.dtype).removeprefix("torch.")
        return VLLMBackend.launch(
            config.model, num_servers=v.num_servers, python=v.python, max_lora_rank=config.lora.rank,
            max_model_len=v.max_model_len, dtype=dtype, extra_args=v.extra_args,
            log_dir=Path(config.run_dir) / "vllm", startup_timeout_s=v.startup_timeout_s, **common,
        )
    raise ConfigError(f"backend: unknown backend {config.backend!r}")


async def sync_weights(backend: Any, learner: Any, run_dir: Path, step: int) -> None:
    """Tell the backend the weights changed. A backend serving its own copy of the model (vLLM:
    `needs_adapter_dir`) gets this step's adapter saved for it; the previous one is then removed."""
    if not getattr(backend, "needs_adapter_dir", False):
        await backend.weights_updated(None)
        return
    sync = run_dir / "sync_adapter"
    adapter_dir = await asyncio.to_thread(learner.save_adapter, sync / f"step_{step:06d}")
    await backend.weights_updated(adapter_dir)
    for old in sync.glob("step_*"):
        if old != adapter_dir:
            shutil.rmtree(old, ignore_errors=True)


class TimedBackend:
    """Wraps a backend to measure the wall time during which any generation was running and the
    tokens it produced (the step's `time/generate` and generation throughput)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.busy_s = 0.0
        self.tokens = 0
        self._active = 0
        self._since = 0.0

    async def generate(self, prompt_ids: list[int], params: Any) -> Any:
        if self._active == 0:
            self._since = time.perf_counter()
        self._active += 1
        try:
            out = await self.inner.generate(prompt_ids, params)
            self.tokens += len(out.token_ids)
            return out
        finally:
            self._active -= 1
            if self._active == 0:
                self.busy_s += time.perf_counter() - self._since

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        await self.inner.weights_updated(adapter_dir)

    def take(self) -> tuple[float, int]:
        """(busy seconds, tokens) since the last take."""
        now = time.perf_counter()
        busy = self.busy_s + (now - self._since if self._active else 0.0)
        if self._active:
            self._since = now
        out = (busy, self.tokens)
        self.busy_s, self.tokens = 0.0, 0
        return out

    def __getattr__(self, name: str) -> Any:  # lock, stats, close ... of the wrapped backend
        return getattr(self.inner, name)


@contextlib.contextmanager
def torch_threads(config: TrainConfig) -> Iterator[None]:
    """torch's CPU threads while a run lasts: `config.threads`, else (on CPU) one less than the
    CPUs, at least 1. The previous setting is restored after (train() may be called in-process)."""
    import os

    import torch

    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    elif config.device != "cuda" and not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the gateway, served on this loop -------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_gateway(app: Any, host: str, port: int, public_url: str | None) -> AsyncIterator[str]:
    """Run `app` with uvicorn as a task on the running loop; yield the URL envs reach it at."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # Ctrl-C stops the trainer, not just the gateway
            yield

    # timeout_graceful_shutdown: requests still generating at shutdown (rollouts past their
    # deadline) are cancelled after a few seconds instead of holding the exit.
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                    timeout_keep_alive=75, timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(), name="gateway")
    while not server.started:
        if task.done():
            exc = task.exception()
            raise RunError(f"the gateway could not listen on {host}:{port}: {exc or 'uvicorn exited'}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        yield public_url.rstrip("/") if public_url else f"http://{shown}:{bound}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except (asyncio.TimeoutError, asyncio.CancelledError):  # never mask the run's own outcome
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# --- one step's bookkeeping -----------------------------------------------------------------


@dataclass
class StepBatch:
    samples: list[Any]
    trained_groups: int
    dropped: int
    all_equal: int
    trained_ids: set[str] = field(default_factory=set)  # the rollouts the samples come from


def build_batch(groups: Sequence[GroupResult], config: TrainConfig) -> StepBatch:
    """Advantages per group, then training sequences from the recorded calls."""
    from trainer.grpo import group_advantages
    from trainer.samples import rollout_samples

    samples: list[Any] = []
    trained_ids: set[str] = set()
    trained = dropped = all_equal = 0
    for group in groups:
        finished = group.finished
        if len(finished) < config.rollout.min_group_size:
            dropped += 1
            continue
        rewards = [r.reward for r in finished]
        if max(rewards) - min(rewards) < 1e-9:
            all_equal += 1
            continue
        trained += 1
        for r, adv in zip(finished, group_advantages(rewards, config.grpo.scale_rewards)):
            samples += rollout_samples(r.calls, adv, r.rollout_id)
            trained_ids.add(r.rollout_id)
    return StepBatch(samples, trained, dropped, all_equal, trained_ids)


def reward_metrics(groups: Sequence[GroupResult]) -> dict[str, float]:
    rewards = [r.reward for g in groups for r in g.finished]
    total = sum(len(g.rollouts) for g in groups)
    return {
        "reward/mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "pass_rate": sum(r >= 1.0 - 1e-6 for r in rewards) / len(rewards) if rewards else 0.0,
        "rollouts/finished": float(len(rewards)),
        "rollouts/failed": float(total - len(rewards)),
    }


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- checkpoints ----------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / "checkpoints").glob("step_*[0-9]") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, learner: Any, stream: TaskStream) -> Path:
    """Written to a temporary dir then renamed: a crash never leaves a half checkpoint."""
    import torch

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    learner.save_adapter(tmp / "adapter")
    state = {"step": step, "data": stream.state_dict(), **learner.state_dict()}
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest = run_dir / "adapter"
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(final / "adapter", latest)
    return final


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity (dropped) for a blank line or one torn by a kill mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _truncate_logs(run_dir: Path, step: int) -> None:
    """Forget what steps after `step` wrote (they are redone after a resume)."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if _logged_step(line) <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    for dump in (run_dir / "rollouts").glob("step_*.jsonl"):
        if int(dump.stem.split("_")[1]) > step:
            dump.unlink()


# --- the loop -------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


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
    from trainer.learner import Learner

    tasks = load_tasks(config.dataset)
    evaluator = load_evaluator(config.evaluator) if config.evaluator else None
    pool = EnvPool(envs, routing=config.rollout.routing, poll_s=config.rollout.poll_s)
    try:
        for warning in await pool.probe():
            logger.warning("%s (skipped while down)", warning)
        run_dir = _prepare_run_dir(config, resume)
        _seed_everything(config.seed)
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
        _truncate_logs(run_dir, start)
        if start >= config.steps:
            return run_dir

        backend = TimedBackend(make_backend(config, learner))
        try:
            if start:  # a backend with its own copy of the model must serve the resumed weights
                await backend.weights_updated(checkpoint_dir(run_dir, start) / "adapter")
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
            close = getattr(backend.inner, "close", None)
            if close is not None:
                close()
        return run_dir
    finally:
        await pool.aclose()


async def _loop(config: TrainConfig, run_dir: Path, start: int, tasks: list[Any], stream: TaskStream,
                learner: Any, backend: TimedBackend, scheduler: RolloutScheduler) -> None:
    from tqdm import tqdm

    lock = getattr(backend.inner, "lock", None) or contextlib.nullcontext()
    trained_before = _groups_trained(run_dir) > 0  # by the steps a resumed run keeps
    untrained: list[GroupResult] = []  # the groups of the current streak of steps that trained nothing
    untrained_steps = all_equal = 0
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not config.progress,
               dynamic_ncols=True)
    try:
        for step in range(start + 1, config.steps + 1):
            t0 = time.perf_counter()
            backend.take()
            forwards_before = _forward_calls(backend)
            retries_before, retried_before = scheduler.retries, Counter(scheduler.retried)
            data_state = stream.state_dict()
            indices = stream.take(config.tasks_per_step)
            live: list[float] = []
            last_refresh = [0.0]

            def on_rollout(result: Any) -> None:  # the bar shows this step's reward as rollouts end
                if result.ok:
                    live.append(result.reward)
                now = time.monotonic()
                if live and now - last_refresh[0] > 0.5:
                    last_refresh[0] = now
                    bar.set_postfix(reward=f"{statistics.fmean(live):.3f}", rollouts=len(live), refresh=True)

            groups = await scheduler.run_groups([(i, tasks[i]) for i in indices], config.group_size, step,
                                                on_rollout=on_rollout)
            t_rollouts = time.perf_counter() - t0
            gen_s, gen_tokens = backend.take()
            forwards = _forward_calls(backend) - forwards_before
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

            def learn() -> dict[str, float]:
                with lock:
                    return learner.train_step(batch.samples)

            stats = await asyncio.to_thread(learn)
            await sync_weights(backend, learner, run_dir, step)
            t_learn = time.perf_counter() - t1
            t_step = time.perf_counter() - t0

            metrics: dict[str, Any] = {"step": step, **reward_metrics(groups)}
            metrics.update({
                "loss": stats["loss"], "kl": stats["kl"], "clip_frac": stats["clip_frac"],
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
                "prefix_mismatch": float(sum(r.prefix_mismatch for g in groups for r in g.rollouts)),
                "peak_memory_mb": peak_memory_mb(learner.device),
            })
            with (run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            with (run_dir / "rollouts" / f"step_{step:06d}.jsonl").open("w") as fh:
                for g in groups:
                    for r in g.rollouts:
                        fh.write(json.dumps({"step": step, **r.dump(), "trained": r.rollout_id in batch.trained_ids},
                                            default=str) + "\n")
            limit = config.rollout.max_untrained_steps
            if untrained_steps and ((limit and untrained_steps >= limit) or (step == config.steps and not trained_before)):
                if trained_before:  # keep what the earlier steps learned, resumable
                    save_checkpoint(run_dir, step, learner, stream)
                tally = Tally.of([r for g in untrained for r in g.rollouts])
                raise NothingTrained(nothing_trained(tally, steps=untrained_steps, all_equal=all_equal,
                                                     what=f"steps {step - untrained_steps + 1}-{step}"))
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(run_dir, step, learner, stream)
            failures = ",".join(f"{kind}:{n}" for kind, n in failure_counts(groups).most_common())
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", loss=f"{metrics['loss']:.4f}",
                            fail=failures or 0, **({} if batch.samples else {"trained": "nothing"}))
            bar.update(1)
            if not math.isfinite(metrics["loss"]):
                raise RunError(f"step {step}: the loss is {metrics['loss']}; stopping (see {run_dir}/metrics.jsonl)")
    except CircuitOpen as exc:  # the envs are broken: stop, keeping every step that finished
        stream.load_state_dict(data_state)
        done = step - 1
        if done > start and latest_checkpoint(run_dir) != checkpoint_dir(run_dir, done):
            save_checkpoint(run_dir, done, learner, stream)
        raise RunError(f"step {step}: stopped by the circuit breaker: {exc}. Steps 1-{done} are saved; "
                       "fix the env servers, then continue with --resume") from None
    finally:
        bar.close()


def _groups_trained(run_dir: Path) -> float:
    """Groups trained by the steps metrics.jsonl holds (a resumed run's earlier steps)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0.0
    return sum(json.loads(line).get("groups/trained", 0.0) for line in metrics.read_text().splitlines() if line.strip())


def _forward_calls(backend: TimedBackend) -> int:
    """Model forward calls the backend has made (0 for backends that do not count them)."""
    return int(getattr(getattr(backend.inner, "stats", None), "forward_calls", 0))


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train as `config` says; return the run directory."""
    with torch_threads(config):
        # config.envs stays as written (config.yaml keeps `module:` entries); the pool gets their URLs
        with local_envs(config.envs, log_dir=Path(config.run_dir) / "env_logs") as envs:
            return asyncio.run(_train(config, resume, envs))


USER_ERRORS = (ConfigError, DatasetError, EnvsUnreachable, EvaluatorLoadError, RunError, FileNotFoundError, VLLMError,
               LocalEnvError)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft train", description="train a LoRA adapter with GRPO against remote envs")
    parser.add_argument("config", help="YAML or JSON config file (see trainer/config.py for every key)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set grpo.kl_coef=0.05 steps=20")
    parser.add_argument("--resume", action="store_true", help="continue the run in run_dir from its newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
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
    print(f"run directory: {run_dir}\nadapter: {run_dir / 'adapter'}")
    return 0
