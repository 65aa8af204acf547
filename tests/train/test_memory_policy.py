import os
import sys

from maskbank.train.memory_policy import retain_freed_memory


def test_retain_freed_memory_is_idempotent():
    first = retain_freed_memory()
    assert retain_freed_memory() == first
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION"):
        assert first
