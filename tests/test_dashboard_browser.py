"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium) during a real `openrft train --dashboard` run of the tiny model: the reward curve gains
points as steps land, a rollout opens and shows its turns and its trained tokens, and the progress
line shows ETA, steps/min and rollouts/s. Leaves a screenshot under the test's tmp dir (copied to
$OPENRFT_DASHBOARD_SCREENSHOT when set: that is how docs/dashboard.png is made)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from env_sdk import AgentResult, RolloutTask, create_env_app
from tests.helpers import free_port, serve_app
from tests.test_train_e2e import write_config

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TRACES = importlib.util.find_spec("opentelemetry.sdk") is not None  # the `otel` extra: the timeline too
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (`make install` as root installs them)")


ROLLOUTS_PER_STEP = 2 * 4  # tasks_per_step x group_size (tests.test_train_e2e.write_config)
GATES = {3: threading.Event(), 5: threading.Event()}  # step -> the test lets its rollouts finish
started = itertools.count()


async def two_turn_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    """Two model calls with a user turn between them. Steps 3 and 5 wait for the test's go, so the page
    is sure to watch the run grow while the trainer is alive (no race against a fast tiny model)."""
    step = next(started) // ROLLOUTS_PER_STEP + 1
    if step in GATES:
        await asyncio.to_thread(GATES[step].wait, 60)
    messages = list(task.messages)
    for follow_up in ("Say more.", None):
        reply = await client.chat.completions.create(messages=messages, **task.completion_kwargs())
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        if follow_up:
            messages.append({"role": "user", "content": follow_up})
    text = messages[-1]["content"]
    return AgentResult(reward=sum(c in "aeiou" for c in text) / max(1, len(text)), messages=messages,
                       termination_reason="stop")


def _browser() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the `test` extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def _wait(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_dashboard_follows_a_live_run_in_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from trainer.models import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    port = free_port()
    with serve_app(create_env_app(two_turn_agent)) as env_url:
        config = write_config(tmp_path, model, env_url, steps=5, progress=True, checkpoint_every=100,
                              trace={"enabled": TRACES}, run_dir=str(tmp_path / "runs" / "lr-1e-2"))
        train = [sys.executable, "-m", "trainer.cli", "train", str(config)]
        proc = subprocess.Popen([*train, "--dashboard", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "200"})
        browser = _browser()
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait("the dashboard to listen", lambda: _get_ok(url), timeout=60)
            browser.get(url)

            def points() -> int:  # the reward chart's drawn points (0 until the page has built it)
                charts = browser.find_elements(By.ID, "chart-reward")
                return int(charts[0].get_attribute("data-points") or 0) if charts else 0

            _wait("steps 1-2 on the reward curve", lambda: points() == 2)  # step 3 waits for GATES[3]
            GATES[3].set()
            _wait("the reward curve to gain points", lambda: points() >= 3)  # step 5 waits for GATES[5]
            assert proc.poll() is None
            # (the live page redraws its rows as steps land: click and read in the page, in one go)
            # (a step landing between the click and the read redraws the rows and clears the conversation:
            # click again until one shows)
            turns = _wait("a rollout's conversation", lambda: browser.execute_script(
                "const turns = [...document.querySelectorAll('#conversation .msg')].map(m => m.innerText);"
                "if (turns.length) return turns;"
                "const row = document.querySelector('tr.rollout-row'); if (row) row.click(); return null;"))
            roles = [t.split("\n")[0].strip().lower() for t in turns]
            assert roles == ["user", "assistant", "user", "assistant"], turns
            assert "Say more." in turns[2]
            GATES[5].set()
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr[-2000:]
            # a second, shorter run to compare with
            subprocess.run([*train, "--set", f"run_dir={tmp_path / 'runs' / 'lr-1e-3'}", "optim.lr=1e-3", "steps=2",
                            "progress=false"], check=True, capture_output=True, timeout=120)
            # the finished runs through `openrft dashboard`: both on the same axes, every step
            viewer = subprocess.Popen([sys.executable, "-m", "trainer.cli", "dashboard", str(tmp_path / "runs"),
                                       "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _wait("`openrft dashboard` to listen", lambda: _get_ok(url), timeout=30)
            browser.get(url)
            _wait("the run picker", lambda: browser.execute_script(
                "const boxes = [...document.querySelectorAll('#runs input')];"
                "if (boxes.length !== 2) return false; boxes.filter(b => !b.checked).forEach(b => b.click()); return true;"))
            series = lambda: browser.find_element(By.ID, "chart-reward").get_attribute("data-series")
            _wait("both runs on the reward chart", lambda: series() == "2" and points() == 5)  # lr-1e-2's 5 steps
            _wait("a trained rollout to click", lambda: browser.execute_script(
                "const row = [...document.querySelectorAll('tr.rollout-row')].find(r => r.cells[6].textContent === 'yes');"
                "if (row) row.click(); return !!row;"))
            trained = _wait("trained tokens", lambda: browser.find_elements(By.CSS_SELECTOR, ".tokens .tok.trained"))
            assert "logprob" in trained[0].get_attribute("title")
            if TRACES:  # the rollout's trace as a timeline: rollout, its two model calls, the trained sample
                bars = _wait("the trace timeline", lambda: browser.execute_script(
                    "return [...document.querySelectorAll('#trace .span-label')].map(b => b.textContent);"))
                assert [b.split()[0] for b in bars].count("gateway.chat_completion") == 2 and len(bars) >= 4, bars
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
        finally:
            browser.quit()
            for p in (proc, locals().get("viewer")):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    if target := os.environ.get("OPENRFT_DASHBOARD_SCREENSHOT"):
        shutil.copy(tmp_path / "dashboard.png", target)
    # the progress line: ETA and the run's pace
    assert "ETA" in stderr and "steps/min=" in stderr and "rollouts/s=" in stderr, stderr[-1500:]


def _get_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
