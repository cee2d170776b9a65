"""How many CPU threads a command's tensor work should use, on a machine it may share.

PyTorch's OpenMP threads spin while they wait for each other; when another process keeps a
core busy, a thread per core makes every parallel region wait for the descheduled one, and a
registration runs several times slower than with one thread fewer. The command line therefore
measures, while it imports its libraries (a second or two it spends anyway), how busy the
machine's CPUs are with other processes, and uses only the CPUs left idle.

Imports nothing heavy: :func:`start` runs before torch is imported.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time

_STAT = "/proc/stat"


class CpuSample:
    """A point in time: wall clock (s), CPU time all processes spent busy (s, from
    ``/proc/stat``; None where it cannot be read) and this process's own CPU time (s).
    (A plain class: importing dataclasses would add to every command's start-up.)"""

    __slots__ = ("wall", "busy", "own")

    def __init__(self, wall: float, busy: float | None, own: float) -> None:
        self.wall, self.busy, self.own = wall, busy, own


def _busy_seconds() -> float | None:
    """Seconds all CPUs have spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open(_STAT) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    ticks = [int(v) for v in fields[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def sample() -> CpuSample:
    """The machine's busy CPU time and this process's CPU time, now."""
    t = os.times()
    return CpuSample(time.monotonic(), _busy_seconds(), t.user + t.system)


_START: CpuSample | None = None


def start() -> None:
    """Mark the start of the measuring window (called first thing by the command line)."""
    global _START
    _START = sample()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def others_busy(since: CpuSample, now: CpuSample | None = None) -> float | None:
    """How many CPUs other processes kept busy on average between two samples (this
    process's own CPU time taken out); None when unknown or the window is under 0.2 s."""
    now = now or sample()
    window = now.wall - since.wall
    if since.busy is None or now.busy is None or window < 0.2:
        return None
    return max(0.0, (now.busy - since.busy - (now.own - since.own)) / window)


def auto_threads(since: CpuSample | None = None) -> int:
    """The CPUs not kept busy by other processes since ``since`` (default: :func:`start`),
    at least 1; all available CPUs when the load cannot be measured."""
    cpus = available_cpus()
    since = since or _START
    busy = None if since is None else others_busy(since)
    if busy is None:
        return cpus
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def configure_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads and say how they were chosen: ``requested`` when given
    (``--threads``), else ``OMP_NUM_THREADS`` when set, else :func:`auto_threads`."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        n, how = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        n, how = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        n, how = auto_threads(), "auto: CPUs idle while starting"
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads(), how


# glibc's mallopt parameters (malloc.h) and the size up to which freed blocks are kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RETAIN_BYTES = 256 << 20


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Have glibc's ``malloc`` keep freed blocks of up to ``limit`` bytes for reuse instead of
    handing them back to the system (``mallopt``: ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD``). oneDNN's convolution buffers and PyTorch's tensors are allocated and
    freed per operation; glibc maps large blocks afresh, and the first write to each of their
    pages is a page fault: a 5^3 convolution of 8 bfloat16 channels over 121x121x93 voxels
    faulted in 11,700 pages every call, about 10 % of its time. With the blocks kept (2
    threads, the first 4 ordered IXI training pairs at 2 mm, ``unireg evaluate``): KeyMorph
    15 % less time a pair (3.56 -> 3.04 s) at 38 % more peak memory (842 -> 1161 MiB), DIO
    6 % less (3.74 -> 3.52 s; its network 12-15 %) at 5 % more (507 -> 530 MiB), SITReg
    unchanged; 30 steps of DIO training 11 % less at 10 % more (1.45 -> 1.60 GB). The
    process keeps up to ``limit`` of freed memory. Off glibc, or with
    ``UNIREG_KEEP_FREED_MEMORY=0``, nothing changes; returns whether the settings took
    effect."""
    libc = _glibc()
    if libc is None or os.environ.get("UNIREG_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(limit))) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, int(limit))
    )


def release_freed_memory() -> None:
    """Hand the freed heap memory that :func:`retain_freed_memory` keeps back to the system
    (glibc ``malloc_trim``), so the resident set is what the process uses: done before a
    block whose peak memory is measured (:class:`unireg.profiling.Measure`). A no-op off
    glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc through ctypes (its ``mallopt`` and ``malloc_trim``), or None elsewhere; looked
    up once."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not Linux, or not glibc
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
