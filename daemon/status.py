"""The live status line of `antiphon jam`: one line, redrawn in place, on a terminal only.

listening / answering / off, the MIDI clock tempo when synced, the latest answer note's send
lateness, the temperature. Looked at by the main thread every 0.2 s and redrawn when it changed
(rich, without its refresh thread); logs still print above it. Off with --quiet, and when stderr is not a TTY (a DAW's
launcher, a log file, the tests) so nothing but the log lines is written there.
"""

from __future__ import annotations

import sys
from typing import Any


class StatusLine:
    def __init__(self, enabled: bool = True) -> None:
        self.live: Any = None
        self.shown = ""
        if not enabled or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.live import Live

        self.live = Live("", console=Console(stderr=True), auto_refresh=False, transient=True)
        self.live.start()

    def show(self, studio: Any, conv: Any, answering: bool, now: float) -> None:
        if self.live is None:
            return
        text = self.text(studio, conv, answering, now)
        if text != self.shown:  # a redraw costs rich ~1 ms: an idle jam left on all day must not pay it 5 times a second
            self.shown = text
            self.live.update(text, refresh=True)

    @staticmethod
    def text(studio: Any, conv: Any, answering: bool, now: float) -> str:
        state = "[yellow]off[/]" if not conv.enabled else "[green]answering[/]" if answering else "listening"
        synced = studio.cfg.midi_clock and studio.beat.synced(now)
        tempo = f"synced {studio.beat.bpm:.1f} bpm" if synced else "free time"
        last = studio.last_lateness()
        late = "-" if last is None else f"{last * 1000:.2f} ms"
        return f"antiphon: {state} | {tempo} | last note late {late} | temperature {conv.sampler.temperature:.2f}"

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
