"""reference_envs.code over real HTTP: solutions run against hidden tests in the sandbox;
escape attempts score 0 and the server stays healthy."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import reference_envs.code.dataset as code_dataset
from env_sdk.sandbox import SandboxLimits, available_isolation
from reference_envs.code.dataset import TEMPLATES, TEST_FUNCTIONS, task
from reference_envs.code.evaluator import evaluate
from reference_envs.code.server import create_app
from reference_envs.datasets import default_path, default_rows, generate
from tests.ref_envs_util import assert_conformant, env_and_model, healthy, rollout

ISOLATION = available_isolation()
ROW = next(r for r in generate("code", split="train", seed=0, n=40) if r["ground_truth"]["function"] == "digit_sum")
CORRECT = "def digit_sum(n):\n    return sum(int(d) for d in str(n))\n"
LIMITS = SandboxLimits(wall_s=2.0, cpu_s=1, memory_mb=256, max_processes=16)


def submit(code: str):
    return lambda messages, tools: {"tool_calls": [{"name": "submit_solution", "arguments": {"code": code}}]}


def app():
    return create_app(grading_limits=LIMITS, try_limits=LIMITS)


@pytest.mark.parametrize(
    ("script", "reward", "reason"),
    [
        (submit(CORRECT), 1.0, "all 8 tests passed"),
        (lambda m, t: f"Here is my solution:\n```python\n{CORRECT}```", 1.0, "all 8 tests passed"),
        (submit("def digit_sum(n):\n    return 0 if n < 10 else sum(int(d) for d in str(n))\n"), None, "tests passed"),
        (submit("def digit_sum(n):\n    return -1\n"), 0.0, "0/8 tests passed"),
        (submit("def digit_sum(n)\n    return 1\n"), 0.0, "failed to load: SyntaxError"),
        (submit("def other(n):\n    return 1\n"), 0.0, "has no attribute 'digit_sum'"),
        (submit("class Any:\n    def __eq__(self, o): return True\ndef digit_sum(n):\n    return Any()\n"),
         0.0, "not JSON serializable"),
        (submit("import os\ndef digit_sum(n):\n    os.write(1, b'{\"i\": 0, \"value\": 1}\\n')\n    print('passed')\n"
                "    return None\n"), 0.0, "tests passed"),
        (lambda m, t: "I am not sure how to do this.", 0.0, "no code"),
        (lambda m, t: {"tool_calls": [{"name": "submit_solution", "arguments": {}}]}, 0.0, "without code"),
    ],
    ids=["submit", "code-block", "partial", "wrong", "syntax-error", "missing-function", "always-equal",
         "forged-output", "no-code", "submit-without-code"],
)
async def test_rollout_scores(script, reward, reason) -> None:
    with env_and_model(app(), script) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, ROW)
        assert status.status.ok, status.status
        if reward is None:  # partial credit
            cases = ROW["ground_truth"]["cases"]
            reward = sum(c["args"][0] >= 10 or c["args"][0] == 0 for c in cases) / len(cases)
            assert 0 < reward < 1
        assert status.reward == pytest.approx(reward), status.info
        assert reason in status.info["reason"]
        if "no code" not in reason and "without code" not in reason:
            assert f"[sandbox: {ISOLATION}]" in status.info["reason"]
        # the hidden tests never reach the model
        sent = json.dumps(model_app.state.requests[0]["body"])
        hidden_inputs = [str(c["args"][0]) for c in ROW["ground_truth"]["cases"] if c["args"][0] > 10**5]
        assert hidden_inputs and not any(x in sent for x in hidden_inputs)
        assert evaluate(status.messages, ROW["ground_truth"]).score == pytest.approx(reward)


async def test_run_python_tool_then_submit() -> None:
    def script(messages, tools):
        tool_results = [m["content"] for m in messages if m["role"] == "tool"]
        if not tool_results:
            return {"tool_calls": [{"name": "run_python", "arguments": {"code": CORRECT + "print(digit_sum(1234))"}}]}
        assert "exited 0" in tool_results[0] and "stdout:\n10" in tool_results[0]
        return {"tool_calls": [{"name": "submit_solution", "arguments": {"code": CORRECT}}]}

    with env_and_model(app(), script) as (env_url, model_url, _):
        status = await rollout(env_url, model_url, ROW)
        assert status.reward == 1.0 and status.termination_reason == "submitted"
        assert status.metrics["tool_calls"] == 2.0


async def test_model_that_never_stops_calling_tools_is_cut_at_the_turn_limit() -> None:
    loop = {"tool_calls": [{"name": "run_python", "arguments": {"code": "print(1)"}}]}
    with env_and_model(create_app(max_turns=3, grading_limits=LIMITS, try_limits=LIMITS),
                       lambda m, t: loop) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, ROW)
        assert status.termination_reason == "max_turns" and len(model_app.state.requests) == 3
        assert status.reward == 0.0 and "no code" in status.info["reason"]
        assert await healthy(env_url)


GRADER_FILE = str(Path(code_dataset.__file__).resolve())
needs_bwrap = pytest.mark.skipif(ISOLATION != "bwrap", reason="needs bwrap (apt-get install bubblewrap)")
needs_netns = pytest.mark.skipif(ISOLATION == "rlimit", reason="needs bwrap or unshare (root)")
# Each escape is written so that the function returns the right answer only if the escape works.
DIGITS = "    return sum(int(d) for d in str(n))\n"
ESCAPES = {
    "read-etc-passwd": pytest.param(f"def digit_sum(n):\n    open('/etc/passwd').read()\n{DIGITS}", marks=needs_bwrap),
    "read-grader-files": pytest.param(f"def digit_sum(n):\n    open({GRADER_FILE!r}).read()\n{DIGITS}",
                                      marks=needs_bwrap),
    "socket-to-loopback-server": pytest.param(
        "import socket\ndef digit_sum(n):\n    socket.create_connection(('127.0.0.1', PORT), timeout=1).close()\n"
        + DIGITS, marks=needs_netns),
    "fork-bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
                 f"def digit_sum(n):\n{DIGITS}",
    "unbounded-allocation": f"def digit_sum(n):\n    blob = bytearray(8 * 1024 ** 3)\n{DIGITS}",
    "unbounded-list": f"def digit_sum(n):\n    x = []\n    while True:\n        x.append('y' * 10**6)\n{DIGITS}",
    "infinite-loop": f"def digit_sum(n):\n    while True:\n        pass\n{DIGITS}",
}


@pytest.fixture(scope="module")
def served_code_env():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    script_holder: dict = {}
    with env_and_model(app(), lambda m, t: script_holder["script"](m, t)) as urls:
        yield urls, port, script_holder, listener
    listener.close()


@pytest.mark.parametrize("code", list(ESCAPES.values()), ids=list(ESCAPES))
async def test_escape_attempts_score_0_and_the_server_stays_healthy(served_code_env, code) -> None:
    (env_url, model_url, _), port, holder, listener = served_code_env
    holder["script"] = submit(code.replace("PORT", str(port)))
    status = await rollout(env_url, model_url, ROW)
    assert status.status.ok, status.status
    assert status.reward == 0.0, status.info["reason"]
    assert await healthy(env_url)
    listener.settimeout(0.05)
    with pytest.raises(TimeoutError):  # nothing ever connected
        listener.accept()


def test_dataset_hides_test_functions_from_train_and_rebuilds_tasks() -> None:
    train = generate("code", split="train", seed=3, n=60)
    test = generate("code", split="test", seed=3, n=20)
    assert train == generate("code", split="train", seed=3, n=60)
    assert not {r["ground_truth"]["function"] for r in train} & set(TEST_FUNCTIONS)
    assert {r["ground_truth"]["function"] for r in test} <= set(TEST_FUNCTIONS)
    for r in train[:5]:
        t = task(r["metadata"]["task_id"])
        assert t.cases == r["ground_truth"]["cases"] and t.prompt == r["messages"][0]["content"]
    assert len(TEMPLATES) >= 10
    with pytest.raises(ValueError, match="not a code task id"):
        task("rm_rf/1")
    with pytest.raises(ValueError, match="ground_truth must be"):
        evaluate([], None)
    for split in ("train", "test"):
        shipped = [json.loads(line) for line in default_path("code", split).read_text().splitlines()]
        assert shipped == default_rows("code", split)


async def test_conformance_passes() -> None:
    await assert_conformant(create_app(grading_limits=LIMITS, try_limits=LIMITS), ROW)
