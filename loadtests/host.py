"""What machine a benchmark ran on, for its figures (docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
from typing import Any


def host_facts() -> dict[str, Any]:
    """Cores this process may use, memory, CPU model, kernel and Python."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return {"nproc": len(os.sched_getaffinity(0)), "ram_gib": round(total_kb / 1024 / 1024, 1),
            "cpu_model": cpu_model, "kernel": platform.release(),
            "python": platform.python_version()}
