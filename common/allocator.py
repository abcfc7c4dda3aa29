"""glibc malloc settings for long CPU runs.

PyTorch's CPU allocator hands every large tensor back to glibc when it is freed, and glibc returns
blocks above its mmap threshold to the kernel at once; the next step maps them again and touches
every page. On a Q-realign calibration this was 25% of the CPU time in page faults (227 million of
them, README "Q-realign's calibration cost"). Keeping freed memory in the process removes them and
changes no result. Applied at CLI start unless the user set glibc's own ``MALLOC_*`` variables or
``SAFEQUANT_MALLOC=default``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    "mmap_threshold": (_M_MMAP_THRESHOLD, 32 << 20),  # blocks under 32 MiB come from the heap
    "trim_threshold": (_M_TRIM_THRESHOLD, 2**31 - 1),  # give memory back only past ~2 GiB free (int max)
    "top_pad": (_M_TOP_PAD, 256 << 20),  # grow the heap in 256 MiB steps
}
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it (not musl, not macOS)
    except (OSError, AttributeError):
        return None
    return libc


def tune_glibc_malloc() -> dict[str, int] | None:
    """Apply :data:`SETTINGS` with ``mallopt``; returns what was applied, or None where it was
    left alone (not glibc, the user chose their own ``MALLOC_*`` values, or
    ``SAFEQUANT_MALLOC=default``)."""
    if os.environ.get("SAFEQUANT_MALLOC", "").lower() == "default":
        return None
    if any(v in os.environ for v in _USER_VARIABLES):
        return None
    libc = _glibc()
    if libc is None:
        return None
    applied = {}
    for name, (param, value) in SETTINGS.items():
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[name] = value
    log.debug("glibc malloc settings: %s", applied)
    return applied
