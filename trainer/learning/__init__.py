"""Learning: from scored groups to a LoRA update.

batch.py turns a step's groups into samples with group-relative advantages (grpo.py) from the
recorded calls (samples.py); learner.py runs the GRPO update over micro-batches (prefix.py shares a
group's prompt); checkpoints.py saves and finds the run's state.
"""
