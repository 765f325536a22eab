"""Synchronous vs pipelined GRPO steps (or any config variants), side by side in one invocation, on the
demo's training (SmolLM2-135M-Instruct learning two-digit sums against the math env, trainer/configs/demo.yaml).

    python bench/pipeline.py [--model smollm2|tiny] [--steps 80] [--staleness 0,1,2] [--eval-every 10]
                             [--variant NAME:KEY=VALUE,KEY=VALUE ...] [--threshold 0.515625] [--set KEY=VALUE ...]
                             [--out DIR]

Each variant is one `openrft train` run in its own process, one after the other, with the same seed, data
and config. By default the variants are `async.max_staleness` = S for each S of --staleness (S = 0, the
synchronous loop, comes first); --variant names them instead (repeatable; the first is the baseline), e.g.
`--variant sync:async.max_staleness=0 --variant tuned:async.max_staleness=1,optim.schedule=cosine`.
--set applies to every variant. Printed for each: steady steps per minute (60 / mean `time/step` after the
first step), the mean staleness and ratio, the generation time that overlapped learning, and, with
--eval-every, the held-out accuracy (64 two-digit sums, or --eval-n, greedy, one answer each, as `openrft demo` scores
them) of each checkpoint and the training time until it first reached --threshold (TRL's 51.6%, 33 of its 64 sums,
by default). Checkpoints are evaluated after all the training runs, so evaluation never competes with
training for the CPU. The last line holds the ratios of each variant to the first.

--model tiny: a smoke run (the tiny offline model, a trainer-side vowel-fraction evaluator so every
group trains, no held-out evaluation), for the test suite and a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/pipeline.py`: import this checkout's packages
    sys.path.insert(0, str(REPO))

DEMO = REPO / "trainer" / "configs" / "demo.yaml"


def _variants(staleness: str, named: list[str]) -> list[tuple[str, list[str]]]:
    """(name, --set overrides) of each variant, the baseline first."""
    if not named:
        return [(f"S={s}", [f"async.max_staleness={s}"]) for s in sorted({int(x) for x in staleness.split(",")} | {0})]
    variants = []
    for text in named:
        name, sep, sets = text.partition(":")
        if not sep or not name or any("=" not in kv for kv in sets.split(",")):
            raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        variants.append((name, sets.split(",")))
    return variants


def _train(out: Path, model: Path, data: Path, name: str, sets: list[str], steps: int, ckpt: int,
           extra: list[str]) -> dict[str, Any]:
    run_dir = out / "".join(c if c.isalnum() else "_" for c in name)
    cmd = [sys.executable, "-m", "trainer.cli", "train", str(DEMO), "--set", f"model={model}", f"dataset={data}",
           f"run_dir={run_dir}", f"steps={steps}", f"checkpoint_every={ckpt}", "progress=false", *extra, *sets]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    load0, started = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"training variant {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [m["time/step"] for m in metrics[1:]] or [metrics[0]["time/step"]]
    return {
        "name": name, "sets": sets, "run_dir": run_dir, "wall_s": wall, "metrics": metrics,
        "steps_per_min": 60.0 / statistics.fmean(steady),
        "elapsed": {m["step"]: sum(x["time/step"] for x in metrics[: i + 1]) for i, m in enumerate(metrics)},
        "staleness_mean": statistics.fmean(m.get("staleness/mean", 0.0) for m in metrics),
        "ratio_mean": statistics.fmean(m.get("ratio/mean", 1.0) for m in metrics),
        "clip_frac": statistics.fmean(m["clip_frac"] for m in metrics),
        "overlapped_s": sum(m.get("time/overlapped", 0.0) for m in metrics),
        "learn_s": sum(m["time/learn"] for m in metrics),
        "reward_last10": statistics.fmean(m["reward/mean"] for m in metrics[-10:]),
        "load": (load0, os.getloadavg()[0]),
    }


def _evaluate(run: dict[str, Any], model: Path, test: Path, every: int) -> dict[int, float]:
    from trainer.commands.demo import _eval_config
    from trainer.commands.evaluate import evaluate
    from trainer.config import load_config

    scores = {}
    config = load_config(DEMO, [f"model={model}", f"dataset={test}", f"run_dir={run['run_dir']}", "progress=false"])
    last = len(run["metrics"])  # a variant may set its own `steps`; its last step is checkpointed too
    for step in sorted({*range(every, last + 1, every), last}):
        adapter = run["run_dir"] / "checkpoints" / f"step_{step:06d}" / "adapter"
        scores[step] = evaluate(_eval_config(config, dataset=test, adapter=adapter,
                                             out=run["run_dir"] / f"eval_step_{step:06d}.json")).mean_reward
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (the demo's) or tiny (a smoke run)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--staleness", default="0,1", help="max_staleness values; 0 (synchronous) comes first")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a named variant (repeatable; the first is the baseline); replaces --staleness")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every Nth checkpoint (0: no eval)")
    parser.add_argument("--eval-n", type=int, default=64,
                        help="held-out sums to score (the demo's 64 are the first 64 of any larger set)")
    parser.add_argument("--threshold", type=float, default=33 / 64, help="TRL's 51.6%%: 33 of 64 sums")
    parser.add_argument("--set", dest="extra", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = _variants(args.staleness, args.variants)

    out = args.out or Path(tempfile.mkdtemp(prefix="openrft-pipeline-"))
    out.mkdir(parents=True, exist_ok=True)
    from trainer.commands.demo import write_datasets

    train, test = write_datasets(out / "data", test_n=args.eval_n)
    extra = list(args.extra)
    if args.model == "tiny":
        from trainer.models import build_tiny_model

        model = build_tiny_model(out / "tiny")
        extra += ["evaluator=bench.train_step:vowel_fraction", "sampling.max_tokens=8", "lora.rank=4"]
        args.eval_every = 0
    else:
        from trainer.models.smollm2 import convert_smollm2

        model = convert_smollm2() if args.model == "smollm2" else Path(args.model)
    ckpt = args.eval_every or args.steps

    runs = []
    for name, sets in variants:
        print(f"training: {name} (steps={args.steps} {' '.join(sets)}) ...", flush=True)
        runs.append(_train(out, model, train, name, sets, args.steps, ckpt, extra))
    if args.eval_every:
        for run in runs:
            print(f"evaluating the checkpoints of {run['name']} ...", flush=True)
            run["scores"] = _evaluate(run, model, test, args.eval_every)

    width = max(7, *(len(run["name"]) for run in runs))
    print(f"\n{'variant':>{width}} {'steps/min':>9} {'wall s':>7} {'staleness':>9} {'ratio':>6} {'clip':>5} "
          f"{'overlap s':>9} {'learn s':>7} {'reward':>6}  load  held-out by step (training s)")
    for run in runs:
        scores = run.get("scores", {})
        curve = " ".join(f"{k}:{v:.1%}({run['elapsed'][k]:.0f}s)" for k, v in scores.items())
        reached = next((run["elapsed"][k] for k, v in scores.items() if v >= args.threshold), None)
        run["to_threshold_s"] = reached
        print(f"{run['name']:>{width}} {run['steps_per_min']:>9.2f} {run['wall_s']:>7.0f} {run['staleness_mean']:>9.2f} "
              f"{run['ratio_mean']:>6.3f} {run['clip_frac']:>5.3f} {run['overlapped_s']:>9.0f} {run['learn_s']:>7.0f} "
              f"{run['reward_last10']:>6.3f} {run['load'][0]:.1f}-{run['load'][1]:.1f}  {curve}")
    base = runs[0]
    ratios = []
    for run in runs[1:]:
        text = f"{run['name']}: steps/min x{run['steps_per_min'] / base['steps_per_min']:.2f}"
        if base.get("to_threshold_s") and run.get("to_threshold_s") is not None:
            text += f", time to {args.threshold:.1%} x{run['to_threshold_s'] / base['to_threshold_s']:.2f}"
        elif args.eval_every:
            text += f", time to {args.threshold:.1%}: {base['name']} {base.get('to_threshold_s')} s, {run.get('to_threshold_s')} s"
        ratios.append(text)
    summary = {r["name"]: {k: v for k, v in r.items() if k not in ("metrics", "run_dir", "elapsed")} for r in runs}
    (out / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"results: {out / 'pipeline.json'}; load average now {os.getloadavg()[0]:.2f}")
    print(f"ratios vs {base['name']}: " + "; ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
