"""How busy the machine was with other work while a benchmark ran: times taken on a busy machine
are inflated and noisy, and the report says so instead of printing them as if nothing were wrong."""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

# Other processes using more than this share of the CPUs during a run, or a 1-minute load average
# above LOAD_FRACTION of the cores before it, make the report warn that the machine was busy. The
# load average lags (it decays over minutes), so its bar is higher.
BUSY_FRACTION = 0.15
LOAD_FRACTION = 0.3


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, number of CPUs) from the first line of /proc/stat (Linux), or None elsewhere."""
    try:
        with open("/proc/stat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields[:8]) - idle, max(cpus, 1)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class LoadMeter:
    """Started before a run, read after it: the share of the CPUs that other processes used meanwhile."""

    start_wall: float
    start_own: float
    start_jiffies: tuple[int, int] | None
    load_before: float | None

    @classmethod
    def start(cls) -> LoadMeter:
        try:
            load = os.getloadavg()[0] / (os.cpu_count() or 1)
        except (OSError, AttributeError):
            load = None
        return cls(time.perf_counter(), _own_cpu_seconds(), _cpu_jiffies(), load)

    def others_share(self) -> float | None:
        """CPU time of every other process since ``start``, as a share of all CPUs' time (None where unknown)."""
        end = _cpu_jiffies()
        if end is None or self.start_jiffies is None:
            return None
        wall = time.perf_counter() - self.start_wall
        busy_s = (end[0] - self.start_jiffies[0]) / os.sysconf("SC_CLK_TCK")
        others = busy_s - (_own_cpu_seconds() - self.start_own)
        return max(0.0, others / (wall * end[1])) if wall > 0 else None

    def warnings(self) -> list[str]:
        """What the report should say about the machine's load (empty on a quiet machine)."""
        out = []
        if self.load_before is not None and self.load_before > LOAD_FRACTION:
            out.append(f"the machine was busy before the run (1-minute load average {self.load_before:.0%} of "
                       f"{os.cpu_count()} cores)")
        share = self.others_share()
        if share is not None and share > BUSY_FRACTION:
            out.append(f"other processes used {share:.0%} of the CPUs during the run")
        return out
