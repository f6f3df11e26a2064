"""How many cores this process may use: the thread policy's one number (docs/operations.md
"Threads on a busy machine").

``os.cpu_count()`` counts the machine's cores, not this process's: a CPU affinity mask (taskset,
a batch scheduler's allocation) or a container's CPU quota (cgroup ``cpu.max``; Docker's
``--cpus``, Kubernetes' limits) gives it fewer. A stage's intra-op threads times the tasks it runs
at once never exceed :func:`usable_cores`, so its threads never queue behind each other.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: cgroup v2's quota file, then cgroup v1's pair (the process's own cgroup is mounted here in a container)
CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> int | None:
    """Cores the cgroup's CPU quota allows (rounded up), or None where no quota is set."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def threads_per_task(tasks: int) -> int:
    """Intra-op threads for each of ``tasks`` tasks running at once: the usable cores shared out."""
    return max(1, usable_cores() // max(1, tasks))
