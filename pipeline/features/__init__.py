"""Frozen backbone features: the backbones and ``data/features.zarr`` (layout, writer, reader)."""
