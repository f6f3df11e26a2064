"""Datasets and their conventions: the synthetic benchmark, PASCAL / COCO adapters, the image
index, fold splits and few-shot episode manifests."""
