"""ldm.mapped_pages: the pages of replaced weights of a memory-mapped checkpoint go back, nothing else does."""
import sys

import pytest
import torch

from ldm.mapped_pages import release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps: Linux")


def resident_bytes():
    import os
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_mapped_weights_pages_are_released_and_read_back_from_the_file(tmp_path):
    weights = {"big": torch.arange(16 * 2**20, dtype=torch.float32), "small": torch.ones(3)}   # 64 MiB
    torch.save(weights, tmp_path / "w.ckpt")
    mapped = torch.load(tmp_path / "w.ckpt", mmap=True, weights_only=True)
    assert torch.equal(mapped["big"], weights["big"])         # read: every page resident
    before = resident_bytes()
    released = release_file_pages([mapped["big"]])
    assert released > 60 * 2**20
    assert before - resident_bytes() > 48 * 2**20
    assert torch.equal(mapped["big"], weights["big"]) and torch.equal(mapped["small"], weights["small"])


def test_anonymous_memory_is_never_touched():
    tensor = torch.arange(4 * 2**20, dtype=torch.float32)
    assert release_file_pages([tensor, tensor[1:5]]) == 0
    assert torch.equal(tensor, torch.arange(4 * 2**20, dtype=torch.float32))
