"""Memory of this process from ``/proc/self/status`` (Linux), shared by the benchmarks."""

from __future__ import annotations


def status_bytes(field: str) -> int | None:
    """``field`` of ``/proc/self/status`` in bytes (``"VmRSS"``: resident now; ``"VmHWM"``: the
    peak since ``exec``), or None where the file or the field is missing (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
