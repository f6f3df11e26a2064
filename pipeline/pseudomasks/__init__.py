"""Language-guided pseudo-masks (LFSS VLMD): the refiner maths, the episode shards that apply
it, ``data/pseudo_masks.zarr`` (layout and reader) and the masks' quality against ground truth."""
