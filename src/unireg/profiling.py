"""Wall time and peak memory of a block of code.

CPU memory is the growth of the process's peak resident set (Linux ``VmHWM``, reset at the start
of the block through ``/proc/self/clear_refs``) over the resident set at the start, freed heap
memory kept for reuse first handed back (:func:`unireg.cpu.release_freed_memory`); CUDA memory
is ``torch.cuda.max_memory_allocated`` over the block. Elsewhere the peak is not measured (None).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Measure:
    """``with Measure(device) as m: ...`` then ``m.seconds`` and ``m.peak_bytes`` (None when it
    cannot be measured here)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = 0.0
        self.peak_bytes: int | None = None

    def __enter__(self) -> Measure:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from unireg.cpu import release_freed_memory

            release_freed_memory()  # the resident set at the start is then memory in use
            self._ok = _reset_peak()
            self._base = _status_kb("VmRSS")
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            peak = _status_kb("VmHWM")
            if self._ok and peak is not None and self._base is not None:
                self.peak_bytes = max(peak - self._base, 0) * 1024
        self.seconds = time.perf_counter() - self._t0
