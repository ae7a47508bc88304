"""Training runs on top of the farm: the trainer, its resumable state, checkpoints, weights and metrics."""
