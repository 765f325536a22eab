"""What `EnvClient` raises. Catch `EnvError` for all of them.

EnvError
├── EnvHTTPError(status_code, body)     the server answered with an error status
│   ├── BadRequestError                 4xx other than the ones below; never retried
│   ├── AuthError                       401 / 403
│   ├── NotFoundError                   404 (unknown rollout id or endpoint)
│   ├── CapacityError                   429 / 503, still refused after the retries
│   └── ServerError                     other 5xx, after the retries
├── EnvUnreachableError                 connect / transport failure, after the retries
├── EnvProtocolError                    the answer violates protocol v1 (bad JSON or shape)
└── WaitTimeoutError (also TimeoutError) `wait` ran past its deadline
"""

from __future__ import annotations


class EnvError(Exception):
    """Base of every env client error."""


class EnvHTTPError(EnvError):
    def __init__(self, status_code: int, body: str, message: str | None = None) -> None:
        self.status_code = status_code
        self.body = body
        super().__init__(message or f"HTTP {status_code}: {body[:500]}")


class BadRequestError(EnvHTTPError):
    """The request was wrong (4xx); retrying it cannot help."""


class AuthError(EnvHTTPError):
    """Missing or wrong bearer token (401), or not allowed (403)."""


class NotFoundError(EnvHTTPError):
    """Unknown rollout id (never started, or its result expired) or unknown endpoint."""


class CapacityError(EnvHTTPError):
    """The server stayed at capacity (429) or unavailable (503) through every retry."""


class ServerError(EnvHTTPError):
    """The server failed (5xx) through every retry."""


class EnvUnreachableError(EnvError):
    """No answer: connection refused, reset, or timed out, through every retry."""


class EnvProtocolError(EnvError):
    """The server answered 2xx with a body that does not follow protocol v1."""


class WaitTimeoutError(EnvError, TimeoutError):
    """`EnvClient.wait` reached its deadline before the rollout was terminal."""


def http_error(status_code: int, body: str, method: str, url: str) -> EnvHTTPError:
    """The EnvHTTPError subclass for an error status."""
    cls: type[EnvHTTPError]
    if status_code in (401, 403):
        cls = AuthError
    elif status_code == 404:
        cls = NotFoundError
    elif status_code in (429, 503):
        cls = CapacityError
    elif status_code >= 500:
        cls = ServerError
    else:
        cls = BadRequestError
    return cls(status_code, body, f"{method} {url} -> HTTP {status_code}: {body[:500]}")
