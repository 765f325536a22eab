"""The dashboard's HTTP side: the static page and a few JSON reads of RUNS_DIR (see runs.py).

The page polls `/api/metrics?since=N` for the rows it has not drawn yet, so curves grow as steps
land without a socket. Token pieces are decoded with the run's own tokenizer (`tokenizer.json` of
the model directory in its config.yaml) when that is on disk; otherwise the page shows the ids.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from trainer.dashboard.runs import RunsDir, UnknownRun

STATIC = Path(__file__).parent / "static"


@functools.lru_cache(maxsize=8)
def _tokenizer(model_dir: str) -> Any:
    file = Path(model_dir) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(file))


def _pieces(run_path: Path, ids: list[int]) -> list[str] | None:
    try:
        model = (yaml.safe_load((run_path / "config.yaml").read_text(encoding="utf-8")) or {}).get("model")
    except (OSError, yaml.YAMLError):
        return None
    tok = _tokenizer(str(model)) if model else None
    return tok.decode_batch([[i] for i in ids], skip_special_tokens=False) if tok else None


def create_dashboard_app(runs_dir: str | Path) -> FastAPI:
    """The dashboard over `runs_dir` (one run directory, or a folder of them)."""
    runs = RunsDir(Path(runs_dir))
    app = FastAPI(title="openrft dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    def read(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except UnknownRun as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        return runs.runs()

    @app.get("/api/metrics")
    def metrics(run: str, since: int = Query(0, ge=0)) -> dict[str, Any]:
        return read(runs.metrics, run, since)

    @app.get("/api/steps")
    def steps(run: str) -> list[int]:
        return read(runs.steps, run)

    @app.get("/api/rollouts")
    def rollouts(run: str, step: int) -> list[dict[str, Any]]:
        return read(runs.rollouts, run, step)

    @app.get("/api/rollout")
    def rollout(run: str, step: int, id: str) -> dict[str, Any]:
        record = read(runs.rollout, run, step, id)
        for sample in record["samples"]:
            sample["pieces"] = _pieces(runs.run_path(run), sample["ids"])
        return record

    @app.get("/api/evals")
    def evals(run: str) -> list[dict[str, Any]]:
        return read(runs.evals, run)

    @app.get("/api/trace")
    def trace(run: str, id: str) -> list[dict[str, Any]]:
        return read(runs.trace, run, id)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
