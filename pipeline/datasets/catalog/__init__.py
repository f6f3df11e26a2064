"""One module per dataset, each declaring a :class:`~pipeline.datasets.spec.DatasetSpec` as ``SPEC``."""
