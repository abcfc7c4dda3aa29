"""The CLI's glibc malloc settings (common/allocator.py): applied on glibc, left alone when the
user chose their own or opted out."""
from __future__ import annotations

import ctypes

import pytest

from common import allocator


def _is_glibc() -> bool:
    return allocator._glibc() is not None


@pytest.fixture
def clean_env(monkeypatch):
    for name in allocator._USER_VARIABLES + ("SAFEQUANT_MALLOC",):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.skipif(not _is_glibc(), reason="mallopt is glibc's")
def test_applies_every_setting_on_glibc(clean_env):
    applied = allocator.tune_glibc_malloc()
    assert applied == {name: value for name, (_, value) in allocator.SETTINGS.items()}
    # the values fit mallopt's int argument (a larger one would wrap and be refused)
    assert all(0 < v <= 2**31 - 1 for v in applied.values())
    assert all(ctypes.c_int(v).value == v for v in applied.values())


@pytest.mark.parametrize("name, value", [("SAFEQUANT_MALLOC", "default"), ("MALLOC_ARENA_MAX", "2"),
                                         ("MALLOC_TRIM_THRESHOLD_", "0")])
def test_left_alone_when_the_user_decides(clean_env, name, value):
    clean_env.setenv(name, value)
    assert allocator.tune_glibc_malloc() is None
