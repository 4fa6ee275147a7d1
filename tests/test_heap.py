"""The C heap keeps what a batch frees for the next batch (page faults, not timings)."""

from __future__ import annotations

import subprocess
import sys

from bcc_desk.heap import keep_freed_memory

# A fresh interpreter frees a batch's worth of blocks together, as a network's forward pass
# does, 20 times, and counts the page faults of the last 19 rounds.
_ROUNDS = """
import resource, sys
from bcc_desk.heap import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory() and keep_freed_memory()  # and idempotent
def batch():
    blocks = [bytearray(4 << 20) for _ in range(6)]  # 24 MB, zero-filled: every page touched
    del blocks
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_memory_freed_by_a_batch_is_reused_not_faulted_in_again() -> None:
    if not sys.platform.startswith("linux"):
        assert keep_freed_memory() is False  # glibc's mallopt only: elsewhere a no-op
        return
    untuned, tuned = _faults("plain"), _faults("tuned")
    pages = 19 * (24 << 20) // 4096
    assert untuned > pages // 2  # glibc on its own hands the blocks back every round ...
    assert tuned < pages // 50  # ... and keeps them once tuned
