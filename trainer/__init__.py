"""openrft trainer: gateway, rollout scheduler, GRPO LoRA learner, CLI."""

import os

# OpenMP threads that spin while waiting make torch 10-60x slower as soon as another busy
# process shares the cores (measured on 2 cores: a 64-row decode went from 0.5 s to 5-30 s).
# Must be set before torch loads; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
