"""A listener that stamps every MIDI event with the JACK frame it was written at: the clock rig's
exact truth.

`clocklisten.Tap` stamps with rtmidi's delta times: when the listener's process cycle ran, so a
stalled graph hands it ticks late and bunched, and its count has to guess which tick is which.
JACK itself keeps each event's frame offset within the cycle through every connection, and
`jack_midi_clock` writes tick k of a roll at frame start + k * interval (1,200 frames at 100 bpm
and 48 kHz), so stamped by frame, the ticks that arrive are exactly on their grid and a lost one
leaves an exact gap. This child uses JACK-Client (the JACK C API through cffi), not rtmidi, so
it shares none of the code it checks.

`python -m antiphon.daemon.rigs.frametap NAME`: port NAME:in; prints `R` when ready, then `H t b..`
per event, t the event's frame over the sample rate (seconds on JACK's frame clock, which is
not the wall clock: a dummy driver without real-time scheduling runs 1-2 % slow), and every
SYNC_S `S t p`: JACK's current frame as such a time beside perf_counter, to find a tapped event
among what other clients heard (`Tap.on_perf_counter`).
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

SYNC_S = 0.25


def _tap_child(name: str) -> None:
    import jack

    client = jack.Client(name, no_start_server=True)
    port = client.midi_inports.register("in")
    rate = float(client.samplerate)
    heard: collections.deque = collections.deque()  # appended by JACK's thread, emptied by the writer

    last, repeats = [(-1, b"")], [0]

    @client.set_process_callback
    def process(frames: int) -> None:
        base = client.last_frame_time
        for offset, data in port.incoming_midi_events():
            event = (base + offset, bytes(data))
            if event == last[0]:
                # The same message at the same frame again (seen under load: one clock tick twice,
                # which a count takes for two): a message has one frame, so it is heard once.
                repeats[0] += 1
                continue
            last[0] = event
            heard.append(event)

    done = threading.Event()
    out_fd = sys.stdout.fileno()

    def write() -> None:
        synced = 0.0
        while not done.wait(0.01) or heard:
            lines = []
            if time.perf_counter() - synced >= SYNC_S:
                before = time.perf_counter()
                frame = client.frame_time
                synced = time.perf_counter()
                if synced - before < 0.0005:  # not preempted in between: a busy box has taken tens of ms
                    lines.append(f"S {frame / rate:.7f} {(before + synced) / 2:.7f}\n")
            while heard:
                frame, data = heard.popleft()
                lines.append(f"H {frame / rate:.7f} " + " ".join(map(str, data)) + "\n")
            if lines:
                os.write(out_fd, "".join(lines).encode())

    client.activate()
    os.write(out_fd, b"R\n")  # first: the parent reads it as the first line
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    sys.stdin.read()  # until the parent closes the pipe
    client.deactivate()
    done.set()
    writer.join(2)
    if repeats[0]:
        print(f"{name}: {repeats[0]} messages came twice at the same frame", file=sys.stderr)
    client.close()
    os._exit(0)


if __name__ == "__main__":
    _tap_child(sys.argv[1])
