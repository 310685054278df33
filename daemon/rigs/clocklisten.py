"""What a MIDI clock source really played, for the clock rig (clocksession.py): a listener child
on the source's output, and the source's song positions and beat times counted from what it heard.

`python -m antiphon.daemon.rigs.clocklisten NAME [DROP...]` is the listener/relay child: port
NAME:in, stamps every message on JACK's time (rtmidi's deltas) mapped to perf_counter, prints
`H t b..`; with DROP numbers it also forwards to NAME-out:out, dropping those ticks (1-based).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from antiphon.daemon.midiclock import LOST_EARLY
from antiphon.daemon.rigs.jackserver import JackServer, orphan_safe

BPM = 100.0
PPQN = 24


class Tap:
    """A listener (and, with drops, a relay) child: what a clock source's ticks look like at a client."""

    def __init__(self, jack: JackServer, name: str, drops: tuple[int, ...] | None = None) -> None:
        self.name, self.heard, self.said = name, [], ""
        argv = [sys.executable, "-m", "antiphon.daemon.rigs.clocklisten", name]
        if drops is not None:
            argv += [str(d) for d in drops] or ["0"]
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed with the tap
        self.proc = subprocess.Popen(orphan_safe(argv), env=jack.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        if not ready or self.proc.stdout.readline().strip() != "R":  # type: ignore[union-attr]
            self.proc.kill()
            self.proc.wait(5)
            self._log.seek(0)
            raise RuntimeError(f"clock tap {name} did not start: {self._log.read()[-1000:]!r}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        jack.wait_ports(self.in_port, *([self.out_port] if drops is not None else []))

    in_port = property(lambda self: f"{self.name}:in")
    out_port = property(lambda self: f"{self.name}-out:out")

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            tag, t, *data = line.split()
            if tag == "H":
                self.heard.append((float(t), [int(b) for b in data]))

    def close(self) -> None:
        """Ends the child; what it said on stderr stays in `said` (a relay that fell silent)."""
        died = self.proc.poll()
        if died is not None:
            self.said = f"(the tap had exited with {died}) "
        else:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._log.seek(0)
        self.said += self._log.read()[-2000:]
        self._log.close()


def _tap_child(name: str, drops: list[int] | None) -> None:
    import rtmidi

    now, out_fd = time.perf_counter, sys.stdout.fileno()
    jack_t, offsets = [0.0], []
    ticks = [0]
    drop = set(drops or ())
    out = None
    if drops is not None:
        out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{name}-out")
        out.open_virtual_port("out")

    def on_message(event: tuple, _data: Any = None) -> None:
        t = now()
        msg, delta = event
        jack_t[0] += delta
        offsets.append(t - jack_t[0])
        if len(offsets) > 32:
            offsets.pop(0)
        if msg[0] == 0xF8:
            ticks[0] += 1
            if ticks[0] in drop:
                return
        if out is not None:
            out.send_message(msg)
        os.write(out_fd, (f"H {jack_t[0] + min(offsets):.7f} " + " ".join(map(str, msg)) + "\n").encode())

    inp = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=name)
    inp.ignore_types(sysex=True, timing=False, active_sense=True)
    inp.set_callback(on_message)
    inp.open_virtual_port("in")
    os.write(out_fd, b"R\n")
    sys.stdin.read()  # until the parent closes the pipe
    for port in (inp, out):
        if port is not None:
            port.close_port()
            port.delete()
    os._exit(0)


@dataclass
class TickRun:
    """Ticks heard without a transport message between them: `first` is the song position of the
    run's tick 0 (None: the listener lost the message that says where the run starts)."""

    first: int | None
    idx: np.ndarray  # each heard tick's index in the run (gaps: ticks the listener lost)
    t: np.ndarray  # when the listener heard it

    def covers(self, t: float) -> bool:
        """Time t falls in this run: from a beat before its first tick to four after its last."""
        p = self.period
        return self.t[0] - PPQN * p <= t <= self.t[-1] + 4 * PPQN * p

    @cached_property
    def period(self) -> float:
        return float(np.polyfit(self.idx, self.t, 1)[0]) if len(self.t) > 2 else 60.0 / (PPQN * BPM)

    def local_line(self, index: float) -> tuple[float, float]:
        """(period, time of index 0) fitted to the PPQN ticks nearest `index`: the source's clock
        need not keep one rate for the whole run (JACK's dummy driver without real-time scheduling
        runs 1-2 % slow, and unevenly)."""
        near = np.argsort(np.abs(self.idx - index))[:PPQN]
        if len(near) < 3:
            return self.period, float(self.t[0] - self.idx[0] * self.period)
        period, t0 = np.polyfit(self.idx[near], self.t[near], 1)
        return float(period), float(t0)

    def time_of(self, index: float) -> float:
        """When the source played the run's tick `index`, by the local line there."""
        period, t0 = self.local_line(index)
        return t0 + index * period


@dataclass
class SourceBeats:
    """Song position → time, as the clock source placed it: its ticks counted, run by run."""

    runs: list[TickRun] = field(default_factory=list)
    ticks: int = 0  # ticks the listener heard
    missing: int = 0  # ticks the count says the listener did not hear
    unplaced: int = 0  # runs after a Stop with no Start/Continue heard: the listener lost it

    @classmethod
    def from_heard(cls, heard: list[tuple[float, list[int]]], bpm: float = BPM) -> SourceBeats:
        """Ticks are counted, not placed on a nominal grid: the source's clock may run slower or faster
        than the listener's (by 1.3 % on a non-real-time dummy driver: a grid at the nominal tempo
        gains a tick every 3 s). An interval of k median periods, or a quarter period short of
        it, is k ticks (k - 1 lost): a stall only delays (midiclock.LOST_EARLY). The song position
        starts at 0 after Start and where the transport stopped after Continue."""
        p0 = 60.0 / (PPQN * bpm)
        out = cls()
        pos: int | None = 0  # the song position the next tick has; None: unknown
        run: list[float] = []
        began: tuple[float, int] | None = None  # the transport message in front of the run
        stopped = False

        def close_run() -> None:
            nonlocal pos
            if not run:
                return
            t = np.asarray(run)
            iv = np.diff(t)
            steady = iv[(iv > 0.5 * p0) & (iv < 1.5 * p0)]
            p = float(np.median(steady)) if len(steady) else p0
            idx = np.concatenate([[0], np.cumsum(np.maximum(1, np.floor(iv / p + LOST_EARLY)))]).astype(int)
            first = pos
            if began is not None and first is not None:
                # jack_midi_clock sends a Start, and tick 0 when the transport rolls: one cycle later,
                # or (JACK without real-time scheduling) up to half a period later. A Continue comes
                # with the roll, its first tick one period after. Later than that: ticks lost.
                late = int(np.floor((t[0] - began[0]) / p + 0.25)) - (1 if began[1] == 0xFB else 0)
                first += max(0, late)
            out.runs.append(TickRun(first, idx, t))
            out.ticks += len(t)
            out.missing += int(idx[-1]) + 1 - len(t)
            pos = None if first is None else first + int(idx[-1]) + 1

        for t, m in heard:
            if m[0] == 0xF8:
                if not run and began is None and stopped:
                    out.unplaced += 1
                    pos = None
                run.append(t)
            elif m[0] in (0xFA, 0xFB, 0xFC):
                close_run()
                run = []
                if m[0] == 0xFA:
                    pos = 0
                stopped = m[0] == 0xFC
                began = (t, m[0]) if m[0] != 0xFC else None
        close_run()
        return out

    def describe(self) -> str:
        """The runs as (song position of the first tick, last index, period ms), for a report."""
        return str([(r.first, int(r.idx[-1]), round(1000 * r.period, 3)) for r in self.runs])

    def run_at(self, t: float) -> TickRun | None:
        """The run of ticks playing at time t (song positions repeat after a Start: time decides):
        the one whose ticks span t, else the latest that covers it. A run covers a beat before its
        first tick, so near a Stop the next run covers t too, while the stopped one still played it."""
        spanning = (run for run in reversed(self.runs) if run.t[0] - run.period / 2 <= t <= run.t[-1] + run.period / 2)
        return next(spanning, None) or next((run for run in reversed(self.runs) if run.covers(t)), None)

    def beat_at(self, t: float) -> float | None:
        run = self.run_at(t)
        if run is None or run.first is None:
            return None
        period, t0 = run.local_line(run.idx[np.argmin(np.abs(run.t - t))])
        return (run.first + (t - t0) / period) / PPQN

    def time_of(self, beat: float, near: float) -> float | None:
        """When the source played song position `beat` in the run playing at time `near`."""
        run = self.run_at(near)
        if run is None or run.first is None:
            return None
        return run.time_of(beat * PPQN - run.first)


if __name__ == "__main__":
    _tap_child(sys.argv[1], [int(x) for x in sys.argv[2:]] if len(sys.argv) > 2 else None)
