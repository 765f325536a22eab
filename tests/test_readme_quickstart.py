"""The README's quick-start env (the `my_env.py` block) runs as written: it is extracted from
README.md, served by uvicorn, and driven over HTTP with a scripted model behind it."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from env_sdk import EnvClient, InitRequest, RolloutMetadata, StatusCode
from tests.helpers import scripted_model_app, serve_app

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_module() -> types.ModuleType:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    source = next(b for b in blocks if b.startswith("# my_env.py"))
    module = types.ModuleType("my_env")
    exec(compile(source, "README.md:my_env.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize(("answer", "reward"), [("The answer is 42", 1.0), ("I think 41", 0.0)])
async def test_readme_env_scores_the_model_answer(answer: str, reward: float) -> None:
    app = _quickstart_module().app
    with serve_app(scripted_model_app(lambda messages, tools: answer)) as model_url, serve_app(app) as env_url:
        async with EnvClient(env_url) as client:
            request = InitRequest(
                messages=[{"role": "user", "content": "What is six times seven?"}],
                model_base_url=f"{model_url}/v1",
                api_key="k",
                completion_params={"model": "policy", "temperature": 0.5},
                metadata=RolloutMetadata(
                    invocation_id="i", experiment_id="e", rollout_id="readme-1", run_id="r", row_id="0"
                ),
            )
            await client.init(request)
            status = await client.wait("readme-1", deadline_s=20)
    assert status.terminated
    assert status.status is not None and status.status.code in (StatusCode.OK, StatusCode.FINISHED)
    assert status.reward == reward
    assert status.messages is not None and status.messages[-1].content == answer
