"""Fault injection: each known failure of a remote-env RL run, injected into a short real training run."""
