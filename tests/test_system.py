"""What edge reads from and sets on the machine: CPUs, memory, threads, malloc arenas."""

from __future__ import annotations

import threading

import pytest

from edge import system


def test_cpus_and_memory_are_sane() -> None:
    assert 1 <= system.available_cpus() <= 1024
    assert system.available_memory() > 64 * 1024 * 1024
    assert system.resident_bytes() > 1024 * 1024


def test_thread_count_is_the_kernels() -> None:
    before = system.thread_count()
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert system.thread_count() == before + 1
    finally:
        stop.set()
        worker.join()


def test_malloc_arenas_are_capped_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert system.cap_malloc_arenas(2) is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert system.cap_malloc_arenas(2) is True  # glibc (Debian)
