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
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from antiphon.daemon import codec
from antiphon.daemon.clock import MonotonicClock
from antiphon.daemon.config import JamConfig
from antiphon.daemon.context import is_musical
from antiphon.daemon.errors import UserError

# JACK consumes rtmidi's output ring buffer once per period (1.3 ms at 64/48k): give the
# final note-offs a few periods to leave before the port closes.
FLUSH_S = 0.05
RECONNECT_S = 0.05


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
        put, now = self.sched_q.put, self.clock.now

        def on_midi(event: tuple, _data: Any = None) -> None:
            put(("input", now(), event[0]))  # timestamp and enqueue: all the callback may do

        # Ports first: a wrong port name fails in milliseconds, before the model loads. Input that
        # arrives before the threads start waits in the queue with its true timestamp.
        self.midi_out, self.out_name = ports.open_output(cfg.api, cfg.client_name, cfg.out_port)
        try:
            self.midi_in, self.in_name = ports.open_input(cfg.api, cfg.client_name, cfg.in_port, on_midi)
            self._build(cfg, log)
        except BaseException:
            for port in (getattr(self, "midi_in", None), self.midi_out):
                if port is not None:
                    ports.release(port)
            raise

    def _build(self, cfg: JamConfig, log: Callable[[str], None]) -> None:
        from antiphon.daemon import ports
        from antiphon.daemon.context import Conversation
        from antiphon.daemon.engine import Engine
        from antiphon.daemon.sampling import Sampler, grammar_mask
        from antiphon.daemon.scheduler import Scheduler

        self.watch = ports.OutputWatch(self.midi_out, self.out_name if cfg.out_port else "")
        self.trace_file = open(cfg.trace, "w", buffering=1 << 16) if cfg.trace else None  # noqa: SIM115
        self.scheduler = Scheduler(self.midi_out.send_message, self.clock, cfg.late_drop_ms,
                                   cfg.out_channel - 1, log, self._trace if self.trace_file else None)
        # The engine (ORT session, first prefill) is built before any real-time thread starts.
        engine = Engine(cfg.model or None, threads=cfg.threads, log=lambda s: None)
        self.model_desc = f"{engine.model_path} (context {engine.context})"
        self.conv = Conversation(engine, Sampler(cfg.seed, cfg.temperature, cfg.top_p), grammar_mask, cfg,
                                 self._submit, self._cancel, log)
        self._warm_up(engine)

    def _warm_up(self, engine: Any) -> None:
        """First ORT runs allocate: do them now, not on the first note."""
        length = engine.length
        for tok in range(3, 8):
            engine.decode(tok)
        engine.rollback(length)

    # ------------------------------------------------------------------ queue plumbing

    def _trace(self, due: float, sent: float, msg: list[int]) -> None:
        self.trace_file.write(f"{due:.6f} {sent:.6f} {msg[0]} {msg[1]} {msg[2]}\n")

    def _submit(self, gen: int, items: list) -> None:
        self.sched_q.put(("submit", gen, items))

    def _cancel(self, gen: int) -> None:
        self.sched_q.put(("cancel", gen, self._heard))

    def _heard(self, result: tuple[int, int]) -> None:
        self.engine_q.put(("heard", result[0], result[1]))

    def _route(self, cmd: tuple) -> None:
        """Scheduler thread: a player message. A struck key silences the answer right here."""
        _, t, msg = cmd
        if not listens_to(msg, self.cfg.in_channel):
            return
        kind = msg[0] & 0xF0
        struck = kind == codec.NOTE_ON_STATUS and msg[2] > 0
        # A DAW sends all-notes-off / all-sound-off when its transport stops: antiphon stops too.
        silenced = kind == codec.CC_STATUS and msg[1] in (codec.CC_ALL_NOTES_OFF, codec.CC_ALL_SOUND_OFF)
        if (struck or silenced) and self.scheduler.active():
            self.scheduler.stop()
        self.engine_q.put(("midi", t, msg))

    def _on_idle(self) -> None:
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
                item = q.get_nowait() if conv.wants_work() else q.get(timeout=0.1)
            except queue.Empty:
                conv.step()
                continue
            if item[0] == "midi":
                conv.on_midi(item[1], item[2])
            else:
                conv.on_heard(item[1], item[2])

    def _scheduler_loop(self) -> None:
        raise_priority()
        self.scheduler.serve(self.sched_q, self._route, self._on_idle)

    def run(self) -> int:
        threads = [threading.Thread(target=self._guard(self._scheduler_loop, "scheduler"), name="scheduler"),
                   threading.Thread(target=self._guard(self._engine_loop, "engine"), name="engine")]
        for th in threads:
            th.daemon = True
            th.start()
        try:
            while not self.stopping.wait(0.2):
                pass
        finally:
            self.stopping.set()
            self.sched_q.put(("quit",))  # the scheduler panics on its way out
            for th in threads:
                th.join(timeout=5.0)
            if threads[0].is_alive():  # wedged: silence the synth from here rather than not at all
                self.scheduler.panic()
            self.close()
        return 1 if self.error is not None else 0

    def close(self) -> None:
        from antiphon.daemon.ports import release

        time.sleep(FLUSH_S)
        release(self.midi_in)
        release(self.midi_out)
        if self.trace_file is not None:
            self.trace_file.close()


def main(args: Any) -> int:
    from antiphon.daemon.cli import configs

    cfg: JamConfig = configs(args, JamConfig)[0]
    check_config(cfg)
    # The rtmidi callback runs on JACK's real-time thread and must take the GIL: hand it over often.
    sys.setswitchinterval(0.0005)
    log = (lambda s: None) if cfg.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if cfg.record:
        log("jam: --record is accepted but not wired into jam yet; nothing will be written")
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
    return jam.run()
