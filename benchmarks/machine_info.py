"""What machine a benchmark ran on, in one line (shared by the scripts in benchmarks/)."""
from __future__ import annotations

import os
import platform


def _proc_field(path: str, key: str) -> str | None:
    """The value after `key` in a /proc file (Linux), or None elsewhere."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def describe() -> str:
    """CPU model, logical CPUs, RAM, OS and kernel, e.g. 'AMD EPYC, 2 logical CPUs, 24 GiB RAM, Linux 6.1'."""
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem = _proc_field("/proc/meminfo", "MemTotal")
    ram = f", {int(mem.split()[0]) / 1024 ** 2:.0f} GiB RAM" if mem else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{ram}, {platform.system()} {platform.release()}"
