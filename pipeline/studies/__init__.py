"""Studies of the model over training seeds (ablation, mask quality, parts):
``python -m pipeline.studies <study>``."""
