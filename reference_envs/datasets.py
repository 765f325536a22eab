"""`openrft dataset NAME --out FILE_OR_DIR --seed S --n N --split train|test [--kind K]`:
write a reference env's dataset as JSONL, generated deterministically from the seed.

Every env's `dataset.py` has ``generate(split, seed, n, kind=None) -> list[dict]`` (rows with
`messages`, `ground_truth`, `metadata`) and ``KINDS`` (the values `--kind` takes; empty when
the env has a single kind). Train and test never share a task, whatever the seeds: a task's
split is a hash of its content (`split_of`), and a generator keeps only tasks of its split.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENVS = ("math", "sql_tools", "json_extract", "code", "calculator")
SPLITS = ("train", "test")
#: One task in TEST_SHARE lands in the test split.
TEST_SHARE = 5


def split_of(key: str) -> str:
    """The split a task belongs to, from a stable hash of its identity."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if digest % TEST_SHARE == 0 else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def task_rng(env: str, task_id: str, kinds: Sequence[str]) -> tuple[str, random.Random]:
    """(kind, the task's own random generator) for a task id ``"<kind>/<number>"``: all a task is
    rebuilt from. ValueError for an id env never made."""
    kind, _, number = task_id.partition("/")
    if kind not in kinds or not number.isdigit():
        raise ValueError(f"not a {env} task id: {task_id!r} (expected '<{'|'.join(kinds)}>/<number>')")
    return kind, random.Random(f"{env}/{task_id}")


def distinct_tasks(env: str, build: Callable[[str], T], text: Callable[[T], str], *, kinds: Sequence[str],
                   split: str, seed: int, n: int, kind: str | None) -> list[T]:
    """`n` tasks of env `env` in `split` with distinct texts: `build(task_id)` of ids drawn at random
    (all kinds mixed unless `kind` is given), a task kept when its text is new and hashes into `split`."""
    check_split(split)
    rng = random.Random(f"{env}:{split}:{seed}:{kind}")
    choices = [kind] if kind else list(kinds)
    tasks: list[T] = []
    seen: set[str] = set()
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 50 * n + 10_000:
            raise ValueError(f"cannot find {n} distinct {kind or env} tasks for the {split} split; ask for fewer")
        t = build(f"{rng.choice(choices)}/{rng.randrange(10**9)}")
        if text(t) in seen or split_of(f"{env}:{text(t)}") != split:
            continue
        seen.add(text(t))
        tasks.append(t)
    return tasks


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    return count


def generate(name: str, *, split: str, seed: int, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of env `name`'s dataset (see the module docstring)."""
    if name not in ENVS:
        raise ValueError(f"unknown reference env {name!r}; choose one of {', '.join(ENVS)}")
    check_split(split)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    module = importlib.import_module(f"reference_envs.{name}.dataset")
    if kind is not None and kind not in module.KINDS:
        allowed = ", ".join(module.KINDS) if module.KINDS else "none (this env has a single kind)"
        raise ValueError(f"--kind {kind!r} is not a kind of {name}; kinds: {allowed}")
    return module.generate(split=split, seed=seed, n=n, kind=kind)


def default_path(name: str, split: str) -> Path:
    """The small dataset shipped with env `name` (written by `python -m reference_envs.datasets`)."""
    check_split(split)
    return Path(__file__).parent / name / f"{split}.jsonl"


#: What the shipped default files hold: (seed, rows) per split.
DEFAULTS = {"train": (0, 200), "test": (0, 50)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openrft dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=ENVS, help="reference env")
    parser.add_argument("--out", required=True, help="a .jsonl file, or a folder (gets NAME-SPLIT.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=200, help="rows to write")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--kind", default=None, help="task kind, e.g. math: sums | arithmetic | word")
    parser.add_argument("--demos", action="store_true",
                        help="write demonstrations from the env's own solver (OpenAI fine-tuning rows, for "
                        "`openrft sft`), from train tasks not in the shipped train/test files nor in --exclude")
    parser.add_argument("--exclude", action="append", default=None, metavar="FILE",
                        help="with --demos: a dataset whose tasks the demos must not use (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.demos:
            from reference_envs.demos import demo_rows

            exclude = None if args.exclude is None else [Path(p) for p in args.exclude] + [
                default_path(args.name, s) for s in SPLITS]
            rows, args.split = demo_rows(args.name, n=args.n, seed=args.seed, exclude=exclude), "demo"
        else:
            rows = generate(args.name, split=args.split, seed=args.seed, n=args.n, kind=args.kind)
    except ValueError as exc:
        print(f"openrft dataset: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.suffix != ".jsonl":
        out = out / f"{args.name}-{args.split}.jsonl"
    count = write_jsonl(rows, out)
    print(f"wrote {count} {args.name} {args.split} rows (seed {args.seed}) to {out}")
    return 0


def default_rows(name: str, split: str) -> list[dict[str, Any]]:
    """The rows the shipped default file of `name`/`split` must hold."""
    seed, n = DEFAULTS[split]
    return generate(name, split=split, seed=seed, n=n)


if __name__ == "__main__":  # python -m reference_envs.datasets [NAME...]: rewrite the shipped files
    for env_name in sys.argv[1:] or ENVS:
        for split_name in SPLITS:
            write_jsonl(default_rows(env_name, split_name), default_path(env_name, split_name))
