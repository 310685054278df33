"""The clock rig's exact truth: Debian's `jack_midi_dump -a` (jackd2), which prints every MIDI
event with the JACK frame it was written at.

The wall-time listener (clocklisten.py) stamps when its process cycle ran, so after a stall it
has to guess which tick is which. JACK keeps each event's frame offset through every connection,
and `jack_midi_clock` writes tick k of a roll at frame start + k * 1,200 (100 bpm, 48 kHz): by
frame, the ticks that arrive lie exactly on the source's grid, and a lost one leaves an exact
gap. jack_midi_dump is a C client written by neither us nor rtmidi, and costs the graph almost
nothing (a Python client called every 1.3 ms cycle overloaded a graph without real-time
scheduling under two CPU hogs).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile

import numpy as np

from antiphon.daemon.rigs.clocklisten import BPM, PPQN, TickRun
from antiphon.daemon.rigs.jackserver import JackServer, orphan_safe, terminate

LINE = re.compile(r"^\s*(\d+):((?:\s+[0-9a-fA-F]{2})+)(?:\s|$)")  # then, for channel messages, words


def parse(text: str, rate: float) -> list[tuple[float, list[int]]]:
    """jack_midi_dump -a's lines as (frame / rate, bytes). A message repeated at the same frame is
    kept once (seen under load: one clock tick twice, which a count takes for two)."""
    out, last = [], None
    for line in text.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        event = (int(m[1]), [int(b, 16) for b in m[2].split()])
        if event != last:
            out.append((event[0] / rate, event[1]))
        last = event
    return out


class FrameDump:
    """One jack_midi_dump client; `heard` fills at close."""

    def __init__(self, jack: JackServer, name: str, rate: float = 48000.0) -> None:
        self.name, self.rate, self.heard = name, rate, []
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed with the dump
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []  # SIGTERM must lose no line
        self.proc = subprocess.Popen(orphan_safe([*line_buffered, "jack_midi_dump", "-a", name]), env=jack.env,
                                     stdout=self._out, stderr=subprocess.STDOUT, text=True)
        jack.wait_ports(self.in_port)

    in_port = property(lambda self: f"{self.name}:input")

    def close(self) -> None:
        terminate(self.proc, grace_s=5.0)
        self._out.seek(0)
        self.heard = parse(self._out.read(), self.rate)
        self._out.close()


def off_grid(runs: list[TickRun], rate: float = 48000.0, until: float = math.inf) -> int:
    """Tick intervals, by frame, that are not a whole number of the source's periods (1,200 frames
    at 100 bpm), among the ticks heard up to `until`. A client that runs a cycle late reads the
    next cycle's events as its own: whole cycles off the grid, and from there its count is a
    guess, as the wall-time listener's is (docs/clock.md)."""
    period = rate * 60.0 / (BPM * PPQN)
    iv = np.concatenate([np.diff(r.t[r.t <= until]) * rate for r in runs]) if runs else np.zeros(0)
    return int(np.sum(np.abs(iv / period - np.round(iv / period)) * period > 1.5))


def answer_onsets(note_ons: list[tuple[float, list[int]]], gap_s: float = 1.0) -> list[tuple[float, list[int]]]:
    """The first note-on of each answer: the rig's answers are over 1 s apart, their notes not."""
    return [(t, m) for i, (t, m) in enumerate(note_ons) if i == 0 or t - note_ons[i - 1][0] > gap_s]
