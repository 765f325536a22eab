"""One GRPO step: openrft (env server over HTTP + gateway + learner) vs TRL's GRPOTrainer.

Same model, same prompts, same group size, same max new tokens, same LoRA (rank, alpha, targets),
same learning rate, same loss (token-mean "DAPO", clip 0.2 / 0.28, no KL), same micro-batch (8
sequences), one optimizer step per `prompts x group` completions, same reward: the fraction of
vowels in the reply (continuous, so groups rarely tie and both sides train every group). TRL
scores in-process; openrft's reward comes from a real env server (its own subprocess) whose agent
calls the policy through the trainer's gateway, as in production. Each side runs in its own
subprocess so that its peak memory (ru_maxrss) is its own; the env server's is not counted.
openrft's side runs under the allocator `openrft train` picks for itself (jemalloc when installed,
trainer/commands/allocator.py); `openrft-ckpt` is the same side with grpo.gradient_checkpointing on.

    python bench/vs_trl.py                        # the tiny model, 8 prompts x 4, 32 new tokens
    python bench/vs_trl.py --model smollm2 --steps 3 --sides openrft openrft-ckpt trl

Seconds per step are the median over the steps after the first (the first warms up). TRL runs
with its own defaults for everything not named above (notably gradient_checkpointing=True).
Baseline: `pip install -e '.[bench]'` (trl 1.16.0). The last line printed holds the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/vs_trl.py`: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.vs_openenv import REPO_ROOT, ServerProcess
from trainer.commands.allocator import preload_env

BASELINE_INSTALL = "pip install -e '.[bench]'   # or: pip install trl==1.16.0"
SIDES = ("openrft", "openrft-ckpt", "trl")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Workload:
    """What both sides are asked to do."""

    model_dir: str
    dataset: str  # JSONL of {"messages": [...]}; TRL gets the same messages as its "prompt"
    steps: int = 4
    prompts: int = 8
    group: int = 4
    max_tokens: int = 32
    lora_rank: int = 16
    lr: float = 1e-5
    micro_batch: int = 8
    threads: int = 2
    seed: int = 0


@dataclass
class SideResult:
    side: str
    step_s: list[float] = field(default_factory=list)
    gen_tokens: list[float] = field(default_factory=list)  # completion tokens per step
    gen_s: list[float] = field(default_factory=list)  # generation time per step, where known
    peak_mb: float = 0.0  # ru_maxrss of the side's process
    reward_mean: list[float] = field(default_factory=list)

    @property
    def median_step_s(self) -> float:
        timed = self.step_s[1:] or self.step_s
        return statistics.median(timed)

    @property
    def tokens_per_s(self) -> float:
        steps = list(zip(self.step_s, self.gen_tokens))[1:] or list(zip(self.step_s, self.gen_tokens))
        return sum(t for _, t in steps) / sum(s for s, _ in steps)


def vowel_fraction(text: str) -> float:
    """The shared reward: the fraction of characters of the reply that are lowercase vowels."""
    return sum(c in "aeiou" for c in text) / max(1, len(text))


# --- the env server for openrft's side (its own subprocess, like a remote env) ----------------


def vowel_env_app() -> Any:
    from env_sdk import AgentResult, create_env_app

    async def agent(task: Any, client: Any) -> AgentResult:
        reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
        text = reply.choices[0].message.content or ""
        return AgentResult(reward=vowel_fraction(text), termination_reason="stop")

    return create_env_app(agent, max_concurrency=1024, name="bench-vowel")


# --- the two sides (each runs in its own subprocess) --------------------------------------------


def run_openrft(w: Workload, env_url: str, work: Path, *, checkpointing: bool = False) -> SideResult:
    from trainer.config import load_config
    from trainer.commands.train import train

    config = load_config(None, [
        f"model={w.model_dir}", f"dataset={w.dataset}", f"envs=[{{url: '{env_url}'}}]", f"run_dir={work / 'run'}",
        f"steps={w.steps}", f"tasks_per_step={w.prompts}", f"group_size={w.group}", "shuffle=false",
        f"sampling.max_tokens={w.max_tokens}", "sampling.temperature=1.0", "sampling.top_p=1.0",
        f"lora.rank={w.lora_rank}", f"lora.alpha={2 * w.lora_rank}", f"lora.target_modules=[{', '.join(LORA_TARGETS)}]",
        f"optim.lr={w.lr}", "grpo.kl_coef=0", "grpo.loss_agg=token_mean", "grpo.clip_eps_low=0.2",
        "grpo.clip_eps_high=0.28", f"grpo.micro_batch_size={w.micro_batch}", f"checkpoint_every={w.steps + 1}",
        f"grpo.gradient_checkpointing={'true' if checkpointing else 'false'}",
        f"threads={w.threads}", "device=cpu", "dtype=float32", f"seed={w.seed}", "progress=false",
        f"generation.max_batch_size={w.prompts * w.group}",
    ])
    run_dir = train(config)
    result = SideResult("openrft-ckpt" if checkpointing else "openrft")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        result.step_s.append(m["time/step"])
        result.gen_tokens.append(m["tokens_per_s"] * m["time/step"])
        result.gen_s.append(m["time/generate"])
        result.reward_mean.append(m["reward/mean"])
    return result


def run_trl(w: Workload, work: Path) -> SideResult:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(w.threads)
    rows = [json.loads(line) for line in Path(w.dataset).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    result = SideResult("trl")

    def vowel_reward(completions: list[Any], **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else (c[-1].get("content") or "") for c in completions]
        return [vowel_fraction(t) for t in texts]

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            result.step_s.append(now - self.t)
            self.t = now

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "completions/mean_length" in logs:
                result.gen_tokens.append(logs["completions/mean_length"] * w.prompts * w.group)
                result.reward_mean.append(logs.get("reward", float("nan")))

    completions = w.prompts * w.group
    if completions % w.micro_batch:
        raise SystemExit(f"prompts x group ({completions}) must be a multiple of the micro-batch ({w.micro_batch})")
    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=w.steps, per_device_train_batch_size=w.micro_batch,
        gradient_accumulation_steps=completions // w.micro_batch, num_generations=w.group,
        max_completion_length=w.max_tokens, temperature=1.0, top_p=1.0, learning_rate=w.lr,
        lr_scheduler_type="constant", beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=w.seed,
        shuffle_dataset=False, disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(w.model_dir)
    trainer = GRPOTrainer(
        model=w.model_dir, reward_funcs=vowel_reward, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=w.lora_rank, lora_alpha=2 * w.lora_rank, lora_dropout=0.0,
                               target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
        callbacks=[Timer()],
    )
    trainer.train()
    return result


def side_main(argv: list[str]) -> int:
    """Entry of a side's subprocess: run it, write its SideResult (with ru_maxrss) as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("--workload", required=True, help="Workload as JSON")
    parser.add_argument("--env-url", default="")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    w = Workload(**json.loads(args.workload))
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.side}-") as tmp:
        if args.side == "trl":
            result = run_trl(w, Path(tmp))
        else:
            result = run_openrft(w, args.env_url, Path(tmp), checkpointing=args.side == "openrft-ckpt")
    result.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    args.out.write_text(json.dumps(asdict(result)))
    return 0


def run_side(side: str, w: Workload, *, env_url: str, work: Path, timeout_s: float) -> SideResult:
    out = work / f"{side}.json"
    log = work / f"{side}.log"
    cmd = [sys.executable, "-m", "bench.vs_trl", "--side", side, "--workload", json.dumps(asdict(w)),
           "--env-url", env_url, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if side != "trl":  # what `openrft train` does for itself before it starts
        env = preload_env(env) or env
    with open(log, "wb") as fh:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}); log tail:\n{tail}")
    data = json.loads(out.read_text())
    return SideResult(**data)


# --- the driver ---------------------------------------------------------------------------------


def prepare(model: str, work: Path, *, steps: int, prompts: int) -> tuple[str, str]:
    """The model directory and the prompts (JSONL) both sides use."""
    if model == "tiny":
        from trainer.models import build_tiny_model

        model_dir = build_tiny_model(work / "tiny")
    else:
        from trainer.models.smollm2 import convert_smollm2

        model_dir = convert_smollm2()
    dataset = work / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say something about the number {i}."}]}
            for i in range(steps * prompts)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(model_dir), str(dataset)


def trl_missing() -> str | None:
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        return f"trl is not installed ({exc}); install it with: {BASELINE_INSTALL}"
    return None


def run(w: Workload, sides: list[str], *, rounds: int = 1, timeout_s: float = 1800.0) -> list[SideResult]:
    """Run the sides (rounds times, alternating order); pool each side's steps over rounds."""
    pooled: dict[str, SideResult] = {s: SideResult(s) for s in sides}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        work = Path(tmp)
        server = ServerProcess("vowel-env", workers=1, http="auto", log_dir=work, factory="bench.vs_trl:vowel_env_app") \
            if any(s != "trl" for s in sides) else None
        try:
            if server:
                server.wait_ready()
            for r in range(rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    res = run_side(side, w, env_url=server.base_url if server else "", work=work, timeout_s=timeout_s)
                    p = pooled[side]
                    p.step_s += res.step_s
                    p.gen_tokens += res.gen_tokens
                    p.gen_s += res.gen_s
                    p.reward_mean += res.reward_mean
                    p.peak_mb = max(p.peak_mb, res.peak_mb)
        finally:
            if server:
                server.stop()
    return [pooled[s] for s in sides]


def table(results: list[SideResult]) -> str:
    head = f"{'side':<8} {'steps':>5} {'s/step':>8} {'gen s/step':>10} {'gen tok/s':>9} {'peak MB':>8} {'reward':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        gen = statistics.median(r.gen_s[1:] or r.gen_s) if r.gen_s else float("nan")
        reward = statistics.fmean(r.reward_mean) if r.reward_mean else float("nan")
        lines.append(f"{r.side:<8} {len(r.step_s):>5} {r.median_step_s:>8.2f} {gen:>10.2f} {r.tokens_per_s:>9.0f} "
                     f"{r.peak_mb:>8.0f} {reward:>7.3f}")
    return "\n".join(lines)


def ratio_line(results: list[SideResult]) -> str:
    by = {r.side: r for r in results}
    ours = [r for r in results if r.side != "trl"]
    if not ours or "trl" not in by:
        return "RATIOS openrft/trl: n/a (one side missing)"
    theirs = by["trl"]
    parts = [f"{r.side}/trl: step_time={r.median_step_s / theirs.median_step_s:.2f} "
             f"tokens_per_s={r.tokens_per_s / theirs.tokens_per_s:.2f} peak_mem={r.peak_mb / theirs.peak_mb:.2f}"
             for r in ours]
    return "RATIOS " + "; ".join(parts) + "  (targets: step_time <= 0.5, peak_mem <= 0.5)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--side"]:
        return side_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["openrft", "trl"])
    parser.add_argument("--steps", type=int, default=None, help="default 4 (tiny), 3 (smollm2)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each side")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating order (pooled)")
    args = parser.parse_args(argv)

    sides = list(args.sides)
    if "trl" in sides and (why := trl_missing()):
        print(f"skipping the TRL side: {why}", file=sys.stderr)
        sides.remove("trl")
    steps = args.steps or (4 if args.model == "tiny" else 3)
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-model-") as tmp:
        model_dir, dataset = prepare(args.model, Path(tmp), steps=steps, prompts=args.prompts)
        w = Workload(model_dir=model_dir, dataset=dataset, steps=steps, prompts=args.prompts, group=args.group,
                     max_tokens=args.max_tokens, lora_rank=args.lora_rank, micro_batch=args.micro_batch,
                     threads=args.threads)
        t0 = time.perf_counter()
        results = run(w, sides, rounds=args.rounds)
    print(f"model={args.model} prompts={w.prompts} group={w.group} max_tokens={w.max_tokens} lora_rank={w.lora_rank} "
          f"micro_batch={w.micro_batch} threads={w.threads} steps={w.steps} x rounds={args.rounds}; "
          f"{os.cpu_count()} cores; fp32 CPU; {time.perf_counter() - t0:.0f} s")
    print(table(results))
    print(ratio_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
