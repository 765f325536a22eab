"""Set before any test module imports torch: see trainer/__init__.py (OMP_WAIT_POLICY)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
