"""The bounded handoff from the MIDI input callback to the thread that handles input.

The callback runs on the MIDI system's real-time thread: it must never block and never let a
flood (a controller spewing aftertouch, a DAW's SysEx dump, a feedback loop) grow memory without
bound. So it asks `admit` first: one table lookup sorts out what nobody downstream uses (SysEx,
aftertouch, active sensing, ...), and a count of messages in flight refuses anything beyond
`capacity`. Both kinds of refusal are counted, never queued. Accepted messages go into a
queue.SimpleQueue (its put never blocks); the consumer calls `taken()` for each one it takes, so
in flight = admitted - taken. Each counter has a single writer, so no lock is needed, and the
bound holds exactly: `taken` only grows under the producer's feet, which only frees room.

Two ways to use it: `push`/`get` with the inbox's own queue, or `admit` in front of a queue that
also carries other commands (the jam's scheduler queue), with `taken()` called by its consumer.
When full, the newest message is dropped: evicting the oldest instead would have the producer
reach into the consumer's end of the queue, which is what needs a lock.
"""

from __future__ import annotations

import queue

from antiphon.daemon.config import JamConfig
from antiphon.daemon.errors import UserError

ACCEPT, NOT_MUSICAL = 0, 1
CLOCK_STATUSES = (0xF2, 0xF8, 0xFA, 0xFB, 0xFC)  # song position, clock, start, continue, stop


def _status_table(clock: bool) -> bytes:
    table = bytearray([NOT_MUSICAL]) * 256  # data bytes (< 0x80) and system messages by default
    for status in range(0x80, 0xF0):
        kind = status & 0xF0
        # Aftertouch streams hundreds of messages a second and nothing downstream reads it.
        table[status] = NOT_MUSICAL if kind in (0xA0, 0xD0) else ACCEPT
    if clock:
        for status in CLOCK_STATUSES:
            table[status] = ACCEPT
    return bytes(table)


class Inbox:
    def __init__(self, capacity: int = 4096, in_channel: int = 0, clock: bool = True,
                 warn_every_s: float = 5.0) -> None:
        """`in_channel` 1-16 drops channel messages of other channels early (0: keep all);
        `clock` keeps MIDI clock and transport messages (off when not following the clock)."""
        if capacity < 1:
            raise UserError(f"--inbox-size {capacity}: must be 1 or more")
        if not 0 <= in_channel <= 16:
            raise UserError(f"--in-channel {in_channel} is not 0 (all) or 1-16")
        self.capacity = capacity
        self.warn_every_s = warn_every_s
        self._table = _status_table(clock)
        self._channel = in_channel - 1
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # producer-only counters
        self.admitted = 0
        self.dropped_full = 0
        self.dropped_not_musical = 0
        self.dropped_channel = 0
        # consumer-only
        self._taken = 0
        self._warned_full = 0
        self._warned_other = 0
        self._warned_at: float | None = None

    @classmethod
    def from_config(cls, cfg: JamConfig) -> Inbox:
        return cls(cfg.inbox_size, cfg.in_channel, cfg.midi_clock)

    # ------------------------------------------------------------------ producer (callback)

    def admit(self, msg: list[int] | tuple[int, ...]) -> bool:
        """Whether to enqueue this message; a refusal is counted. Never blocks, takes no lock."""
        if not msg:
            self.dropped_not_musical += 1
            return False
        status = msg[0]
        verdict = self._table[status & 0xFF]
        if verdict != ACCEPT:
            self.dropped_not_musical += 1
            return False
        if self._channel >= 0 and status < 0xF0 and status & 0x0F != self._channel:
            self.dropped_channel += 1
            return False
        if self.admitted - self._taken >= self.capacity:
            self.dropped_full += 1
            return False
        self.admitted += 1
        return True

    def push(self, msg: list[int] | tuple[int, ...], t: float) -> bool:
        """admit + enqueue (t, msg) on the inbox's own queue."""
        if not self.admit(msg):
            return False
        self._queue.put((t, msg))
        return True

    # ------------------------------------------------------------------ consumer

    def taken(self) -> None:
        """The consumer took one admitted message off whatever queue carried it."""
        self._taken += 1

    def get(self, timeout: float | None = None) -> tuple[float, list[int]] | None:
        """The next (t, msg) from the inbox's own queue, or None after `timeout` seconds."""
        try:
            item = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        self._taken += 1
        return item

    @property
    def pending(self) -> int:
        return self.admitted - self._taken

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_not_musical + self.dropped_channel

    def warning(self, now: float) -> str | None:
        """A line to log when messages were lost to a full queue since the last one, at most once
        per `warn_every_s`. Call it from a non-real-time thread whenever convenient."""
        full = self.dropped_full
        if full == self._warned_full:
            return None
        if self._warned_at is not None and now - self._warned_at < self.warn_every_s:
            return None
        other = self.dropped_not_musical + self.dropped_channel
        lost, ignored = full - self._warned_full, other - self._warned_other
        since = "" if self._warned_at is None else f" in the last {now - self._warned_at:.1f} s"
        self._warned_full, self._warned_other, self._warned_at = full, other, now
        extra = f"; {ignored} unused messages (SysEx, aftertouch, other channels) ignored" if ignored else ""
        return (f"input: dropped {lost} MIDI messages{since}: more than {self.capacity} were waiting "
                f"(a flood on the input port, or the daemon fell behind){extra}")
