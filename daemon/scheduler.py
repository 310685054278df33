"""The output side: a heap of timed messages, a ledger of sounding notes, and panic.

`Scheduler` is plain state, driven either by `serve` (the scheduler thread: it alone owns the
output port) or directly by tests with a ManualClock. Messages belong to an answer generation
`gen` and carry the index of the answer token that produced them, so that after a barge-in the
engine can learn exactly how much of the answer was heard. Each note-on has a note id and its
note-off carries the same id: an off whose id no longer matches the ledger (the key was struck
again since) is not sent, so a stale note-off can never cut a re-struck note.

An answer placed on a beat of the MIDI clock is placed by the tempo line as it stood then, up to a
second before it sounds; the line can move in between (a stalled graph delivers ticks late, a
refit follows them). Until its first message goes out, such an answer is moved, whole, onto where
its beat lies now (`retimer`, asked after each tick and on the answer's first submit).
"""

from __future__ import annotations

import heapq
import queue
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from antiphon.daemon.clock import SPIN_S

NOTE_OFF, NOTE_ON, CC = 0x80, 0x90, 0xB0
CC_SUSTAIN, CC_ALL_NOTES_OFF = 64, 123
IDLE_S = 0.25  # how often the scheduler looks after its output port (and wakes when idle)
# A beat that moved less than this is not worth re-sorting the heap for (the line's own jitter).
RETIME_MIN_S = 0.001


class Item(NamedTuple):
    due: float  # clock seconds
    index: int  # answer token that produced it
    status: int
    data1: int
    data2: int
    note_id: int = -1


class Scheduler:
    def __init__(self, send: Callable[[list[int]], None], clock: Any, late_drop_ms: float = 100.0,
                 out_channel: int = 0, log: Callable[[str], None] = print,
                 trace: Callable[[float, float, list[int]], None] | None = None) -> None:
        self.send, self.clock, self.log, self.trace = send, clock, log, trace
        self.late_drop_s = late_drop_ms / 1000.0
        self.out_channel = out_channel & 0x0F
        self.heap: list[tuple] = []
        self.seq = 0  # ties at equal due times keep submission order
        self.ledger: dict[tuple[int, int], tuple[int, int]] = {}  # (channel, pitch) -> (note_id, gen)
        self.sustain: set[int] = set()  # channels whose pedal we hold down
        self.progress: dict[int, int] = {}  # gen -> highest token index sent or dropped
        self.latest_gen = -1
        self.dead_gen = -1  # messages of this gen or older are refused: their answer was stopped
        self.dropped = 0
        # The latest answer placed on a beat: its start while not yet played (None: nothing to
        # retime), and how far retiming moved it (its later notes move as far). The retimer maps
        # (start, now) to where the start's beat lies on the line now.
        self.retimer: Callable[[float, float], float] | None = None
        self.pending_gen, self.pending_start, self.shift_s = -1, None, 0.0

    # ------------------------------------------------------------------ engine side

    def submit(self, gen: int, items: Iterable[Item], start: float | None = None) -> None:
        """`start`: the answer's start, placed on a beat (None in free time), retimed until it plays."""
        if gen <= self.dead_gen:
            return
        fresh = gen > self.latest_gen
        self.latest_gen = max(self.latest_gen, gen)
        self.progress.setdefault(gen, -1)
        d = self.shift_s if gen == self.pending_gen else 0.0
        for it in items:
            if d:
                it = it._replace(due=it.due + d)
            self.seq += 1
            heapq.heappush(self.heap, (it.due, self.seq, gen, it))
        if fresh and start is not None:
            self.pending_gen, self.pending_start, self.shift_s = gen, start, 0.0
            self.retime()  # the line may have moved since the engine placed it

    def retime(self) -> None:
        """Move the answer still waiting for its first note onto where its beat lies now."""
        start, retimer = self.pending_start, self.retimer
        if start is None or retimer is None:
            return
        delta = retimer(start, self.clock.now()) - start
        if abs(delta) < RETIME_MIN_S:
            return
        g = self.pending_gen
        self.heap = [(due + delta, seq, gen, it._replace(due=it.due + delta)) if gen == g else (due, seq, gen, it)
                     for due, seq, gen, it in self.heap]
        heapq.heapify(self.heap)
        self.pending_start = start + delta
        self.shift_s += delta

    def next_due(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def active(self) -> bool:
        """Something of an answer is still to come or still sounding."""
        return bool(self.heap or self.ledger)

    # ------------------------------------------------------------------ sending

    def _emit(self, msg: list[int], due: float) -> None:
        self.send(msg)
        if self.trace is not None:
            self.trace(due, self.clock.now(), msg)

    def run_due(self, now: float) -> int:
        """Send (or drop, when too late) everything due by `now`; returns how many were sent."""
        sent = 0
        while self.heap and self.heap[0][0] <= now:
            _due, _, gen, it = heapq.heappop(self.heap)
            if gen == self.pending_gen:
                self.pending_start = None  # it sounds: its beat is kept, not chased
            if self.progress.get(gen, -1) < it.index:
                self.progress[gen] = it.index
            if self._play(gen, it, now):
                sent += 1
        return sent

    def _play(self, gen: int, it: Item, now: float) -> bool:
        kind, ch = it.status & 0xF0, it.status & 0x0F
        key = (ch, it.data1)
        if kind == NOTE_ON and it.data2 > 0:
            if now - it.due > self.late_drop_s:
                # A late note-on is dropped; its note-off will find no ledger entry and stay silent.
                self.dropped += 1
                self.log(f"scheduler: dropped a note {1000 * (now - it.due):.0f} ms late")
                return False
            if key in self.ledger:
                self._emit([NOTE_OFF | ch, it.data1, 0], it.due)
            self.ledger[key] = (it.note_id, gen)
        elif kind == NOTE_OFF or kind == NOTE_ON:
            entry = self.ledger.get(key)
            if entry is None or (it.note_id >= 0 and entry[0] != it.note_id):
                return False  # stale: the key is silent or belongs to a newer note
            del self.ledger[key]
        elif kind == CC and it.data1 == CC_SUSTAIN:
            if it.data2 >= 64:
                if now - it.due > self.late_drop_s:
                    return False
                self.sustain.add(ch)
            else:
                self.sustain.discard(ch)
        self._emit([it.status, it.data1, it.data2], it.due)
        return True

    # ------------------------------------------------------------------ stopping

    def stop(self, gen: int | None = None) -> tuple[int, int]:
        """Stop answer `gen` (default: the latest) and older now: drop what is pending, close what sounds.

        Returns (gen, index of the last answer token sent), -1 when nothing of it was sent.
        """
        g = self.latest_gen if gen is None else gen
        self.dead_gen = max(self.dead_gen, g)
        if self.pending_gen <= g:
            self.pending_start = None
        self.heap = [e for e in self.heap if e[2] > g]
        heapq.heapify(self.heap)
        now = self.clock.now()
        for key, (_, note_gen) in list(self.ledger.items()):
            if note_gen <= g:
                self._emit([NOTE_OFF | key[0], key[1], 0], now)
                del self.ledger[key]
        if not self.ledger:
            for ch in sorted(self.sustain):
                self._emit([CC | ch, CC_SUSTAIN, 0], now)
            self.sustain.clear()
        return g, self.progress.get(g, -1)

    def panic(self) -> None:
        """Silence everything we may have started: note-offs, sustain off, all-notes-off."""
        self.heap.clear()
        self.pending_start = None
        self.dead_gen = max(self.dead_gen, self.latest_gen)
        now = self.clock.now()
        for ch, pitch in list(self.ledger):
            self._emit([NOTE_OFF | ch, pitch, 0], now)
        self.ledger.clear()
        for ch in sorted(self.sustain | {self.out_channel}):
            self._emit([CC | ch, CC_SUSTAIN, 0], now)
        self.sustain.clear()
        self._emit([CC | self.out_channel, CC_ALL_NOTES_OFF, 0], now)

    # ------------------------------------------------------------------ the thread

    def handle(self, cmd: tuple, on_other: Callable[[tuple], None]) -> bool:
        """One command from the queue; False means quit."""
        op = cmd[0]
        if op == "submit":
            self.submit(cmd[1], cmd[2], cmd[3] if len(cmd) > 3 else None)
        elif op == "cancel":
            cmd[2](self.stop(cmd[1]))
        elif op == "panic":
            self.panic()
        elif op == "quit":
            return False
        else:
            on_other(cmd)
        return True

    def serve(self, commands: queue.SimpleQueue, on_other: Callable[[tuple], None],
              on_idle: Callable[[], None] | None = None) -> None:
        """The scheduler thread's body: sleep on the queue until ~SPIN_S before the next message, then spin.

        Waiting on the queue (not a plain sleep) means a barge-in or a new answer is handled the
        moment it arrives. Always ends with a panic, so leaving this loop, by quit or by an
        exception, never leaves a note sounding.
        """
        clock = self.clock
        next_idle = clock.now() + IDLE_S
        try:
            while True:
                nxt = self.next_due()
                now = clock.now()
                # Housekeeping (a ~15 us port listing) runs every IDLE_S, also mid-answer, but
                # never in the last few ms before a message is due.
                if on_idle is not None and now >= next_idle and (nxt is None or nxt - now > 0.005):
                    on_idle()
                    next_idle = now + IDLE_S
                wait = min(IDLE_S if nxt is None else nxt - now - SPIN_S, max(next_idle - now, 0.001))
                if wait > 0:
                    try:
                        cmd = commands.get(timeout=wait)
                    except queue.Empty:
                        continue
                    if not self.handle(cmd, on_other):
                        return
                    continue
                while clock.now() < nxt:
                    if not commands.empty():
                        break
                    clock.sleep(0)
                while not commands.empty():
                    if not self.handle(commands.get_nowait(), on_other):
                        return
                self.run_due(clock.now())
        finally:
            self.panic()
