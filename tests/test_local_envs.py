"""`envs: [{module: MODULE:OBJECT, workers: N}]`: the trainer serves the env itself (trainer/rollouts/local_envs.py).
Real `openrft env serve` processes: started on free ports, used as ordinary env URLs, stopped when
the run ends, raises or is interrupted; a module that cannot start is a quick, clear error."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import trainer.rollouts.local_envs as local_envs_module
from env_sdk import StatusCode
from reference_envs.datasets import generate, write_jsonl
from trainer.config import ConfigError, EnvEndpoint, load_config
from trainer.rollouts.local_envs import LocalEnvError, local_envs

MATH = "reference_envs.math.server:app"
DONE = (StatusCode.OK, StatusCode.FINISHED)
BASE = {"model": "m", "dataset": "d.jsonl"}


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every env server process local_envs starts; each must be gone when the test ends."""
    processes: list[subprocess.Popen[bytes]] = []
    real = local_envs_module._spawn

    def spy(*args: Any) -> subprocess.Popen[bytes]:
        processes.append(real(*args))
        return processes[-1]

    monkeypatch.setattr(local_envs_module, "_spawn", spy)
    yield processes
    assert_stopped(processes)


def assert_stopped(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        assert process.returncode is not None, f"env server {process.pid} still running"
        with pytest.raises(ProcessLookupError):
            os.kill(process.pid, 0)  # reaped, not a zombie
    assert not env_children(), "an env server child process is left"


def env_children() -> list[int]:
    """This process's children that run env_sdk.cli, from /proc (empty where there is none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"env_sdk.cli" in cmdline:
            found.append(int(stat.parent.name))
    return found


def vowel_score(messages: list[dict[str, Any]], ground_truth: Any, info: dict[str, Any]) -> float:
    """A continuous reward, so the tiny random model's groups rarely tie (the math env's own is all 0)."""
    text = str(messages[-1].get("content") or "")
    return sum(c in "aeiou" for c in text) / max(1, len(text))


def math_dataset(path: Path, n: int) -> Path:
    write_jsonl(generate("math", split="train", seed=0, n=n, kind="sums"), path)
    return path


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("envs", "message"), [
    ([{"url": "http://a"}, {"url": "http://b", "module": MATH}], "envs.1: Value error, give either `url`"),
    ([{"token": "t"}], "envs.0: Value error, give either `url`"),
    ([{"module": MATH, "workers": 0}], "envs.0.workers: Input should be greater than or equal to 1"),
    ([{"url": "http://a", "workers": 2}], "envs.0: Value error, workers only apply with `module`"),
    ([{"module": "reference_envs.math.server"}], "expected MODULE:OBJECT"),
])
def test_config_rejects_bad_entries(envs: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match="envs") as info:
        load_config(None, defaults={**BASE, "envs": envs})
    assert message in str(info.value)


def test_config_module_entry_and_its_saved_form_reload(tmp_path: Path) -> None:
    from trainer.config import save_config

    config = load_config(None, defaults={**BASE, "envs": [{"module": MATH}, {"url": "http://a"}]})
    assert config.envs[0].workers == 1 and config.envs[0].url is None
    save_config(config, tmp_path / "config.yaml")  # every default written out, url entries included
    assert load_config(tmp_path / "config.yaml").envs == config.envs


# --- local_envs -------------------------------------------------------------------------------


def test_url_entries_pass_through_and_start_nothing(spawned: list[subprocess.Popen[bytes]]) -> None:
    endpoints = [EnvEndpoint(url="http://127.0.0.1:1", token="t")]
    with local_envs(endpoints) as envs:
        assert envs == endpoints
    assert spawned == []


def test_agent_module_serves_with_the_token(spawned: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    entry = EnvEndpoint(module="reference_envs.math.server:agent", token="s3cret", args=["--max-concurrency", "3"])
    with local_envs([entry], log_dir=tmp_path / "logs") as envs:
        [env] = envs
        assert env.module is None and env.token == "s3cret" and env.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{env.url}/health").json()["capacity"] == 3  # args reached `env serve`
        assert httpx.get(f"{env.url}/status", params={"rollout_id": "x"}).status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{env.url}/status", params={"rollout_id": "x"}, headers=headers).status_code == 404
    assert (tmp_path / "logs" / "env_0_0.log").is_file()


@pytest.mark.parametrize(("source", "shown"), [
    (None, "No module named 'no_such_env_module'"),
    ('raise RuntimeError("boom in the env module")', "RuntimeError: boom in the env module"),
])
def test_a_module_that_fails_to_import_is_a_quick_clear_error(
        source: str | None, shown: str, tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    name = "no_such_env_module" if source is None else "broken_env_module"
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source + "\n")
    entry = EnvEndpoint(module=f"{name}:app", workers=2, env={"PYTHONPATH": str(tmp_path)})
    started = time.monotonic()
    with pytest.raises(LocalEnvError) as info:
        with local_envs([EnvEndpoint(url="http://127.0.0.1:1"), entry]):
            pytest.fail("the env came up")
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert f"env {name}:app (envs[1], worker " in message and "exited with code" in message
    assert "last lines of its output" in message and shown in message
    assert len(spawned) == 2


def test_a_server_that_never_answers_times_out(tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    (tmp_path / "slow_env_module.py").write_text("import time\nprint('loading a big dataset', flush=True)\n"
                                                 "time.sleep(120)\n")
    # 8 s: `env serve` itself takes seconds to import on a busy 2-core machine before it reaches the module
    entry = EnvEndpoint(module="slow_env_module:app", env={"PYTHONPATH": str(tmp_path)}, startup_timeout_s=8)
    started = time.monotonic()
    with pytest.raises(LocalEnvError, match=r"did not answer GET /health within 8 s \(startup_timeout_s\)") as info:
        with local_envs([entry]):
            pass
    assert time.monotonic() - started < 20  # the hung server was stopped, SIGKILL at the latest
    assert "loading a big dataset" in str(info.value)


# --- train ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_train_serves_two_workers_and_stops_them(tmp_path: Path, tiny_model: Path,
                                                 spawned: list[subprocess.Popen[bytes]]) -> None:
    from trainer.commands.train import main

    config = {
        "model": str(tiny_model), "dataset": str(math_dataset(tmp_path / "sums.jsonl", 4)),
        "envs": [{"module": MATH, "workers": 2}], "evaluator": f"{__name__}:vowel_score",
        "steps": 1, "tasks_per_step": 2, "group_size": 4, "sampling": {"max_tokens": 8},
        "lora": {"rank": 4, "alpha": 8}, "rollout": {"deadline_s": 60},
        "run_dir": str(tmp_path / "run"), "progress": False,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "train.yaml")]) == 0

    run_dir = tmp_path / "run"
    rollouts = [json.loads(line) for line in (run_dir / "rollouts" / "step_000001.jsonl").read_text().splitlines()]
    assert len(rollouts) == 8 and all(r["status"]["code"] in DONE for r in rollouts), rollouts[0]["status"]
    urls = {r["env_url"] for r in rollouts}
    assert len(spawned) == 2 and len(urls) == 2  # both workers got rollouts
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["envs"][0]["module"] == MATH  # as written
    assert sorted(p.name for p in (run_dir / "env_logs").iterdir()) == ["env_0_0.log", "env_0_1.log"]
    # `spawned` checks on teardown that both processes are gone


def test_eval_serves_the_module(tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    from tests.helpers import scripted_model_app, serve_app
    from trainer.commands.evaluate import main

    config = {"dataset": str(math_dataset(tmp_path / "sums.jsonl", 2)), "envs": [{"module": MATH}],
              "eval": {"samples": 2, "out": str(tmp_path / "eval.json")}, "progress": False}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    with serve_app(scripted_model_app(lambda messages, tools: "42")) as model_url:
        assert main([str(tmp_path / "eval.yaml"), "--url", f"{model_url}/v1"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["tasks"] == 2 and result["failures"] == {} and len(spawned) == 1


@pytest.mark.parametrize("error", [RuntimeError("learner failed"), KeyboardInterrupt()])
def test_servers_are_stopped_when_training_raises(error: BaseException, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  spawned: list[subprocess.Popen[bytes]]) -> None:
    from trainer.learning.learner import Learner
    from trainer.commands.train import train

    urls: list[str] = []

    def fail(config: Any) -> Any:  # the envs are up and probed by now
        urls.extend(httpx.get(f"http://127.0.0.1:{p.args[p.args.index('--port') + 1]}/health").json()["status"]
                    for p in spawned)
        raise error

    monkeypatch.setattr(Learner, "from_config", staticmethod(fail))
    config = load_config(None, defaults={"model": "unused", "dataset": str(math_dataset(tmp_path / "sums.jsonl", 2)),
                                         "envs": [{"module": MATH, "workers": 2}], "run_dir": str(tmp_path / "run"),
                                         "progress": False})
    with pytest.raises(type(error)):
        train(config)
    assert urls == ["ok", "ok"]
    assert_stopped(spawned)
