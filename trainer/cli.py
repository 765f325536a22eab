"""`openrft` command line. Each subcommand lives in its own module and parses its own
arguments; this file only dispatches, importing lazily so that `openrft env serve` works
on the light install (no torch)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function", one-line help). function(argv: list[str]) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("env_sdk.cli:env_main", "serve an env server: `env serve MODULE:OBJECT --port N`"),
    "dataset": ("reference_envs.datasets:main", "write a reference env's dataset (JSONL) from a seed"),
    "conformance": ("env_sdk.conformance:main", "check an env server against protocol v1"),
    "model": ("trainer.commands.model:main", "build a local model directory (`tiny`, `smollm2`)"),
    "sft": ("trainer.commands.sft:main", "supervised LoRA warm start on JSONL conversations (OpenAI format)"),
    "train": ("trainer.commands.train:main", "train a LoRA adapter with GRPO against remote envs"),
    "eval": ("trainer.commands.evaluate:main", "mean reward and pass@k of a model on a dataset"),
    "serve": ("trainer.commands.serve:main", "serve a model (+ adapter) behind an OpenAI-compatible API"),
    "export": ("trainer.models.export:main", "write an adapter, or a merged model with --merge"),
    "report": ("trainer.commands.report:main", "rebuild RUN_DIR/report.html"),
    "dashboard": ("trainer.commands.dashboard:main", "a live local page over run directories: curves, rollouts, tokens"),
    "demo": ("trainer.commands.demo:main", "the main job end to end: SmolLM2 learns arithmetic on CPU"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: openrft COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


# the commands that hold a model: run under jemalloc when installed (trainer/commands/allocator.py)
HEAVY = {"sft", "train", "eval", "serve", "demo"}


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] and sys.argv[1] in HEAVY:  # a process of its own, not a call
        from trainer.commands.allocator import PAGE_KEEPING_COMMANDS, reexec_under_jemalloc

        reexec_under_jemalloc(keep_pages=sys.argv[1] in PAGE_KEEPING_COMMANDS)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"openrft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the light install has no torch
        print(f"openrft {name}: needs the training extra (pip install 'openrft[train]'): {exc}", file=sys.stderr)
        return 2
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
