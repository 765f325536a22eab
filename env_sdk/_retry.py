"""EnvClient's retry policy: what is retryable (transport errors, 429, 5xx), how long to wait
(Retry-After, capped; else jittered exponential backoff), how many attempts, and the error a
request ends with when none succeeds. Every v1 endpoint is idempotent, so every retry is safe."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from env_sdk.errors import EnvError, EnvUnreachableError, http_error

#: Longest Retry-After honoured; a server asking for more gets this.
MAX_RETRY_AFTER_S = 30.0


class Retryable(Exception):
    """A retryable outcome of one attempt: an error response (429, 5xx) or a transport exception."""

    def __init__(self, response: httpx.Response | None = None, exc: httpx.TransportError | None = None) -> None:
        self.response = response
        self.exc = exc
        self.retry_after: float | None = None
        if response is not None:
            try:
                self.retry_after = max(0.0, float(response.headers.get("retry-after", "")))
            except ValueError:  # absent, or an HTTP date: fall back to backoff
                self.retry_after = None

    def final(self, method: str, url: str, attempts: int) -> EnvError:
        """The error a request ends with when this was the outcome of its last attempt."""
        if self.response is not None:
            return http_error(self.response.status_code, self.response.text, method, url)
        return EnvUnreachableError(f"{method} {url}: {type(self.exc).__name__}: {self.exc} "
                                   f"(after {attempts} attempt{'s' * (attempts > 1)})")


def backoff_s(retry_after: float | None, attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): Retry-After, else backoff."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    return min(0.1 * 2 ** (attempt - 1), 5.0) * random.uniform(0.5, 1.5)


def _wait(state: RetryCallState) -> float:
    failure = state.outcome.exception() if state.outcome is not None else None
    return backoff_s(failure.retry_after if isinstance(failure, Retryable) else None, state.attempt_number)


async def retry(send: Callable[[], Awaitable[httpx.Response]], first: Retryable, max_retries: int) -> httpx.Response:
    """The rest of a request whose first attempt failed with `first`: up to `max_retries` more
    attempts of `send`, tenacity waiting between them. Raises the last Retryable when none succeeds
    (see `Retryable.final`); any other error of an attempt at once.

    The first attempt is the caller's plain `await`, because tenacity's set-up (~60 us a call) would
    otherwise be paid by every request; here it is attempt 1 of the policy, its outcome replayed, so
    that tenacity counts and waits for every attempt."""
    replay = [first]

    async def attempt() -> httpx.Response:
        if replay:
            raise replay.pop()
        return await send()

    retrying = AsyncRetrying(stop=stop_after_attempt(max_retries + 1), wait=_wait,
                             retry=retry_if_exception_type(Retryable), reraise=True)
    return await retrying(attempt)
