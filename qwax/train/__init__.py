"""Training: recipes, the pure train step, optimizer, orbax checkpoints, metrics and the training loop."""
