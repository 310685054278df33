"""The studio glue of `antiphon jam`: MIDI clock, live controls, echo guard, recording, the bounded inbox.

Each piece (midiclock, controls, echo, recorder, inbox) is plain state tested on its own; this
module decides which thread calls what, and in which order:

    rtmidi callback   inbox.admit → ("input", t, msg, jack_t) on the scheduler queue (nothing else)
    scheduler thread  `route`: transport → clock; echo; controls; recording; barge-in; forward
                      `send`: the output port, then echo.sent and recorder.antiphon
                      `on_sent`: the song position each answer note was placed at (trace, markers)
    engine thread     `apply`: a control Action on the Conversation and the sampler
    main thread       `housekeeping`: warnings, tempo for the recording, the status line

The scheduler thread sees input first and alone sends, so the echo guard lives there without a
lock. Nothing here allocates more than a tuple per message on the hot path.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from antiphon.daemon import controls as C
from antiphon.daemon import midiclock as M
from antiphon.daemon.config import JamConfig
from antiphon.daemon.context import is_musical
from antiphon.daemon.controls import Action, Controls
from antiphon.daemon.echo import EchoGuard
from antiphon.daemon.inbox import Inbox
from antiphon.daemon.midiclock import ClockFollower

NOTE_ON, CC = 0x90, 0xB0
# Messages forwarded to the engine but not yet taken by it. The engine may be slower than a
# flood (one prefill per message); beyond this the scheduler stops forwarding player notes, and
# once the engine has caught up it sends one all-notes-off so no key stays "down" in its view.
# 128 is seconds of the fastest playing, and a flood's backlog drains in a fraction of a second.
ENGINE_BACKLOG = 128
# An answer note quantized onto the grid is never moved earlier than now plus this (the send path).
SNAP_LEAD_S = 0.002
LATE_RING = 1 << 16
# An answer whose beat the moving tempo line puts this far in the past still starts at once (the
# rest of it on the line); further, it starts on the next beat. Never more than half of
# --late-drop-ms, so its first note is not dropped as late.
ON_TIME_S = 0.03
TRANSPORT_MARKERS = {M.START: "start", M.CONTINUE: "continue", M.STOP: "stop"}
# Clock ticks are stamped on the MIDI system's own time (rtmidi's delta times: on JACK, when the
# process cycle ran), mapped onto the daemon's clock by the smallest offset of the latest
# STAMP_WINDOW messages: the Python stamp is only ever late (waiting for the GIL), never early.
# Measured with jack_midi_clock and a busy Python thread: 4.0 ms median lateness of the Python
# stamps, 0.05 ms idle (docs/clock.md).
STAMP_WINDOW = 32
# Ticks missing this long while the transport runs: the follower has let go of the line (answers
# in free time), and the log says the clock went quiet.
QUIET_S = M.LOST_MIN_S


class Studio:
    def __init__(self, cfg: JamConfig, clock: Any, log: Callable[[str], None]) -> None:
        from antiphon.daemon import recorder

        self.cfg, self.clock, self.log = cfg, clock, log
        self.inbox = Inbox.from_config(cfg)
        self.controls = Controls.from_config(cfg)
        self.beat = ClockFollower(cfg.beats_per_bar, cfg.quantize)
        self.on_time_s = min(ON_TIME_S, cfg.late_drop_ms / 2000.0)
        self.echo = EchoGuard.from_config(cfg.echo_window_ms)
        self.rec = None
        if cfg.record:
            for path in recorder.recover(cfg.record):
                log(f"record: recovered {path} from a session that did not end cleanly")
            self.rec = recorder.SessionRecorder(cfg.record, origin=clock.now(), beats_per_bar=cfg.beats_per_bar,
                                                channels=(max(cfg.in_channel, 1) - 1, cfg.out_channel - 1))
            log(f"record: writing {self.rec.mid_path}")
        # Set by Jam once the scheduler and queues exist.
        self.scheduler: Any = None
        self.to_engine: Callable[[tuple], None] = lambda item: None
        # --trace: each clock and transport message as the follower took it (Jam._trace_clock).
        self.trace_clock: Callable[[float, list[int], M.ClockState], None] | None = None
        self.forwarded = 0  # scheduler-thread writer
        self.engine_taken = 0  # engine-thread writer
        self.held = 0  # engine-thread writer: player events the Conversation holds back (awaiting a reply)
        self.overflowed = False
        self.engine_dropped = 0  # scheduler-thread writer
        self._dropped_told, self._told_at = 0, -1e9
        # Scheduler-thread state: the offset from the MIDI system's time to ours.
        self._offsets: deque[float] = deque(maxlen=STAMP_WINDOW)
        self._answering = False  # an answer's first note-on has gone out; reset when it ends
        # Why a player's note got no answer, for the main thread to say once (scheduler/engine writers).
        self.unheard_while_off = 0  # note-ons heard while answering is switched off
        self.answering_off = False  # engine-thread writer
        self._quiet_told = False
        self._told: set[str] = set()
        self.state = "listening"
        self.bpm = 0.0
        # Note-on send minus due time, seconds, for --stats and the status line: a preallocated ring
        # of the latest LATE_RING, so a long session neither grows nor allocates per note.
        self.lateness = array("d", bytes(8 * LATE_RING))
        self.notes_sent = 0

    # ------------------------------------------------------------------ rtmidi callback

    def callback(self, put: Callable[[tuple], None]) -> Callable[[tuple, Any], None]:
        now, admit = self.clock.now, self.inbox.admit
        midi_time = [0.0]  # the MIDI system's time of the latest message, from rtmidi's deltas

        def on_midi(event: tuple, _data: Any = None) -> None:
            t = now()  # timestamp first: admit's bookkeeping must not delay it
            msg, delta = event
            jt = midi_time[0] + delta  # summed before admit: a dropped message's delta still counts
            midi_time[0] = jt
            if admit(msg):
                put(("input", t, msg, jt))
        return on_midi

    def _midi_stamp(self, t: float, jt: float) -> float:
        """The MIDI system's time of a message on the daemon's clock (never later than t)."""
        offs = self._offsets
        offs.append(t - jt)
        return jt + min(offs)

    # ------------------------------------------------------------------ scheduler thread

    def send(self, send_message: Callable[[list[int]], None]) -> Callable[[list[int]], None]:
        now, sent, rec = self.clock.now, self.echo.sent, self.rec

        def out(msg: list[int]) -> None:
            send_message(msg)
            t = now()  # after sending: the echo cannot come back before this (see EchoGuard.early_s)
            sent(msg, t)
            if rec is not None:
                rec.antiphon(t, msg)
        return out

    def on_sent(self, due: float, sent: float, msg: list[int]) -> float | None:
        """Scheduler thread, after each message sent: returns the song position (beats) its due
        time has on the clock now (None in free time). An answer's first note-on also goes to
        the recording as a marker, `answer at beat B` (or `answer in free time`)."""
        beats = self.beat.position_beats(due) if self.cfg.midi_clock and self.beat.synced(sent) else None
        if msg[0] & 0xF0 == NOTE_ON and msg[2] > 0:
            self.lateness[self.notes_sent % LATE_RING] = sent - due
            self.notes_sent += 1
            if not self._answering:
                self._answering = True
                if self.rec is not None:
                    self.rec.marker(due, "answer in free time" if beats is None else f"answer at beat {beats:.3f}")
        return beats

    def last_lateness(self) -> float | None:
        n = self.notes_sent
        return self.lateness[(n - 1) % LATE_RING] if n else None

    def route(self, cmd: tuple) -> None:
        _, t, msg, jt = cmd
        self.inbox.taken()
        status = msg[0]
        jack_t = self._midi_stamp(t, jt)
        if status >= 0xF0:
            self._transport(status, msg, jack_t)
            return
        if self.echo.is_echo(msg, t):
            return  # before barge-in: our own note coming back must not stop our answer
        action = self.controls.handle(msg, t)
        if action is not None:
            if action.kind == C.PANIC:
                self.scheduler.panic()
            self._forward(("control", action))
            if not (status & 0xF0 == CC and msg[1] in (C.CC_ALL_SOUND_OFF, C.CC_ALL_NOTES_OFF)):
                return  # a knob is not music; all-notes-off also tells the model the keys are up
        if self.rec is not None:
            self.rec.player(t, msg)
        if not is_musical(msg):
            return  # a mod-wheel sweep must not stop the answer
        kind = status & 0xF0
        if kind == NOTE_ON and msg[2] > 0:
            if self.answering_off:
                self.unheard_while_off += 1
            if self.scheduler.active():
                self.scheduler.stop()  # barge-in: silence the answer in this very wake-up
        self._forward_player(t, msg)

    def _forward_player(self, t: float, msg: list[int]) -> None:
        backlog = self.forwarded - self.engine_taken + self.held  # queued, or held by the engine
        if backlog >= ENGINE_BACKLOG:
            self.overflowed = True
            self.engine_dropped += 1
            return
        if self.overflowed and backlog < ENGINE_BACKLOG // 2:
            self.overflowed = False
            self._forward(("midi", t, [CC | (msg[0] & 0x0F), C.CC_ALL_NOTES_OFF, 0]))
        self._forward(("midi", t, msg))

    def _forward(self, item: tuple) -> None:
        self.forwarded += 1
        self.to_engine(item)

    def _transport(self, status: int, msg: list[int], t: float) -> None:
        if not self.beat.feed(msg, t):
            return
        if self.trace_clock is not None:
            self.trace_clock(t, msg, self.beat.state)
        self.scheduler.retime()  # the line moved with this tick: an answer waiting to start follows its beat
        text = TRANSPORT_MARKERS.get(status)
        if text is None:
            return
        if self.rec is not None:
            self.rec.marker(t, text)
        if status == M.STOP:
            # The DAW stopped: the answer stops with it, its notes closed (not a panic: nothing else sounds).
            if self.scheduler.active():
                self.scheduler.stop()
            self._forward(("control", Action(C.PANIC, float(status), t)))

    def phrase_end(self, now: float) -> None:
        """Scheduler idle after an answer finished sounding: a durable point for the recording."""
        self._answering = False
        if self.rec is not None:
            self.rec.phrase_end(now)

    # ------------------------------------------------------------------ engine thread

    def apply(self, conv: Any, action: Action) -> None:
        kind = action.kind
        if kind == C.SET_TEMPERATURE:
            conv.sampler.temperature = action.value
        elif kind == C.SET_ANSWER_SCALE:
            conv.answer_scale = action.value
        elif kind == C.SET_MEMORY:
            conv.sampler.memory_scale = action.value
        elif kind == C.ENABLE:
            conv.enabled = bool(action.value)
            self.answering_off = not conv.enabled
            if not conv.enabled:
                conv.cancel_answer(action.t)
        elif kind == C.END_CALL:
            conv.end_call(action.t)
        elif kind == C.PANIC:
            conv.cancel_answer(action.t)
        if kind != C.PANIC or action.value < 0xF0:
            self.log(f"control: {action.describe()}")

    def align(self, start: float) -> float | None:
        """The answer's start moved onto the next beat (or bar) when following MIDI clock; None in free time."""
        if not self.cfg.midi_clock or not self.beat.synced(self.clock.now()):
            return None
        return self.beat.next_grid(start - 1e-6, self._sync_beats())

    def on_the_beat(self, start: float, now: float) -> float:
        """Scheduler thread: where an answer placed on a beat at `start` starts by the line as it
        stands now: the same beat (or bar), moved with the line; the next one if that has passed by
        more than ON_TIME_S (late on the beat sounds worse than a beat later); `start` in free time."""
        s, grid = self.beat.state, self._sync_beats()
        if not M.synced(s, now):
            return start
        # Synced: the line is locked with a tempo, so both times below exist.
        t = M.time_of(s, round(M.position(s, start) / grid) * grid)
        if t < now - self.on_time_s:
            later = M.next_grid(s, now, grid)
            self.log(f"clock: the tempo line moved this answer's {'bar' if grid > 1 else 'beat'} "
                     f"{1000 * (now - t):.0f} ms into the past: it starts on the next one")
            return later
        return t

    def _sync_beats(self) -> float:
        return float(self.cfg.beats_per_bar) if self.cfg.sync_to == "bar" else 1.0

    def snap(self, due: float) -> float:
        if not self.cfg.quantize:
            return due
        now = self.clock.now()
        return self.beat.snap(due, now=now, not_before=now + SNAP_LEAD_S)

    # ------------------------------------------------------------------ main thread

    def housekeeping(self, now: float) -> None:
        dropped = self.engine_dropped
        if dropped != self._dropped_told and now - self._told_at >= 5.0:
            self.log(f"input: the model fell behind a flood of notes; {dropped - self._dropped_told} player "
                     "messages were not played to it")
            self._dropped_told, self._told_at = dropped, now
        for line in (self.inbox.warning(now), self.echo.take_warning(), self._clock_warning(now),
                     self._unanswered_warning()):
            if line:
                self.log(line)
        synced = self.cfg.midi_clock and self.beat.synced(now)
        bpm = self.beat.bpm if synced else 0.0
        if synced and abs(bpm - self.bpm) >= 0.5:
            if self.rec is not None:
                self.rec.tempo(now, bpm)
            self.bpm = bpm
        elif not synced:
            self.bpm = 0.0
        if self.rec is not None and self.rec.error is not None:
            self.log(f"record: recording stopped: {self.rec.error}")
            self.rec.error = None  # reported once; the recorder drains from here on

    def _clock_warning(self, now: float) -> str:
        """Once per silence: the clock says the transport runs, but its ticks stopped coming."""
        s = self.beat.state
        quiet = self.cfg.midi_clock and s.running and math.isfinite(s.last_tick) and now - s.last_tick > QUIET_S
        if quiet and not self._quiet_told:
            self._quiet_told = True
            return (f"clock: the transport runs but no MIDI clock tick has arrived for {now - s.last_tick:.1f} s "
                    "(a stalled JACK graph, or a clock source gone without a Stop): answering in free time "
                    "until ticks come back")
        if not quiet and self._quiet_told and now - s.last_tick <= QUIET_S:
            self._quiet_told = False
            return "clock: MIDI clock ticks are back; the song position is taken from their times"
        return ""

    def _unanswered_warning(self) -> str:
        """Once per reason: notes were heard that antiphon will not answer, and why."""
        if self.inbox.dropped_channel and "channel" not in self._told:  # the inbox drops them
            self._told.add("channel")
            return (f"input: messages on other MIDI channels are not answered: antiphon listens on channel "
                    f"{self.cfg.in_channel} only (--in-channel 0 listens to all)")
        if self.unheard_while_off and "off" not in self._told:
            self._told.add("off")
            return (f"input: notes heard while answering is switched off (CC {self.cfg.cc_enable} below 64): "
                    "no answer until that CC goes to 64 or more")
        if not self.answering_off:
            self._told.discard("off")
            self.unheard_while_off = 0
        return ""

    def close(self) -> None:
        if self.rec is not None:
            path = self.rec.close()
            self.log(f"record: session saved to {path}")

    def stats(self) -> str:
        lat = sorted(self.lateness[:min(self.notes_sent, LATE_RING)])
        if not lat:
            return "stats: no answer notes were sent"
        pick = [lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 for q in (0.5, 0.9, 0.99)]
        return (f"stats: {self.notes_sent} answer notes (the last {len(lat)} here); send lateness median {pick[0]:.2f} ms, p90 {pick[1]:.2f} ms, "
                f"p99 {pick[2]:.2f} ms, max {lat[-1] * 1000:.2f} ms; input dropped {self.inbox.dropped}, "
                f"echoes ignored {self.echo.echoes}")
