"""CPU threads chosen from how busy other processes keep the machine."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from unireg import cpu


def test_others_busy_takes_this_process_out() -> None:
    since = cpu.CpuSample(wall=0.0, busy=10.0, own=1.0)
    # 1 s later: 1.9 CPU-s busy in all, 0.9 of them this process's
    now = cpu.CpuSample(wall=1.0, busy=11.9, own=1.9)
    assert cpu.others_busy(since, now) == pytest.approx(1.0)
    assert cpu.others_busy(since, cpu.CpuSample(0.1, 10.1, 1.0)) is None  # window too short
    assert cpu.others_busy(cpu.CpuSample(0.0, None, 0.0), now) is None  # /proc unreadable


@pytest.mark.parametrize(("others", "expected"), [(0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (9, 1)])
def test_auto_threads_leaves_busy_cpus_alone(monkeypatch, others, expected) -> None:
    monkeypatch.setattr(cpu, "available_cpus", lambda: 4)
    monkeypatch.setattr(cpu, "sample", lambda: cpu.CpuSample(1.0, 10.0 + others, 0.0))
    assert cpu.auto_threads(cpu.CpuSample(0.0, 10.0, 0.0)) == expected


def test_auto_threads_without_a_measure_uses_every_cpu(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "available_cpus", lambda: 3)
    monkeypatch.setattr(cpu, "_START", None)
    assert cpu.auto_threads() == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_real_busy_process_is_seen() -> None:
    since = cpu.sample()
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        seen = cpu.others_busy(since)
    finally:
        proc.kill()
        proc.wait()
    assert seen is not None and seen >= 0.5  # the loop's ~1 CPU (minus its start-up)


def test_configure_threads_order(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        assert cpu.configure_threads(1) == (1, "--threads")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cpu.configure_threads() == (1, "OMP_NUM_THREADS")
        with pytest.raises(ValueError, match="--threads"):
            cpu.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def _repeat_fault_count(env: dict[str, str]) -> int:
    """Page faults of five 64 MiB malloc / write / free rounds after a first one, in a fresh
    process that called :func:`unireg.cpu.retain_freed_memory`."""
    import os

    code = (
        "import ctypes, resource\n"
        "from unireg import cpu\n"
        "cpu.retain_freed_memory()\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "n = 64 << 20\n"
        "def once():\n"
        "    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)\n"
        "once()\n"
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): once()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_new_page_faults() -> None:
    pages = 5 * (64 << 20) // 4096
    kept = _repeat_fault_count({})
    returned = _repeat_fault_count({"UNIREG_KEEP_FREED_MEMORY": "0"})
    if returned < pages // 2:
        pytest.skip("this libc reuses large blocks by itself (not glibc's default mapping)")
    assert kept < pages // 100  # the freed block came back, its pages already mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and glibc's mallopt")
def test_peak_memory_counts_a_block_allocated_again_from_kept_memory() -> None:
    # a block that allocates 96 MiB the process had freed and kept still reports them
    code = (
        "import torch\n"
        "from unireg import cpu\n"
        "from unireg.profiling import Measure\n"
        "cpu.retain_freed_memory()\n"
        "x = torch.ones(24 << 20); del x\n"  # 96 MiB, freed and kept
        "with Measure('cpu') as m:\n"
        "    x = torch.ones(24 << 20); del x\n"
        "print(m.peak_bytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    peak = int(out.stdout.split()[-1])
    assert peak >= 90 << 20
