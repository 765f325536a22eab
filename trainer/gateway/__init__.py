"""The gateway: the OpenAI-compatible endpoint envs call the policy through.

`Gateway` (app.py) gives each rollout its own URL and key and records every call's exact tokens
(`trainer.types.CallRecord`). The chat side it shares with `openrft serve`: rendering prompts with
the model's chat template and parsing tool calls (chat.py), the completion endpoint itself
(completions.py), and eval-protocol's tracing read-out (tracing.py). server.py runs an app on the
trainer's own asyncio loop.
"""

from trainer.gateway.app import ROLLOUT_IDS, ROLLOUT_PATH, Gateway, RolloutRecord

__all__ = ["ROLLOUT_IDS", "ROLLOUT_PATH", "Gateway", "RolloutRecord"]
