"""Bounded inbox: early filtering, a hard bound with counted drops, floods, rate-limited warnings."""

from __future__ import annotations

import queue
import threading
import time
import tracemalloc

import pytest

from antiphon.daemon.config import JamConfig
from antiphon.daemon.errors import UserError
from antiphon.daemon.inbox import Inbox

NOTE = [0x90, 60, 100]


def test_musical_and_clock_messages_pass_the_rest_is_dropped_early_and_counted():
    box = Inbox(capacity=100)
    kept = [[0x90, 60, 100], [0x80, 60, 0], [0xB0, 64, 127], [0xC0, 5], [0xE0, 0, 64],
            [0xF8], [0xFA], [0xFB], [0xFC], [0xF2, 0, 4]]
    dropped = [[0xF0, 0x7E, 0x7F, 0xF7], [0xFE], [0xA0, 60, 30], [0xD0, 30], [0xF1, 3], [0xFF], [0xF9],
               [0x3C, 0x40], []]
    for i, m in enumerate(kept + dropped):
        box.push(m, float(i))
    assert box.dropped_not_musical == len(dropped) and box.dropped_full == 0
    got = [box.get(0) for _ in range(len(kept))]
    assert got == [(float(i), m) for i, m in enumerate(kept)]
    assert box.get(0) is None and box.pending == 0


def test_clock_can_be_filtered_and_channels_too():
    box = Inbox(capacity=100, in_channel=2, clock=False)
    for m in ([0xF8], [0xFA], [0x90, 60, 1], [0x91, 60, 1], [0xB3, 7, 1]):
        box.push(m, 0.0)
    assert box.pending == 1 and box.get(0) == (0.0, [0x91, 60, 1])
    assert box.dropped_not_musical == 2 and box.dropped_channel == 2
    cfg = Inbox.from_config(JamConfig(inbox_size=3, in_channel=0, midi_clock=True))
    assert cfg.capacity == 3 and cfg.push([0xF8], 0.0)
    with pytest.raises(UserError, match="inbox-size"):
        Inbox.from_config(JamConfig(inbox_size=0))


def test_a_full_inbox_drops_the_newest_and_counts_it():
    box = Inbox(capacity=8)
    results = [box.push([0x90, 40 + i, 100], float(i)) for i in range(20)]
    assert results == [True] * 8 + [False] * 12
    assert box.dropped_full == 12 and box.pending == 8
    assert [box.get(0)[0] for _ in range(3)] == [0.0, 1.0, 2.0]
    assert box.push(NOTE, 20.0) and box.pending == 6


def test_admit_in_front_of_a_shared_queue_with_taken_acknowledgements():
    box, shared = Inbox(capacity=2), queue.SimpleQueue()
    shared.put(("submit", 1))  # other traffic on the same queue does not count
    for t in range(4):
        if box.admit(NOTE):
            shared.put(("input", float(t), NOTE))
    assert box.pending == 2 and box.dropped_full == 2
    while not shared.empty():
        if shared.get()[0] == "input":
            box.taken()
    assert box.pending == 0 and box.admit(NOTE)


def flood(box: Inbox, seconds: int, rate: int = 10_000, drain_every: int = 1000, drain: int = 500) -> int:
    """`rate` msgs/s for `seconds`; the consumer takes `drain` messages every `drain_every` arrivals."""
    taken = 0
    for i in range(rate * seconds):
        box.push([0x90, i % 128, 1 + i % 127], i / rate)
        assert box.pending <= box.capacity
        if i % drain_every == drain_every - 1:
            for _ in range(drain):
                if box.get(0) is None:
                    break
                taken += 1
    return taken


def test_flood_of_10000_per_second_for_10_seconds_stays_bounded():
    box = Inbox(capacity=4096)
    tracemalloc.start()
    try:
        flood(box, 1)
        one_second = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        taken = flood(box, 9)
        nine_more = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Memory stops growing once the inbox is full: nine more seconds cost no more than the first.
    assert nine_more <= one_second * 1.1, (one_second, nine_more)
    assert one_second < 4096 * 400  # a few hundred bytes per queued message, not per message seen
    total = 100_000
    assert box.admitted + box.dropped_full == total
    assert box.dropped_full > 40_000  # the consumer takes 5,000/s of the 10,000/s
    assert box.admitted - box.pending >= taken


def test_producer_thread_is_never_held_up_by_a_slow_consumer():
    box = Inbox(capacity=1024)
    n = 100_000
    stop = threading.Event()
    peak = [0]
    slowest = [0.0]

    def producer() -> None:
        for i in range(n):
            t0 = time.perf_counter()
            box.push(NOTE, float(i))
            slowest[0] = max(slowest[0], time.perf_counter() - t0)
            peak[0] = max(peak[0], box.pending)

    def consumer() -> None:
        while not stop.is_set():
            if box.get(0.01) is not None:
                time.sleep(0.0001)  # an engine busy with a decode step

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for th in threads:
        th.start()
    threads[0].join(timeout=30)
    stop.set()
    threads[1].join(timeout=5)
    assert not threads[0].is_alive()
    assert peak[0] <= 1024
    assert box.admitted + box.dropped_full == n and box.dropped_full > 0
    # No waiting on the consumer: the worst push is a GIL hand-over, not a queue wait.
    assert slowest[0] < 0.25


def test_warning_is_rate_limited_and_only_about_lost_messages():
    box = Inbox(capacity=1, warn_every_s=5.0)
    box.push([0xF0, 1, 0xF7], 0.0)
    assert box.warning(0.0) is None  # ignoring SysEx loses nothing worth a warning
    box.push(NOTE, 0.0)
    box.push(NOTE, 0.1)
    first = box.warning(0.2)
    assert first is not None and "dropped 1 MIDI messages" in first and "1 unused" in first
    box.push(NOTE, 1.0)
    assert box.warning(1.0) is None  # within 5 s of the last one
    box.push(NOTE, 2.0)
    later = box.warning(6.0)
    assert later is not None and "dropped 2 MIDI messages in the last 5.8 s" in later
    assert box.warning(20.0) is None  # nothing new
