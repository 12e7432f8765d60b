"""What edge reads from and sets on the machine: CPUs, memory, threads, malloc arenas."""

from __future__ import annotations

import os
import sys
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


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux")
def test_lowering_priority_touches_the_calling_thread_and_the_threads_it_starts() -> None:
    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = _nice()

    def lowered() -> None:
        seen["before"] = _nice()
        seen["done"] = system.lower_thread_priority(3)
        seen["after"] = _nice()
        started = threading.Thread(target=child)
        started.start()
        started.join()

    main_before = _nice()
    worker = threading.Thread(target=lowered)
    worker.start()
    worker.join()
    assert seen["done"] is True
    assert seen["after"] == min(19, seen["before"] + 3)
    assert seen["child"] == seen["after"]  # libvips' workers inherit it the same way
    assert _nice() == main_before  # the event loop's thread keeps its priority


MIB = 1 << 20


def test_an_idle_process_trims_once_a_burst_left_rss_above_its_floor() -> None:
    policy = system.TrimPolicy(100 * MIB, every=30)
    assert not policy.due(105 * MIB, idle=True)  # within the slack: nothing to hand back
    assert not policy.due(400 * MIB, idle=False)  # busy: the burst's memory is live
    assert policy.due(300 * MIB, idle=True)  # the burst is over: trim now
    policy.trimmed(110 * MIB, idle=True)
    assert policy.floor == 110 * MIB
    assert not policy.due(112 * MIB, idle=True)


def test_a_trim_under_load_does_not_raise_the_idle_floor() -> None:
    policy = system.TrimPolicy(100 * MIB, every=3)
    due = [policy.due(350 * MIB, idle=False) for _ in range(3)]
    assert due == [False, False, True]  # the periodic trim under steady load
    policy.trimmed(330 * MIB, idle=False)
    assert policy.floor == 100 * MIB
    # so the garbage the burst leaves still counts as growth once it is over
    assert policy.due(200 * MIB, idle=True)
