"""mallopt's fixed mmap threshold: taken by glibc, and a quiet no-op, said in the log, elsewhere."""

from __future__ import annotations

import logging
import platform

import pytest

from critical_weights.core import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_MMAP_THRESHOLD) is glibc's")
def test_glibc_takes_the_threshold():
    assert memory.unmap_large_blocks() is True


def test_a_c_library_without_mallopt_is_said_and_left_alone(monkeypatch, caplog):
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: None)
    with caplog.at_level(logging.INFO, logger="critical_weights.core.memory"):
        assert memory.unmap_large_blocks() is False
    assert "no mallopt" in caplog.text
