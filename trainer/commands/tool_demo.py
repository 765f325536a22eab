"""`openrft demo --env calculator` (or sql_tools, json_extract): the warm-start path end to end.

A tool env's cold start: the base model never calls a tool, so RFT from rewards alone gets no
signal. Here: demonstrations from the env's own solver (`reference_envs/demos.py`, tasks disjoint
from the RFT and held-out tasks) -> `openrft sft` (a LoRA adapter) -> RFT that continues the same
LoRA (`init_adapter`) against the env served as a separate process over HTTP -> the base, SFT and
SFT + RFT models scored on the same held-out tasks (greedy, one episode each): success rate,
tool-call rate, invalid-call rate, mean turns. Writes RUN_DIR/tool_demo.json and the RFT run's
report (RUN_DIR/rft/report.html).

Settings: `trainer/configs/tool_demo.yaml` (RFT, `--set` overrides it) and
`trainer/configs/tool_demo_sft.yaml` (SFT).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).parents[1] / "configs" / "tool_demo.yaml"
SFT_CONFIG = Path(__file__).parents[1] / "configs" / "tool_demo_sft.yaml"
DEMO_SEED = 1000  # demos are drawn with their own seed, and skip every RFT / held-out task anyway


def write_data(env: str, data_dir: Path, *, demos: int, train_n: int, test_n: int, seed: int) -> tuple[Path, Path, Path]:
    """(demos, RFT tasks, held-out tasks) of `env`: held-out from the test split, the other two from
    the train split and disjoint (the demos skip every RFT task)."""
    from reference_envs.datasets import default_path, generate, write_jsonl
    from reference_envs.demos import demo_rows

    train, test, demo = data_dir / "rft-train.jsonl", data_dir / "held-out.jsonl", data_dir / "demos.jsonl"
    write_jsonl(generate(env, split="train", seed=seed, n=train_n), train)
    write_jsonl(generate(env, split="test", seed=seed, n=test_n), test)
    exclude = [train, test, default_path(env, "train"), default_path(env, "test")]
    write_jsonl(demo_rows(env, n=demos, seed=DEMO_SEED + seed, exclude=exclude), demo)
    return demo, train, test


def _eval(config: Any, dataset: Path, out: Path, adapter: Path | None) -> Any:
    from trainer.commands.evaluate import evaluate

    cfg = config.model_copy(deep=True)
    cfg.sampling.temperature = 0.0
    cfg.init_adapter = None
    cfg.eval.dataset, cfg.eval.samples, cfg.eval.k, cfg.eval.out = str(dataset), 1, [1], str(out)
    cfg.eval.adapter = str(adapter) if adapter else None
    return evaluate(cfg)


def row_of(result: Any) -> dict[str, float]:
    """The table's figures of one eval: success, tool-call rate, invalid-call rate, mean turns."""
    ep = result.episodes
    validity = ep.get("tools/validity", 1.0)
    return {"success": result.mean_reward, "tool_call_rate": ep.get("tools/call_rate", 0.0),
            "invalid_call_rate": 1.0 - validity, "tool_calls_per_episode": ep.get("tools/calls_per_rollout", 0.0),
            "mean_turns": ep.get("episode/turns", 0.0), "prefix_mismatch": ep.get("prefix_mismatch", 0.0)}


def _table(env: str, tasks: int, rows: dict[str, dict[str, float]]) -> Any:
    from rich.table import Table

    table = Table(title=f"{env}: {tasks} held-out tasks (greedy, one episode each)")
    for name in ("model", "success", "tool-call rate", "invalid calls", "calls/episode", "mean turns"):
        table.add_column(name, justify="left" if name == "model" else "right")
    for model, r in rows.items():
        table.add_row(model, f"{r['success']:.1%}", f"{r['tool_call_rate']:.1%}", f"{r['invalid_call_rate']:.1%}",
                      f"{r['tool_calls_per_episode']:.2f}", f"{r['mean_turns']:.2f}")
    return table


def run_tool_demo(env: str, config: Any, sft_config: Any, run_dir: Path, *, model_dir: Path, demos: int,
                  train_n: int, test_n: int) -> dict[str, Any]:
    """Data, env server, base eval, SFT, SFT eval, RFT from the SFT adapter, final eval, report."""
    from rich.console import Console

    from trainer.commands.report import write_report
    from trainer.commands.sft import sft
    from trainer.commands.train import NothingTrained, train
    from trainer.rollouts.local_envs import local_envs

    console = Console()
    demo_file, train_file, test_file = write_data(env, run_dir / "data", demos=demos, train_n=train_n,
                                                  test_n=test_n, seed=config.seed)
    console.print(f"[bold]data[/]: {demos} demos, {train_n} RFT tasks, {test_n} held-out tasks in {run_dir / 'data'}")
    config.model, config.dataset, config.run_dir = str(model_dir), str(train_file), str(run_dir / "rft")
    config.evaluator = None  # the env scores each episode itself
    sft_config.model, sft_config.dataset, sft_config.run_dir = str(model_dir), str(demo_file), str(run_dir / "sft")
    sft_config.lora = config.lora.model_copy()  # RFT continues this very LoRA
    summary: dict[str, Any] = {"env": env, "held_out_tasks": test_n, "demos": demos, "cpu_count": os.cpu_count()}
    rows: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    with local_envs(config.envs, log_dir=run_dir / "env_logs") as envs:
        config.envs = envs
        console.print("[bold]1/5[/] evaluating the base model")
        rows["base"] = row_of(_eval(config, test_file, run_dir / "eval_base.json", None))
        console.print(f"[bold]2/5[/] SFT on {demos} demos: {sft_config.epochs} epochs of batches of {sft_config.batch_size}")
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        adapter = sft(sft_config) / "adapter"
        sft_steps = sum(1 for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
        summary.update(sft_wall_s=round(time.perf_counter() - t0, 1), sft_steps=sft_steps,
                       sft_load_before=round(load0, 2), sft_load_after=round(os.getloadavg()[0], 2))
        console.print("[bold]3/5[/] evaluating SFT")
        rows["SFT"] = row_of(_eval(config, test_file, run_dir / "eval_sft.json", adapter))
        console.print(f"[bold]4/5[/] RFT from the SFT adapter: {config.steps} steps of "
                      f"{config.tasks_per_step} tasks x {config.group_size} episodes")
        config.init_adapter = str(adapter)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        final = run_dir / "rft" / "adapter"
        try:
            train(config)
        except NothingTrained as exc:  # every group tied: the final row is the SFT adapter, said so
            console.print(f"RFT trained nothing: {exc}")
            summary["rft_trained_nothing"], final = True, adapter
        summary.update(rft_wall_s=round(time.perf_counter() - t0, 1), rft_steps=config.steps,
                       rft_load_before=round(load0, 2), rft_load_after=round(os.getloadavg()[0], 2))
        console.print("[bold]5/5[/] evaluating SFT + RFT")
        rows["SFT + RFT"] = row_of(_eval(config, test_file, run_dir / "eval_sft_rft.json", final))
    summary.update(rows=rows, total_wall_s=round(time.perf_counter() - started, 1),
                   loadavg=[round(x, 2) for x in os.getloadavg()])
    (run_dir / "tool_demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_report(run_dir / "rft")
    console.print(_table(env, test_n, rows))
    console.print(f"SFT: {summary['sft_steps']} steps, {summary['sft_wall_s']:.0f} s; RFT: {config.steps} steps, "
                  f"{summary['rft_wall_s']:.0f} s; whole demo {summary['total_wall_s']:.0f} s "
                  f"(load average {summary['loadavg'][0]:.1f} on {os.cpu_count()} CPUs)")
    console.print(f"report: {report}")
    return summary


def tool_demo_main(env: str, overrides: list[str], run_dir: Path | None, model_dir: Path | None, *, demos: int,
                   train_n: int, test_n: int) -> None:
    """`openrft demo --env NAME`: raises the user errors `openrft demo` reports (demo.main)."""
    from trainer.config import ConfigError, load_config
    from trainer.models.smollm2 import convert_smollm2
    from trainer.sft_config import load_sft_config

    run_dir = run_dir or Path("runs") / time.strftime(f"demo-{env}-%Y%m%d-%H%M%S")
    if (run_dir / "tool_demo.json").is_file() or (run_dir / "rft" / "metrics.jsonl").is_file():
        raise ConfigError(f"--run-dir {run_dir} already holds a run; choose another")
    config = load_config(CONFIG, [f"envs=[{{module: 'reference_envs.{env}.server:app'}}]", *overrides])
    sft_config = load_sft_config(SFT_CONFIG, ["model=", "dataset="])
    print("preparing SmolLM2-135M-Instruct (converted once, then cached) ...", flush=True)
    run_tool_demo(env, config, sft_config, run_dir, model_dir=Path(model_dir or convert_smollm2()), demos=demos,
                  train_n=train_n, test_n=test_n)
