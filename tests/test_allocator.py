"""Freed host memory is reused: a large tensor allocated again does not page-fault its memory again."""

import platform
import subprocess
import sys

import pytest

# In the order of the dilemma command: main() keeps freed memory, then the sub-command imports torch
# and timm. (Their import leaves small free blocks that later small allocations take; without them
# a small allocation can take the heap's top right after a freed large block and pin it there.)
FAULTS = """
import resource, sys
from dilemma.allocator import keep_freed_memory
set_ = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch, timm
def touch():  # 64 MB written once, then freed; the minor page faults it took
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [touch() for _ in range(12)]
print(set_, max(faults[-4:]))  # the steady state: glibc may move the block a few times before it settles
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        was_set, per_touch = out.stdout.split()
        return was_set, float(per_touch)

    default, kept = faults("default"), faults("keep")
    if default[1] < 1_000:
        pytest.skip("this kernel backs large blocks with huge pages: few faults to save")
    assert default[1] > 10_000  # 64 MB = 16,384 pages of 4 KB, faulted in again on every allocation
    assert kept == ("True", pytest.approx(0, abs=100))  # the freed block is reused
