"""Freed heap memory is given back to the operating system."""

import sys

import pytest

from ofg_jax.training.host_memory import release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux")
def test_freed_heap_pages_leave_the_resident_set():
    # 200 MiB in blocks below glibc's mmap threshold, all on the heap; the last
    # one stays allocated, so that the heap's top cannot shrink by itself.
    blocks = [bytearray(64 * 1024) for _ in range(3200)]
    last = blocks[-1]
    del blocks
    before = _rss_mb()
    assert release_freed_memory()
    assert before - _rss_mb() > 150
    assert len(last) == 64 * 1024
