"""The bench scripts at a trivially small size, so that they keep running as the code moves.

The openrft side always runs; a baseline side (OpenEnv, TRL) is skipped with the reason when
its package is not installed (`pip install -e '.[bench]'`)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import vs_openenv

REPO = Path(__file__).resolve().parent.parent


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


OPENENV_MISSING = _missing("openenv")


@pytest.fixture(scope="module")
def openenv_points() -> dict[str, vs_openenv.Point]:
    """One short run of every server kind installed here (servers start side by side)."""
    kinds = ["bare", "openrft"] + ([] if OPENENV_MISSING else ["openenv"])
    points = vs_openenv.run(kinds, [1, 8], connections=4, duration_s=0.3, warmup_s=0.1, rounds=1)
    assert [(p.kind, p.concurrency) for p in points] == [(k, c) for k in kinds for c in (1, 8)]
    return {f"{p.kind}/{p.concurrency}": p for p in points}


def _assert_healthy(p: vs_openenv.Point) -> None:
    assert p.errors == 0, p.first_error
    assert p.episodes >= p.concurrency  # the window lasts until every session finished one
    assert p.server_cpu_s > 0 and p.eps_per_core > 0
    assert 0 < p.pct_ms(50) <= p.pct_ms(99)


def test_vs_openenv_openrft_and_bare_complete_rollouts(openenv_points: dict[str, vs_openenv.Point]) -> None:
    for key in ("bare/1", "bare/8", "openrft/1", "openrft/8"):
        p = openenv_points[key]
        _assert_healthy(p)
        assert p.requests >= 2 * p.episodes  # init + at least one status each
    line = vs_openenv.ratio_line(list(openenv_points.values()))
    assert line.startswith("RATIOS") and "openrft/bare c1=" in line and "c8=" in line


def test_vs_openenv_in_process_asgi_cost() -> None:
    costs = {(k, 4): asyncio.run(vs_openenv.asgi_cost(k, episodes=40, concurrency=4)) for k in ("bare", "openrft")}
    assert all(0 < us < 1e6 for us in costs.values()), costs
    assert "asgi-c4=" in vs_openenv.ratio_line([], costs)


@pytest.mark.skipif(OPENENV_MISSING, reason="openenv-core not installed: pip install -e '.[bench]'")
def test_vs_openenv_openenv_echo_episodes(openenv_points: dict[str, vs_openenv.Point]) -> None:
    for key in ("openenv/1", "openenv/8"):
        p = openenv_points[key]
        _assert_healthy(p)
        assert p.requests == 2 * p.episodes  # reset + step
    assert "openrft/openenv c1=" in vs_openenv.ratio_line(list(openenv_points.values()))


def test_vs_openenv_cli_reports_a_missing_baseline(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "openenv.core.env_server.http_server", None)  # import fails
    assert vs_openenv.baseline_missing("openenv") is not None
    assert vs_openenv.main(["--kinds", "openenv"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_gpu_script_smoke_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch", reason="bench/gpu.py needs torch: pip install -e '.[train]'")
    from bench import gpu

    threads = torch.get_num_threads()
    try:
        assert gpu.main(["--smoke"]) == 0
    finally:
        torch.set_num_threads(threads)  # --smoke pins one thread; leave the process as it was
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT "), out
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert float(fields["gen_tok_s"]) > 0 and float(fields["learn_tok_s"]) > 0
    assert fields["mfu"] == "n/a"  # no peak known for a CPU
    assert "generation" in out and "learner" in out and "LoRA r4" in out


@pytest.fixture(scope="module")
def trl_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both sides of bench/vs_trl.py (TRL only where installed) on the tiny model, 2 short steps."""
    pytest.importorskip("torch", reason="bench/vs_trl.py needs the training extra: pip install -e '.[train]'")
    from bench import vs_trl

    work = tmp_path_factory.mktemp("vs_trl")
    model_dir, dataset = vs_trl.prepare("tiny", work, steps=2, prompts=2)
    w = vs_trl.Workload(model_dir=model_dir, dataset=dataset, steps=2, prompts=2, group=2, max_tokens=4,
                        lora_rank=4, micro_batch=4, threads=1)
    sides = ["openrft", "openrft-ckpt"] + ([] if _missing("trl") else ["trl"])
    results = vs_trl.run(w, sides, timeout_s=180)
    assert [r.side for r in results] == sides
    return {r.side: r for r in results} | {"ratio_line": vs_trl.ratio_line(results)}


@pytest.mark.parametrize("side", ["openrft", "openrft-ckpt"])
def test_vs_trl_openrft_side_trains_through_env_server_and_gateway(trl_results: dict[str, Any], side: str) -> None:
    ours = trl_results[side]  # openrft-ckpt: the learner with gradient checkpointing
    assert len(ours.step_s) == 2 and all(s > 0 for s in ours.step_s)
    assert all(t > 0 for t in ours.gen_tokens)  # the env's agent called the policy through the gateway
    assert all(0.0 <= r <= 1.0 for r in ours.reward_mean)
    assert ours.peak_mb > 100  # ru_maxrss of the side's own process (torch alone is more)


@pytest.mark.skipif(_missing("trl"), reason="trl not installed: pip install -e '.[bench]'")
def test_vs_trl_trl_side_runs_grpo_trainer(trl_results: dict[str, Any]) -> None:
    theirs = trl_results["trl"]
    assert len(theirs.step_s) == 2 and len(theirs.gen_tokens) == 2
    assert all(0 < t <= 2 * 2 * 4 for t in theirs.gen_tokens)  # prompts x group x max_tokens at most
    assert theirs.peak_mb > 100
    assert "step_time=" in trl_results["ratio_line"] and "peak_mem=" in trl_results["ratio_line"]


def test_learner_memory_runs_every_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/learner_memory.py on the tiny model: each allocator x checkpointing in its own process."""
    pytest.importorskip("torch", reason="bench/learner_memory.py needs the training extra")
    from bench import learner_memory
    from trainer.commands.allocator import find_jemalloc

    assert learner_memory.main(["--model", "tiny", "--steps", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RATIOS vs glibc without checkpointing at 1 rank(s) ")
    assert "glibc+ckpt: peak=" in lines[-1]
    assert ("jemalloc+ckpt: peak=" in lines[-1]) == (find_jemalloc() is not None)
    glibc = next(x for x in lines if x.startswith("    1 glibc     false")).split()[1:]
    assert float(glibc[3]) > float(glibc[2]) > 100  # peak over the loaded model, which holds torch at least
