import platform
import sys

import numpy as np
import pytest

from lowbit.memory import retain_freed_memory


def test_retain_freed_memory_applies_on_linux_and_allocations_still_work():
    applied = retain_freed_memory()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied
    elif not sys.platform.startswith("linux"):
        assert not applied
    assert retain_freed_memory() == applied  # idempotent
    big = np.ones(20_000_000, dtype=np.float32)  # 80 MB: served from the heap now
    assert big.sum() == 20_000_000
    del big
    again = np.zeros(20_000_000, dtype=np.float32)
    assert not again.any()


@pytest.mark.parametrize("bad", [0, -5, True, 2 ** 31, 1.5])
def test_retain_freed_memory_names_a_bad_threshold(bad):
    with pytest.raises(ValueError, match="mmap_threshold must be an int"):
        retain_freed_memory(bad)
