"""Write protocol/schemas/*.json (JSON Schema of each wire model) and protocol/openapi.json from
the pydantic models and the SDK server's routes.

    python -m env_sdk.schema            # regenerate
    python -m env_sdk.schema --check    # exit 1 when the checked-in files are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from env_sdk import models

PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "protocol"

#: Every model on the wire, by the name its schema file takes.
WIRE_MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m
    for m in (
        models.InitRequest,
        models.InitResponse,
        models.StatusResponse,
        models.Status,
        models.StatusBatchRequest,
        models.StatusBatchResponse,
        models.InitBatchRequest,
        models.InitBatchResponse,
        models.CancelResponse,
        models.Health,
        models.VersionResponse,
        models.ErrorResponse,
        models.RolloutMetadata,
        models.Message,
        models.Tool,
        models.EvaluationResult,
        models.Task,
    )
}


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """{relative path: file content} for every generated file."""
    files: dict[str, str] = {}
    for name, model in WIRE_MODELS.items():
        schema = model.model_json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{name}.json", **schema}
        files[f"schemas/{name}.json"] = _dump(schema)
    codes = TypeAdapter(models.StatusCode).json_schema()
    codes["description"] = "Status.code values: " + ", ".join(f"{c.value} {c.name}" for c in models.StatusCode)
    files["schemas/StatusCode.json"] = _dump({"$schema": "https://json-schema.org/draft/2020-12/schema",
                                              "$id": "StatusCode.json", **codes})
    from env_sdk.server import create_env_app  # the routes as the SDK serves them

    async def agent(task: Any, client: Any) -> None:
        return None

    openapi = create_env_app(agent, name="env").openapi()
    files["openapi.json"] = _dump(openapi)
    return files


def write(out_dir: Path = PROTOCOL_DIR) -> list[Path]:
    written = []
    for rel, content in render().items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(path)
    return written


def stale(out_dir: Path = PROTOCOL_DIR) -> list[str]:
    """Generated files that are missing or differ from what the models give now."""
    problems = []
    for rel, content in render().items():
        path = out_dir / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.read_text() != content:
            problems.append(f"{rel}: differs from the models")
    expected = {f"schemas/{n}.json" for n in [*WIRE_MODELS, "StatusCode"]}
    if (out_dir / "schemas").is_dir():
        problems += [f"schemas/{p.name}: no model produces it" for p in sorted((out_dir / "schemas").glob("*.json"))
                     if f"schemas/{p.name}" not in expected]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m env_sdk.schema", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the files are stale; write nothing")
    parser.add_argument("--out", type=Path, default=PROTOCOL_DIR, help="protocol directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.out)
        for p in problems:
            print(f"stale: {args.out / p}", file=sys.stderr)
        if problems:
            print("run `python -m env_sdk.schema` and commit the result", file=sys.stderr)
            return 1
        print(f"protocol schemas in {args.out} are up to date")
        return 0
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
