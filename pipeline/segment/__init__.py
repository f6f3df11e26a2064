"""Segment your own images with a trained fold: :class:`~pipeline.segment.segmenter.Segmenter`
(the Python API) and ``lfss-segment`` (:mod:`pipeline.segment.cli`)."""
