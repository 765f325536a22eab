"""What the results mean and how they are shown: which fail, whether openrft's trainer can train
against the server, the table, and the `openrft conformance` command."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from env_sdk.conformance._checks import (
    ABSENT,
    BATCHED_STATUS,
    CORE,
    FAIL,
    PASS,
    SKIP,
    TRAINER_USES,
    CheckResult,
    CheckStatus,
)
from env_sdk.conformance._run import run_conformance
from env_sdk.models import PROTOCOL_HEADER, PROTOCOL_VERSION


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.fails]


def trainer_verdict(results: list[CheckResult]) -> tuple[bool, str]:
    """Whether openrft's trainer can train against the server, and why. It needs the core checks only
    (without /status/batch it polls GET /status per rollout; /health, /cancel, /version are optional
    to it), but it does use /health, /status/batch and /init/batch when they answer, so they must work."""
    core = [r.name for r in results if r.level == CORE and r.status != PASS]
    if core:
        return False, f"core check(s) failed: {', '.join(core)}"
    broken = [r.name for r in results if r.name in TRAINER_USES and r.status == FAIL]
    if broken:
        return False, f"it would use these and they are broken: {', '.join(broken)}"
    polls = any(r.name == BATCHED_STATUS and r.status != PASS for r in results)
    return True, "every core check passes" + ("; it polls GET /status per rollout (no /status/batch)" if polls else "")


_STYLE: dict[CheckStatus, str] = {PASS: "green", FAIL: "bold red", ABSENT: "yellow", SKIP: "dim"}


def _verdict(r: CheckResult) -> str:
    return f"[{'bold red' if r.fails else _STYLE[r.status]}]{r.status.upper()}[/]"


def print_table(url: str, results: list[CheckResult], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"protocol v{PROTOCOL_VERSION} conformance: {url}")
    table.add_column("level")
    table.add_column("check")
    table.add_column("verdict")
    table.add_column("detail", overflow="fold")
    for r in results:
        table.add_row(r.level, r.name, _verdict(r), r.detail)
    console.print(table)
    if any(r.status == ABSENT and not r.required for r in results):
        console.print(f"[yellow]ABSENT[/]: not served; allowed, as the server does not claim v1 (no {PROTOCOL_HEADER} "
                      "header). --strict requires every v1 extension.")
    ok, why = trainer_verdict(results)
    if ok:
        console.print(f"[green]openrft's trainer can train against this server[/]: {why}.")
    else:
        console.print(f"[bold red]openrft's trainer cannot train against this server[/]: {why}.")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft conformance", description="`openrft conformance URL [--token T] [--strict]`: check any env server against protocol v1.")
    parser.add_argument("url", help="base URL of the env server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", help="the server's bearer token (also checks that a wrong one gets 401)")
    parser.add_argument("--strict", action="store_true", help="fail on absent v1 extensions too (they fail anyway "
                                                              f"when the server sends {PROTOCOL_HEADER})")
    parser.add_argument("--model-url", help="OpenAI-compatible base URL the env should call (default: a stub "
                                            "served by this command on loopback)")
    parser.add_argument("--stub-host", default="127.0.0.1", help="address the stub model listens on")
    parser.add_argument("--task", help="JSON file with InitRequest fields to send (messages, tools, "
                                       "task_metadata, completion_params) when the env needs a real task")
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds a rollout may take (default 30)")
    args = parser.parse_args(argv)
    task: dict[str, Any] = {}
    if args.task:
        try:
            with open(args.task) as f:
                task = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"--task {args.task}: {exc}")
        if not isinstance(task, dict):
            parser.error(f"--task {args.task}: must hold a JSON object, got {type(task).__name__}")
    results = asyncio.run(run_conformance(args.url, token=args.token, model_url=args.model_url, task=task,
                                          deadline_s=args.deadline, strict=args.strict, stub_host=args.stub_host))
    print_table(args.url, results)
    bad = failed(results)
    if bad:
        Console(stderr=True).print(f"[bold red]{len(bad)} check(s) failed:[/] {', '.join(r.name for r in bad)}")
        return 1
    return 0
