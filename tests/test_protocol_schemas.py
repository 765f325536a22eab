"""protocol/: the generated schemas are fresh, every example matches its schema and model, and
SPEC.md names every endpoint, field and status code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from env_sdk import models
from env_sdk.schema import PROTOCOL_DIR, WIRE_MODELS, main, stale, write

EXAMPLES = sorted((PROTOCOL_DIR / "examples").glob("*.json"))
SPEC = (PROTOCOL_DIR / "SPEC.md").read_text()
ENDPOINT_MODELS = ["InitRequest", "InitResponse", "StatusResponse", "StatusBatchRequest", "StatusBatchResponse",
                   "InitBatchRequest", "InitBatchResponse", "CancelResponse", "Health", "VersionResponse",
                   "ErrorResponse"]


def test_checked_in_schemas_are_fresh(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0, capsys.readouterr().err


def test_check_fails_on_stale_missing_or_orphan_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path)
    assert stale(tmp_path) == [] and main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "schemas" / "Health.json").write_text("{}\n")
    (tmp_path / "openapi.json").unlink()
    (tmp_path / "schemas" / "Old.json").write_text("{}\n")
    assert stale(tmp_path) == ["schemas/Health.json: differs from the models", "openapi.json: missing",
                               "schemas/Old.json: no model produces it"]
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "python -m env_sdk.schema" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_matches_its_schema_and_model(path: Path) -> None:
    name = path.name.split(".")[0]
    payload = json.loads(path.read_text())
    schema = json.loads((PROTOCOL_DIR / "schemas" / f"{name}.json").read_text())
    errors = list(Draft202012Validator(schema).iter_errors(payload))
    assert not errors, [e.message for e in errors]
    model = WIRE_MODELS[name]
    model.model_validate(payload)


def test_every_endpoint_message_has_an_example() -> None:
    have = {p.name.split(".")[0] for p in EXAMPLES}
    assert set(ENDPOINT_MODELS) <= have, set(ENDPOINT_MODELS) - have


def test_schemas_reject_what_the_server_rejects() -> None:
    schema = json.loads((PROTOCOL_DIR / "schemas" / "InitRequest.json").read_text())
    bad = {"metadata": {"invocation_id": "i", "experiment_id": "e", "run_id": "u", "row_id": "w"}}
    assert any("rollout_id" in e.message for e in Draft202012Validator(schema).iter_errors(bad))


def test_openapi_has_exactly_the_spec_endpoints() -> None:
    openapi = json.loads((PROTOCOL_DIR / "openapi.json").read_text())
    assert sorted(openapi["paths"]) == ["/cancel", "/health", "/init", "/init/batch", "/status", "/status/batch",
                                        "/version"]
    for path in openapi["paths"]:
        assert f"{path}`" in SPEC or f"{path}?" in SPEC, path


def test_spec_names_every_field_and_status_code() -> None:
    fields = {f for name in ENDPOINT_MODELS for f in WIRE_MODELS[name].model_fields}
    fields |= set(models.RolloutMetadata.model_fields) | set(models.Message.model_fields)
    fields |= set(models.Status.model_fields) | set(models.FieldError.model_fields)
    missing = sorted(f for f in fields if f"`{f}`" not in SPEC)
    assert not missing, f"SPEC.md does not mention {missing}"
    for code in models.StatusCode:
        assert re.search(rf"\| {code.value} \| `{code.name}` \|", SPEC), code
    for status in (200, 202, 400, 401, 404, 413, 422, 429, 503):
        assert f"`{status}" in SPEC, status
    assert "X-OpenRFT-Protocol: 1" in SPEC
    assert "/rollout_id/<rollout_id>/invocation_id/<invocation_id>/experiment_id/<experiment_id>/run_id/" in SPEC
