"""Few-shot training and evaluation of one fold: its data, the training loop, checkpoints,
scoring and the FSS metrics."""
