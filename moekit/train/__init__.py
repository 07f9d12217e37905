"""Training loops, losses, callbacks, checkpoints and metrics."""
