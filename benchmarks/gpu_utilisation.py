"""Mean and peak GPU utilisation of every stage of a ``benchmarks/gpu_check.sh`` log.

The log's lines carry a time stamp (``HH:MM:SS``) and scale.py's stage lines say how long the
stage took (``n=64 priors: 27.7 s, ...``), so a stage ran from its stamp minus those seconds to
its stamp; ``nvidia-smi``'s CSV (one sample a second) gives the utilisation in that window.

    python3 benchmarks/gpu_utilisation.py $OUT/gpu_scale.log $OUT/gpu_mem.csv
"""

from __future__ import annotations

import csv
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path

STAGE = re.compile(r"^(\d\d:\d\d:\d\d)\s+n=(\d+) (\w+): ([\d.]+) s")


def samples(path: Path) -> list[tuple[datetime, float, float]]:
    """``(time of day, utilisation %, memory MiB)`` of each nvidia-smi sample."""
    out = []
    for row in csv.reader(path.read_text().splitlines()[1:]):
        try:
            stamp = datetime.strptime(row[0].strip().split(" ")[-1].split(".")[0], "%H:%M:%S")
            out.append((stamp, float(row[2].strip().rstrip(" %")), float(row[1].strip().split()[0])))
        except (IndexError, ValueError):
            continue  # a header repeated or a line cut short
    return out


def main(log: Path, table: Path) -> None:
    points = samples(table)
    print(f"{'stage':<16}{'s':>7}{'mean util %':>13}{'peak util %':>13}{'peak MiB':>10}")
    for line in log.read_text().splitlines():
        match = STAGE.match(line)
        if not match:
            continue
        end = datetime.strptime(match[1], "%H:%M:%S")
        start = end - timedelta(seconds=float(match[4]))
        window = [(u, m) for t, u, m in points if start <= t <= end]
        if not window:
            continue
        utils = [u for u, _ in window]
        print(f"{match[3] + ' n=' + match[2]:<16}{float(match[4]):>7.1f}{sum(utils) / len(utils):>13.1f}"
              f"{max(utils):>13.0f}{max(m for _, m in window):>10.0f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
