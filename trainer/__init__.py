"""openrft trainer: gateway, rollout scheduler, GRPO LoRA learner, CLI."""
