"""The label actors keep freed memory for the next batch: glibc's thresholds are set, or, where the C
library is not glibc, nothing changes and the call says so."""

from __future__ import annotations

import platform

import pytest

from four_m.pipeline.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_thresholds():
    assert keep_freed_memory() is True
