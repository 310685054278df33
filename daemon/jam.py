"""`antiphon jam`: the threads, the queues between them, start-up and a silent shutdown.

    rtmidi callback ──("input", t, msg)──▶ scheduler thread ──("midi" | "heard")──▶ engine thread
        (timestamp, enqueue; nothing else)   owns the output port,      owns the model (Conversation)
                                             stops an answer the moment  │
                                             a key is struck             │
                       ◀──────────("submit" | "cancel")──────────────────┘

Input passes through the scheduler thread so that a barge-in silences the answer within one
scheduler wake-up, whatever the engine is doing (a decode, or a slide's long prefill), and so
the engine always learns how much of its answer was heard *before* it sees the player's note.
Queues are SimpleQueues: no locks of ours on the hot path. Every way out (signal, exception in
any thread) ends in the scheduler's panic, before the ports close.

What the DAW adds (MIDI clock, live CCs, echo of our own output, recording, a bounded inbox) is
glued in by studio.py: which thread calls which of those modules, in which order. The main
thread only waits, logs warnings and draws the status line (status.py).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from antiphon.daemon.clock import MonotonicClock
from antiphon.daemon.config import JamConfig
from antiphon.daemon.context import is_musical
from antiphon.daemon.errors import UserError

# JACK consumes rtmidi's output ring buffer once per period (1.3 ms at 64/48k): give the
# final note-offs a few periods to leave before the port closes.
FLUSH_S = 0.05
RECONNECT_S = 0.05
# Idle wake-ups, each a few tens of microseconds of Python. The engine wakes only to see whether a
# key has been held past --max-note-s (seconds); input and answers wake it at once through its
# queue. The main thread redraws the status line when it changed, and reads the kernel's socket
# table (as long as a desktop has sockets) only once a second: a dead JACK server is noticed in time.
ENGINE_IDLE_S = 0.5
MAIN_TICK_S = 0.2
JACK_WATCH_S = 1.0


# --trace: the lines of clock input, beside the sent messages (what the follower was given, so
# a session's song positions can be replayed and checked against the source's, tick by tick).
CLOCK_LINE = "clock"


def read_trace_beats(path: str | Path) -> list[tuple[float, float, list[int], float | None]]:
    """A --trace file's sent messages (written by Jam._trace): (due, sent, the 3 message bytes, the
    song position in beats its due time had on the MIDI clock when sent, None in free time)."""
    rows = (line.split() for line in Path(path).read_text().splitlines() if not line.startswith(CLOCK_LINE))
    return [(float(due), float(sent), [int(a), int(b), int(c)], None if beats == "-" else float(beats))
            for due, sent, a, b, c, beats in rows]


def read_trace_clock(path: str | Path) -> list[tuple[float, list[int], tuple[int, float] | None]]:
    """A --trace file's clock input (written by Jam._trace_clock): (the MIDI system's time of the
    message on the daemon's clock, its bytes, and what the follower believed after it: the song
    position in ticks of the latest counted tick and that tick's time on the tempo line; None
    while not locked). Fed to a fresh ClockFollower in order, they replay the session's follower."""
    rows = (line.split() for line in Path(path).read_text().splitlines() if line.startswith(CLOCK_LINE))
    return [(float(t), [int(b) for b in msg], None if tick == "-" else (int(tick), float(at)))
            for _, t, tick, at, *msg in rows]


def read_trace(path: str | Path) -> list[tuple[float, float, list[int]]]:
    """A --trace file: (due, sent, message bytes) per line."""
    return [(due, sent, msg) for due, sent, msg, _ in read_trace_beats(path)]


def check_config(cfg: JamConfig) -> None:
    problems = []
    if not 0 <= cfg.in_channel <= 16:
        problems.append(f"--in-channel {cfg.in_channel} is not 0 (all) or 1-16")
    if not 1 <= cfg.out_channel <= 16:
        problems.append(f"--out-channel {cfg.out_channel} is not 1-16")
    if cfg.wait_ms < 0:
        problems.append("--wait-ms must be >= 0")
    if not 0.0 < cfg.top_p <= 1.0:
        problems.append("--top-p must be in (0, 1]")
    if cfg.temperature < 0:
        problems.append("--temperature must be >= 0")
    if not 0 < cfg.answer_min_s <= cfg.answer_max_s:
        problems.append("need 0 < --answer-min-s <= --answer-max-s")
    if cfg.sync_to not in ("beat", "bar"):
        problems.append(f"--sync-to {cfg.sync_to!r}: use beat or bar")
    if problems:
        raise UserError("; ".join(problems))


def raise_priority() -> bool:
    """Best effort: ask the OS to run the calling (scheduler) thread ahead of ordinary work.

    A nice value, not SCHED_FIFO: a real-time thread that spins, or waits for the GIL held by an
    ordinary thread, could starve the very thread it waits for. Needs CAP_SYS_NICE or an
    RLIMIT_NICE allowance (the `audio` group usually has one); without, nothing changes."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        return True
    except (OSError, AttributeError):
        return False


def listens_to(msg: list[int], in_channel: int) -> bool:
    """Notes, sustain and all-notes-off on the chosen channel (or any, when 0)."""
    return is_musical(msg) and (in_channel == 0 or (msg[0] & 0x0F) == in_channel - 1)


class Jam:
    """One running session: ports, engine, the two threads."""

    def __init__(self, cfg: JamConfig, log: Callable[[str], None], stopping: threading.Event | None = None) -> None:
        from antiphon.daemon import ports

        self.cfg, self.log, self.clock = cfg, log, MonotonicClock()
        self.sched_q: queue.SimpleQueue = queue.SimpleQueue()
        self.engine_q: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = stopping or threading.Event()
        self.error: BaseException | None = None
        self.server_gone = False  # the JACK server died: its clients must not be closed
        from antiphon.daemon.studio import Studio

        # Before the ports: a recovered recording is reported, and the callback needs the inbox.
        self.studio = Studio(cfg, self.clock, log)
        on_midi = self.studio.callback(self.sched_q.put)  # timestamp, admit, enqueue: all it may do

        advice = ports.jack_advice(cfg.api)
        if advice:
            print(f"antiphon: {advice}", file=sys.stderr, flush=True)  # even with --quiet: it may never work
        # Ports first: a wrong port name fails in milliseconds, before the model loads. Input that
        # arrives before the threads start waits in the queue with its true timestamp.
        self.midi_out, self.out_name = ports.open_output(cfg.api, cfg.client_name, cfg.out_port)
        try:
            self.midi_in, self.in_name = ports.open_input(cfg.api, cfg.client_name, cfg.in_port, on_midi,
                                                          clock=cfg.midi_clock)
            self._build(cfg, log)
        except BaseException:
            self.studio.close()
            for port in (getattr(self, "midi_in", None), self.midi_out):
                if port is not None:
                    ports.release(port)
            raise

    def _build(self, cfg: JamConfig, log: Callable[[str], None]) -> None:
        from antiphon.daemon import ports
        from antiphon.daemon.config import Steers
        from antiphon.daemon.context import Conversation
        from antiphon.daemon.engine import Engine
        from antiphon.daemon.sampling import grammar_mask, jam_sampler
        from antiphon.daemon.scheduler import Scheduler

        self.was_active = False  # the scheduler's, last idle wake-up: an answer's end is a durable point
        self.watch = ports.OutputWatch(self.midi_out, self.out_name if cfg.out_port else "")
        self.trace_file = open(cfg.trace, "w", buffering=1 << 16) if cfg.trace else None  # noqa: SIM115
        studio = self.studio
        if self.trace_file is not None:
            studio.trace_clock = self._trace_clock
        self.scheduler = Scheduler(studio.send(self.midi_out.send_message), self.clock, cfg.late_drop_ms,
                                   cfg.out_channel - 1, log, self._trace)
        studio.scheduler, studio.to_engine = self.scheduler, self.engine_q.put
        self.scheduler.retimer = studio.on_the_beat
        # The engine (ORT session, first prefill) is built before any real-time thread starts.
        engine = Engine(cfg.model or None, threads=cfg.threads, log=lambda s: None)
        self.model_desc = f"{engine.model_path} (context {engine.context})"
        self.conv = Conversation(engine, jam_sampler(cfg.seed, Steers.of(cfg)), grammar_mask, cfg,
                                 self._submit, self._cancel, log,
                                 align=studio.align, snap=studio.snap)
        self._warm_up(engine)

    def _warm_up(self, engine: Any) -> None:
        """First ORT runs allocate: do them now, not on the first note."""
        length = engine.length
        for tok in range(3, 8):
            engine.decode(tok)
        engine.rollback(length)

    # ------------------------------------------------------------------ queue plumbing

    def _trace(self, due: float, sent: float, msg: list[int]) -> None:
        beats = self.studio.on_sent(due, sent, msg)
        if self.trace_file is not None:
            at = "-" if beats is None else f"{beats:.4f}"
            self.trace_file.write(f"{due:.6f} {sent:.6f} {msg[0]} {msg[1]} {msg[2]} {at}\n")

    def _trace_clock(self, t: float, msg: list[int], state: Any) -> None:
        """Studio.trace_clock, installed only with --trace."""
        at = f"{state.anchor_tick} {state.anchor_time:.9f}" if state.locked else "- -"
        self.trace_file.write(f"{CLOCK_LINE} {t:.9f} {at} {' '.join(map(str, msg))}\n")

    def _submit(self, gen: int, items: list, start: float | None = None) -> None:
        self.sched_q.put(("submit", gen, items, start))

    def _cancel(self, gen: int) -> None:
        self.sched_q.put(("cancel", gen, self._heard))

    def _heard(self, result: tuple[int, int]) -> None:
        self.engine_q.put(("heard", result[0], result[1]))

    def _route(self, cmd: tuple) -> None:
        """Scheduler thread: a player message (see Studio.route; a struck key silences the answer there)."""
        self.studio.route(cmd)

    def _on_idle(self) -> None:
        active = self.scheduler.active()
        if self.was_active and not active:
            self.studio.phrase_end(self.clock.now())  # an answer finished sounding: a durable point
        self.was_active = active
        if self.watch.check():
            self.log(f"output {self.out_name} is back: sending note-offs")
            # JACK makes a new connection live a few cycles later; what is sent before is lost.
            time.sleep(RECONNECT_S)
            self.scheduler.panic()

    # ------------------------------------------------------------------ threads

    def _guard(self, body: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as e:  # noqa: BLE001 - any thread's failure ends the session, silently for the synth
                self.error = e
                self.log(f"{name} thread failed:\n{traceback.format_exc()}")
            finally:
                self.stopping.set()
        return run

    def _engine_loop(self) -> None:
        conv, q = self.conv, self.engine_q
        while not self.stopping.is_set():
            try:
                item = q.get_nowait() if conv.wants_work() else q.get(timeout=ENGINE_IDLE_S)
            except queue.Empty:
                conv.step()
                if not conv.wants_work():
                    conv.check_held(self.clock.now())  # every ENGINE_IDLE_S, when idle
                continue
            if item[0] == "midi":
                self.studio.engine_taken += 1
                conv.on_midi(item[1], item[2])
            elif item[0] == "control":
                self.studio.engine_taken += 1
                self.studio.apply(conv, item[1])
            else:
                conv.on_heard(item[1], item[2])
            self.studio.held = len(conv.backlog)

    def _scheduler_loop(self) -> None:
        raise_priority()
        self.scheduler.serve(self.sched_q, self._route, self._on_idle)

    def run(self) -> int:
        threads = [threading.Thread(target=self._guard(self._scheduler_loop, "scheduler"), name="scheduler"),
                   threading.Thread(target=self._guard(self._engine_loop, "engine"), name="engine")]
        for th in threads:
            th.daemon = True
            th.start()
        from antiphon.daemon.status import StatusLine

        status = StatusLine(enabled=not self.cfg.quiet)
        watch = self._jack_watch()
        next_watch = 0.0
        try:
            while not self.stopping.wait(MAIN_TICK_S):
                now = self.clock.now()
                self.studio.housekeeping(now)
                status.show(self.studio, self.conv, self.scheduler.active(), now)
                if watch is not None and now >= next_watch:
                    next_watch = now + JACK_WATCH_S
                    if watch.alive():
                        continue
                    self.server_gone = True
                    self.error = UserError(f"the JACK server '{watch.server}' stopped: antiphon can neither hear nor "
                                           "play. Start JACK again, then `antiphon jam`")
                    print(f"antiphon: {self.error}", file=sys.stderr, flush=True)  # even with --quiet
                    break
        finally:
            status.stop()
            self.stopping.set()
            self.sched_q.put(("quit",))  # the scheduler panics on its way out
            for th in threads:
                th.join(timeout=5.0)
            if threads[0].is_alive():  # wedged: silence the synth from here rather than not at all
                self.scheduler.panic()
            self.close()
        return 1 if self.error is not None else 0

    def _jack_watch(self) -> Any:
        import rtmidi

        from antiphon.daemon.jackwatch import JackWatch

        if self.midi_in.get_current_api() != rtmidi.API_UNIX_JACK:
            return None
        watch = JackWatch()
        return watch if watch.active else None

    def close(self) -> None:
        from antiphon.daemon.ports import release

        # The threads are done: every sent message is in the recorder's queue. Files first, ports
        # last: libjack's client teardown can crash the process (a race in RtMidi's JACK input),
        # and then nothing after it would run.
        self.studio.close()
        if self.cfg.stats:
            print(self.studio.stats(), file=sys.stderr, flush=True)
        if self.trace_file is not None:
            self.trace_file.close()
        if self.server_gone:
            return  # libjack crashes closing a client of a dead server; the process exit frees it
        time.sleep(FLUSH_S)
        release(self.midi_in)
        release(self.midi_out)


def main(args: Any) -> int:
    from antiphon.daemon.cli import configs

    cfg: JamConfig = configs(args, JamConfig)[0]
    check_config(cfg)
    # The rtmidi callback runs on JACK's real-time thread and must take the GIL: hand it over often.
    sys.setswitchinterval(0.0005)
    log = (lambda s: None) if cfg.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    stopping = threading.Event()

    def stop(_signum: int, _frame: Any) -> None:
        stopping.set()

    # Installed before any port opens: a signal during start-up must still close the JACK
    # clients properly (one killed mid-cycle can stall the whole JACK graph).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    jam = Jam(cfg, log, stopping)
    if not cfg.quiet:
        print(f"antiphon: listening on {jam.in_name}, answering on {jam.out_name} (channel {cfg.out_channel}); "
              f"model {jam.model_desc}; phrase ends after {cfg.wait_ms} ms", flush=True)
    rc = jam.run()
    if jam.server_gone:
        # Python's exit would close the rtmidi clients of the dead server (and crash in libjack).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
