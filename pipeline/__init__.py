"""Language-guided few-shot segmentation with CLIP priors: the library (maths, no file layout)."""

import os

# OpenMP threads that wait at a barrier sleep instead of spinning (libgomp reads this when torch
# loads, so it is set here, before any import of torch; a value already in the environment wins).
# Spinning wins a few per cent on an idle machine and loses everything on a busy one: a training
# step with 2 threads on 2 cores shared with other jobs ran at 5.9 steps/s spinning, 27.4 sleeping
# and 16.8 with one thread (docs/operations.md "Threads on a busy machine").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
