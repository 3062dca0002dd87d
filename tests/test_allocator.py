"""glibc malloc settings (esmm.allocator): when they apply, and that they keep large buffers in
the heap. Each behavioural check runs in a fresh interpreter: the settings are process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from esmm.allocator import skip_reason

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
SRC = str(Path(__file__).resolve().parents[1] / "src")

# Allocates a 64 MiB buffer and reports the bytes glibc holds in mmapped chunks meanwhile
# (mallinfo2().hblkhd): the buffer is there with the defaults, absent when it came from the heap.
PROBE = r"""
import ctypes, json, sys
import numpy as np
from esmm.allocator import keep_large_buffers

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_large_buffers() if sys.argv[1] == "tuned" else None
buf = np.ones(64 << 20, dtype=np.uint8)
print(json.dumps({"applied": applied, "mmapped": libc.mallinfo2().hblkhd}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "ESMM_MALLOC")}
    clean.update(PYTHONPATH=SRC, **env)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=clean, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's; elsewhere they do nothing")
def test_large_buffers_come_from_the_heap_once_tuned():
    default = probe("default")
    tuned = probe("tuned")
    assert default["mmapped"] >= 64 << 20  # glibc's default: a fresh mapping per buffer
    assert tuned["applied"] is True
    assert tuned["mmapped"] < 64 << 20


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's; elsewhere they do nothing")
@pytest.mark.parametrize("env", [{"ESMM_MALLOC": "system"},
                                 {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_user_settings_win(env):
    got = probe("tuned", **env)
    assert got["applied"] is False
    assert got["mmapped"] >= 64 << 20


def test_skip_reasons_name_the_cause():
    assert "ESMM_MALLOC=system" in skip_reason({"ESMM_MALLOC": "System"})
    if GLIBC:
        assert skip_reason({}) is None
        assert "MALLOC_TOP_PAD_" in skip_reason({"MALLOC_TOP_PAD_": "1"})
        assert "jemalloc" in skip_reason({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    else:
        assert "not glibc" in skip_reason({})
