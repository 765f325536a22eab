"""`openrft conformance URL [--token T] [--strict]`: check any env server against protocol v1.

Checks come in two levels (SPEC section 10). `core` is what every env server must do, eval-protocol's
included; `v1` is openrft's extensions, each reported present (pass or fail) or absent. The exit
status is 1 when a core check fails, when a present extension is broken, and, with --strict or
against a server that claims v1 (X-OpenRFT-Protocol header), when an extension is absent.

It talks raw HTTP (no retries, so nothing is masked) and starts rollouts whose `model_base_url`
points at a stub OpenAI-compatible model it serves itself on loopback (or `--model-url`).

Modules: `_checks` (the checks and their results), `_run` (the stub model, `run_conformance`),
`_report` (the verdicts, the table, the command).
"""

from env_sdk.conformance._checks import (
    ABSENT,
    BATCHED_INIT,
    BATCHED_STATUS,
    CORE,
    FAIL,
    HEALTH,
    PASS,
    SKIP,
    TRAINER_USES,
    V1,
    Absent,
    Check,
    CheckFailed,
    CheckResult,
    CheckStatus,
    Conformance,
    Level,
    Skipped,
    Verdict,
)
from env_sdk.conformance._report import failed, main, print_table, trainer_verdict
from env_sdk.conformance._run import run_conformance, serve_stub, stub_model_app

__all__ = [
    "ABSENT",
    "BATCHED_INIT",
    "BATCHED_STATUS",
    "CORE",
    "FAIL",
    "HEALTH",
    "PASS",
    "SKIP",
    "TRAINER_USES",
    "V1",
    "Absent",
    "Check",
    "CheckFailed",
    "CheckResult",
    "CheckStatus",
    "Conformance",
    "Level",
    "Skipped",
    "Verdict",
    "failed",
    "main",
    "print_table",
    "run_conformance",
    "serve_stub",
    "stub_model_app",
    "trainer_verdict",
]
