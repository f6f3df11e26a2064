"""DVC stages: each module's ``main(argv)`` reads its params and inputs, runs a Prefect flow,
and writes its outputs atomically. ``pipeline/`` holds the maths; these modules hold the files.
"""

import os

import pipeline  # noqa: F401  (its OpenMP wait policy, set before any stage imports torch)

# Before Prefect is imported: no telemetry (there is no network), quiet logs by default.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
