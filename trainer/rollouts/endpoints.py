"""The model side of a rollout: where its env sends the model calls, and what comes back."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from env_sdk.models import RolloutMetadata, Status
from trainer.types import CallRecord

if TYPE_CHECKING:
    from trainer.gateway import Gateway


class ModelEndpoint(Protocol):
    """Where envs send their model calls for a rollout."""

    def open(self, metadata: RolloutMetadata) -> tuple[str, str | None]:
        """Register the rollout; return (model_base_url, api_key) for its InitRequest."""
        ...

    def logged(self, rollout_id: str) -> asyncio.Event | None:
        """An event set when the env pushed the rollout's terminal status (eval-protocol /logs)."""
        ...

    def logged_status(self, rollout_id: str) -> Status | None: ...

    def close(self, rollout_id: str) -> tuple[list[CallRecord], bool]:
        """Stop accepting calls for the rollout; return (call records, prefix_mismatch)."""
        ...


class GatewayEndpoint:
    """The trainer's own gateway: calls are recorded token by token for training."""

    def __init__(self, gateway: Gateway, public_url: str) -> None:
        self.gateway = gateway
        self.public_url = public_url

    def open(self, metadata: RolloutMetadata) -> tuple[str, str | None]:
        return self.gateway.open_rollout(metadata, self.public_url)

    def logged(self, rollout_id: str) -> asyncio.Event | None:
        return self.gateway.record(rollout_id).logged

    def logged_status(self, rollout_id: str) -> Status | None:
        return self.gateway.record(rollout_id).logged_status

    def close(self, rollout_id: str) -> tuple[list[CallRecord], bool]:
        record = self.gateway.close_rollout(rollout_id)
        return list(record.calls), bool(record.prefix_mismatch)


class ExternalEndpoint:
    """Any OpenAI-compatible URL (evaluation only): envs call it directly, nothing is recorded."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url, self.api_key = url, api_key

    def open(self, metadata: RolloutMetadata) -> tuple[str, str | None]:
        return self.url, self.api_key

    def logged(self, rollout_id: str) -> asyncio.Event | None:
        return None

    def logged_status(self, rollout_id: str) -> Status | None:
        return None

    def close(self, rollout_id: str) -> tuple[list[CallRecord], bool]:
        return [], False
