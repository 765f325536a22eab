"""The live dashboard: a local web page over run directories (`openrft dashboard`, `train --dashboard`).

runs.py reads what a run writes (metrics.jsonl, rollouts/step_*.jsonl, tokens/step_*.jsonl (tokens.py),
eval*.json, traces.jsonl), so the page works on a live run, a finished one and one whose trainer
died; app.py serves those reads as JSON beside the static page (static/, with uPlot vendored under
static/vendor/uplot with its licence: nothing is fetched from a CDN). Imports only the floor.
"""

from trainer.dashboard.app import create_dashboard_app
from trainer.dashboard.runs import RunsDir

__all__ = ["RunsDir", "create_dashboard_app"]
