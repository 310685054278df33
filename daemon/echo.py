"""Recognise antiphon's own output coming back on its input, so that it never answers itself.

A DAW track with MIDI thru (or a monitoring routing mistake) sends every note antiphon plays
straight back into antiphon's input port a few milliseconds later. The guard remembers what was
sent in a fixed ring (no allocation per note beyond the ints themselves) and calls an incoming
message an echo when the same message was sent within `window_s` before it: same kind, note (or
CC number) and velocity (or value), any channel, because DAWs re-channel thru. Note-off and
note-on with velocity 0 count as the same message, as DAWs rewrite one into the other.

Each sent message excuses at most one incoming copy, so a player repeating a note right after
its echo is heard; a genuine replay later than the window is always heard.

Intended use is one thread that both sends and first sees input (the jam scheduler thread). If
`sent` and `is_echo` run on different threads it still needs no lock: `sent` alone writes the
ring, `is_echo` alone writes the `taken` marks, and a slot is only rewritten `capacity` sends
after it was written, far outside any window.
"""

from __future__ import annotations

import math

NOTE_OFF, NOTE_ON = 0x80, 0x90
_ON_KEY, _OFF_KEY = 1 << 16, 2 << 16


def message_key(msg: list[int] | tuple[int, ...]) -> int:
    """What identifies a message up to its channel, as one int; -1 for messages never echoed."""
    if len(msg) < 3 or not 0x80 <= msg[0] < 0xF0:
        return -1
    kind, d1, d2 = msg[0] & 0xF0, msg[1] & 0x7F, msg[2] & 0x7F
    if kind == NOTE_ON and d2 > 0:
        return _ON_KEY | d1 << 8 | d2
    if kind == NOTE_ON or kind == NOTE_OFF:
        return _OFF_KEY | d1 << 8
    return (kind >> 4) << 16 | d1 << 8 | d2


class EchoGuard:
    def __init__(self, window_s: float = 0.030, capacity: int = 256, early_s: float = 0.002) -> None:
        """`early_s`: how far an echo's timestamp may precede the recorded send time, because the
        send time is read after `send_message` returns while input is stamped by another thread."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.window_s = window_s
        self.early_s = early_s
        self._keys = [-1] * capacity
        self._times = [-math.inf] * capacity
        self._stamps = [0] * capacity  # which send occupies the slot
        self._taken = [0] * capacity  # the stamp whose echo was already excused
        self._count = 0  # sends so far; slot = count % capacity
        self.echoes = 0
        self._warned = False

    @classmethod
    def from_config(cls, echo_window_ms: float) -> EchoGuard:
        return cls(window_s=max(echo_window_ms, 0.0) / 1000.0)

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def sent(self, msg: list[int] | tuple[int, ...], t: float) -> None:
        """Record a message antiphon sent at time t (read the clock right after sending)."""
        key = message_key(msg)
        if key < 0 or self.window_s <= 0:
            return
        n = self._count + 1
        i = n % len(self._keys)
        self._keys[i] = -1  # invalid while the slot changes, so a reader never pairs old and new
        self._times[i] = t
        self._stamps[i] = n
        self._keys[i] = key
        self._count = n

    def is_echo(self, msg: list[int] | tuple[int, ...], t: float) -> bool:
        """True if the message received at t is antiphon's own output coming back: drop it."""
        if self.window_s <= 0 or self._count == 0:
            return False
        key = message_key(msg)
        if key < 0:
            return False
        keys, times, stamps, taken = self._keys, self._times, self._stamps, self._taken
        cap = len(keys)
        n = self._count
        oldest = t - self.window_s
        latest = t + self.early_s
        for back in range(min(n, cap)):
            i = (n - back) % cap
            sent_at = times[i]
            if sent_at < oldest:
                return False  # the ring is in send order: everything older is out of the window too
            if sent_at <= latest and keys[i] == key and taken[i] != stamps[i]:
                taken[i] = stamps[i]
                self.echoes += 1
                return True
        return False

    def take_warning(self) -> str | None:
        """A message to log, once per session, the first time an echo was caught."""
        if self._warned or not self.echoes:
            return None
        self._warned = True
        return ("input: antiphon's own notes are coming back on its input port (MIDI thru in the DAW?); "
                "ignoring them. Turn thru off on antiphon's track to save the round trip.")
