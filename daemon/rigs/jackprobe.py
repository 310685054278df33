"""A test musician on a JACK server, for the end-to-end tests and `antiphon bench --live`.

The probe plays into one port and records another. Its two rtmidi clients live in a child
process (`python -m antiphon.daemon.rigs.jackprobe NAME [API]`), driven over a pipe: libjack's client
teardown races with the client's own process thread (RtMidi's JACK input unregisters its port
while that thread may still read it), and a segfault closing a probe once killed a whole test
session. A child that crashes while closing harms nothing. `antiphon demo` plays its keyboard
through a probe too, on JACK or on another MIDI API (`api`).

Times are time.perf_counter (CLOCK_MONOTONIC, one clock for every process on the machine, and
the clock the daemon schedules on), taken in the child when a message is sent or arrives, so
the pipe's latency never enters a measurement.

Pipe protocol, one line each. Parent → child: `s B..` send now and reply; `p B..` send now, no
reply (floods); `P JSON` play [[offset_s, [B..]], ..] on the child's clock and reply with the
send times; `q` close the hearing port (a synth that quits); `o` open it again; `x` exit.
Child → parent: `R` ready; `S T..` send times; `H T B..` a message heard at T.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPLY_TIMEOUT_S = 30.0


class Probe:
    def __init__(self, server: Any, name: str = "probe", api: str = "jack") -> None:
        """`server`: what the ports live on: its `env` for the child, `wait_ports` and `connect`."""
        from antiphon.daemon.rigs.jackserver import orphan_safe

        self.server, self.name = server, name
        self.heard: list[tuple[float, list[int]]] = []
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        # stderr to a file: libjack can say a lot when a server restarts, and a full pipe would block.
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed with the probe
        self.proc = subprocess.Popen(orphan_safe([sys.executable, "-m", "antiphon.daemon.rigs.jackprobe", name, api]),
                                     env=server.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, name=f"probe-{name}", daemon=True)
        self._reader.start()
        self._reply()  # R
        server.wait_ports(self.play_port, self.hear_port)

    def _read(self) -> None:
        heard, replies = self.heard, self._replies
        for line in self.proc.stdout:  # type: ignore[union-attr]
            tag, *rest = line.split()
            if tag == "H":
                heard.append((float(rest[0]), [int(b) for b in rest[1:]]))
            else:
                replies.put([float(x) for x in rest])
        replies.put(None)  # the child is gone

    def _reply(self) -> list[float]:
        try:
            got = self._replies.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            got = None
        if got is None:
            self.proc.kill()
            self._log.seek(0)
            raise RuntimeError(f"JACK probe {self.name} did not answer; it said: {self._log.read()[-2000:]}")
        return got

    def _tell(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]

    @property
    def play_port(self) -> str:
        return f"{self.name}-play:play"

    @property
    def hear_port(self) -> str:
        return f"{self.name}-hear:hear"

    def connect(self, daemon_in: str, daemon_out: str) -> None:
        self.server.connect(self.play_port, daemon_in)
        self.server.connect(daemon_out, self.hear_port)

    def send(self, msg: list[int]) -> float:
        """Send now; returns when it was sent."""
        self._tell("s " + " ".join(map(str, msg)))
        return self._reply()[0]

    def post(self, msg: list[int]) -> None:
        """Send as soon as the child reads it, without waiting (for floods)."""
        self._tell("p " + " ".join(map(str, msg)))

    def play(self, events: list[tuple[float, list[int]]]) -> list[float]:
        """Send (offset seconds, message) pairs on time; returns when each was sent."""
        self._tell("P " + json.dumps([[o, list(m)] for o, m in events]))
        return self._reply()

    def quit_hearing(self) -> None:
        """Close the hearing port, as a synth that quits does."""
        self._tell("q")
        self._reply()

    def hear_again(self) -> None:
        self._tell("o")
        self._reply()
        self.server.wait_ports(self.hear_port)

    def since(self, t: float) -> list[tuple[float, list[int]]]:
        return [(at, m) for at, m in list(self.heard) if at >= t]

    def wait_quiet(self, quiet_s: float, timeout: float) -> None:
        """Wait until nothing has arrived for quiet_s from now on (or timeout)."""
        start = time.perf_counter()
        deadline = start + timeout
        while time.perf_counter() < deadline:
            last = max(self.heard[-1][0] if self.heard else 0.0, start)
            if time.perf_counter() - last >= quiet_s:
                return
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._tell("x")
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        self._log.close()


# --------------------------------------------------------------------------- the child

def _child(name: str, api_name: str = "jack") -> None:
    import rtmidi

    from antiphon.daemon.clock import MonotonicClock
    from antiphon.daemon.ports import resolve_api

    api = resolve_api(api_name)

    now, out_fd = time.perf_counter, sys.stdout.fileno()

    def emit(line: str) -> None:
        os.write(out_fd, (line + "\n").encode())  # one write per line: atomic between threads

    def on_message(event: tuple, _data: Any = None) -> None:
        t = now()
        emit(f"H {t:.7f} " + " ".join(map(str, event[0])))

    def open_hearing() -> Any:
        inp = rtmidi.MidiIn(api, name=f"{name}-hear")
        inp.ignore_types(sysex=True, timing=True, active_sense=True)
        inp.set_callback(on_message)
        inp.open_virtual_port("hear")
        return inp

    out = rtmidi.MidiOut(api, name=f"{name}-play")
    out.open_virtual_port("play")
    inp = open_hearing()
    clock = MonotonicClock()
    send = out.send_message
    emit("R")
    for line in sys.stdin:
        cmd, _, arg = line.rstrip("\n").partition(" ")
        if cmd == "p":
            send([int(b) for b in arg.split()])
        elif cmd == "s":
            t = now()
            send([int(b) for b in arg.split()])
            emit(f"S {t:.7f}")
        elif cmd == "P":
            events = json.loads(arg)
            t0 = clock.now() + 0.01
            sent = []
            for offset, msg in events:
                clock.sleep_until(t0 + offset)
                sent.append(now())
                send(msg)
            emit("S " + " ".join(f"{t:.7f}" for t in sent))
        elif cmd == "q":
            inp.cancel_callback()
            inp.delete()
            inp = None
            emit("S 0")
        elif cmd == "o":
            inp = open_hearing()
            emit("S 0")
        elif cmd == "x":
            break
    # A clean close where libjack allows one; if it crashes here, only this child goes.
    for port in (inp, out):
        if port is not None:
            port.close_port()
            port.delete()
    os._exit(0)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
