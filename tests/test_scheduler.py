"""The output scheduler: order, lateness, the note ledger, stop and panic (manual clock, in-process port)."""

from __future__ import annotations

import queue
import threading

from antiphon.daemon.clock import ManualClock, MonotonicClock
from antiphon.daemon.scheduler import Item, Scheduler

ON, OFF, CC = 0x90, 0x80, 0xB0


class FakePort:
    """Records what would have gone out, with the clock time it was sent at."""

    def __init__(self, clock) -> None:
        self.clock, self.sent = clock, []

    def send(self, msg) -> None:
        self.sent.append((self.clock.now(), list(msg)))

    def messages(self):
        return [m for _, m in self.sent]


def make(late_ms: float = 100.0, channel: int = 0):
    clock = ManualClock(100.0)
    port = FakePort(clock)
    logs: list[str] = []
    return clock, port, Scheduler(port.send, clock, late_ms, channel, logs.append), logs


def test_sends_in_due_order_and_equal_times_in_submission_order():
    clock, port, s, _ = make()
    s.submit(1, [Item(100.30, 2, ON, 64, 90, 2), Item(100.10, 0, ON, 60, 90, 1),
                 Item(100.30, 3, ON, 67, 90, 3), Item(100.20, 1, OFF, 60, 0, 1)])
    assert s.run_due(clock.now()) == 0
    for t in (100.1, 100.25):
        clock.set(t)
        s.run_due(clock.now())
    assert port.messages() == [[ON, 60, 90], [OFF, 60, 0]]
    clock.set(100.30)
    s.run_due(clock.now())
    assert port.messages()[2:] == [[ON, 64, 90], [ON, 67, 90]]
    assert s.progress[1] == 3 and s.next_due() is None


def test_a_late_note_on_is_dropped_with_its_note_off_but_late_offs_still_go_out():
    clock, port, s, logs = make(late_ms=50)
    s.submit(1, [Item(100.0, 0, ON, 60, 90, 1), Item(100.01, 1, ON, 62, 90, 2), Item(100.2, 2, OFF, 62, 0, 2),
                 Item(100.3, 3, OFF, 60, 0, 1)])
    clock.set(100.0)
    s.run_due(clock.now())
    clock.set(100.07)  # the second note-on is now 60 ms late
    s.run_due(clock.now())
    clock.set(100.5)  # both note-offs are late: they are sent anyway, the dropped note's is not
    s.run_due(clock.now())
    assert port.messages() == [[ON, 60, 90], [OFF, 60, 0]]
    assert s.dropped == 1 and "60 ms late" in logs[0]
    assert not s.ledger


def test_a_stale_note_off_cannot_cut_a_re_struck_note():
    clock, port, s, _ = make()
    s.submit(1, [Item(100.0, 0, ON, 60, 90, 1), Item(100.2, 1, ON, 60, 80, 2), Item(100.3, 2, OFF, 60, 0, 1),
                 Item(100.5, 3, OFF, 60, 0, 2)])
    for t in (100.0, 100.2, 100.35):
        clock.set(t)
        s.run_due(clock.now())
    # The re-strike closes the first note itself; the first note's own off (id 1) is stale.
    assert port.messages() == [[ON, 60, 90], [OFF, 60, 0], [ON, 60, 80]]
    assert s.ledger == {(0, 60): (2, 1)}
    clock.set(100.5)
    s.run_due(clock.now())
    assert port.messages()[-1] == [OFF, 60, 0] and not s.ledger


def test_stop_closes_what_sounds_drops_what_is_pending_and_says_what_was_heard():
    clock, port, s, _ = make(channel=2)
    s.submit(4, [Item(100.0, 0, CC | 2, 64, 127), Item(100.0, 1, ON | 2, 60, 90, 7), Item(100.1, 5, ON | 2, 64, 90, 8),
                 Item(100.5, 9, OFF | 2, 60, 0, 7), Item(100.6, 10, OFF | 2, 64, 0, 8)])
    for t in (100.0, 100.15):
        clock.set(t)
        s.run_due(clock.now())
    assert s.stop() == (4, 5)
    sent_after_stop = port.messages()[3:]
    assert sorted(sent_after_stop[:2]) == [[OFF | 2, 60, 0], [OFF | 2, 64, 0]]
    assert sent_after_stop[2:] == [[CC | 2, 64, 0]]
    assert not s.active()
    s.submit(4, [Item(100.7, 11, ON | 2, 70, 90, 9)])  # a straggler of the stopped answer
    clock.set(101.0)
    s.run_due(clock.now())
    assert len(port.messages()) == 6 and s.stop(4) == (4, 5)


def test_panic_silences_every_note_the_pedal_and_the_channel():
    clock, port, s, _ = make(channel=1)
    s.submit(1, [Item(100.0, 0, ON | 1, 60, 90, 1), Item(100.0, 1, ON | 1, 72, 90, 2),
                 Item(100.0, 2, CC | 1, 64, 127), Item(101.0, 3, OFF | 1, 60, 0, 1)])
    s.run_due(clock.now())
    s.panic()
    tail = port.messages()[3:]
    assert sorted(tail[:2]) == [[OFF | 1, 60, 0], [OFF | 1, 72, 0]]
    assert tail[2:] == [[CC | 1, 64, 0], [CC | 1, 123, 0]]
    assert not s.heap and not s.ledger


def test_the_thread_sends_on_time_wakes_for_commands_and_panics_on_quit():
    clock = MonotonicClock()
    port = FakePort(clock)
    s = Scheduler(port.send, clock, 100.0, 0, lambda m: None)
    q: queue.SimpleQueue = queue.SimpleQueue()
    others: list[tuple] = []
    th = threading.Thread(target=s.serve, args=(q, others.append), daemon=True)
    th.start()
    t0 = clock.now() + 0.05
    items = [Item(t0 + 0.01 * i, i, ON if i % 2 == 0 else OFF, 60, 90 if i % 2 == 0 else 0, i // 2)
             for i in range(20)]
    q.put(("submit", 1, items))
    q.put(("input", 0.0, [0x90, 1, 1]))
    sleep_until = t0 + 0.25
    while clock.now() < sleep_until:
        clock.sleep(0.01)
    q.put(("submit", 2, [Item(clock.now() + 0.05, 0, ON, 62, 90, 99)]))
    clock.sleep(0.06)
    q.put(("quit",))
    th.join(2.0)
    assert not th.is_alive()
    assert others == [("input", 0.0, [0x90, 1, 1])]
    lateness = sorted(sent - it.due for (sent, _), it in zip(port.sent[:20], items))
    # Stated tolerance: sleep-then-spin lands within 5 ms at p90 on a busy 2-core box (measured 1.9 ms
    # with two 2-thread ONNX evaluations on both cores; one that waited out its idle timeout would be
    # up to 250 ms late).
    # The strict figures are `antiphon bench --live`'s.
    assert lateness[0] >= 0 and lateness[17] < 0.005, lateness
    assert port.messages()[20] == [ON, 62, 90]
    assert port.messages()[-3:] == [[OFF, 62, 0], [CC, 64, 0], [CC, 123, 0]]


def test_a_failure_in_the_thread_still_ends_in_a_panic():
    clock = MonotonicClock()
    port = FakePort(clock)
    s = Scheduler(port.send, clock, 100.0, 0, lambda m: None)
    q: queue.SimpleQueue = queue.SimpleQueue()
    errors: list[BaseException] = []

    def route(cmd):
        raise RuntimeError("engine side blew up")

    def body():
        try:
            s.serve(q, route)
        except RuntimeError as e:
            errors.append(e)

    th = threading.Thread(target=body, daemon=True)
    th.start()
    now = clock.now()
    q.put(("submit", 1, [Item(now, 0, ON, 60, 90, 1), Item(now + 5, 1, OFF, 60, 0, 1)]))
    deadline = clock.now() + 2.0
    while not port.sent and clock.now() < deadline:
        clock.sleep(0.001)
    q.put(("input", now, [0x90, 61, 90]))
    th.join(2.0)
    assert errors and not th.is_alive()
    assert port.messages() == [[ON, 60, 90], [OFF, 60, 0], [CC, 64, 0], [CC, 123, 0]]
