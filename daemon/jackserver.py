"""A private, headless JACK server for the end-to-end tests and `antiphon bench --live`.

A named server (`jackd -n NAME`, clients find it through $JACK_DEFAULT_SERVER) keeps runs
apart from each other and from a user's own JACK. The dummy driver needs no sound card; period
64 at 48 kHz (1.3 ms) is the latency floor. On a busy 2-core box the whole JACK graph has been
seen to hang, so every step has a timeout and `ensure()` restarts a server that stopped
answering.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from antiphon.daemon.errors import UserError

STEP_TIMEOUT_S = 10.0


def orphan_safe(argv: list[str], signal: str = "TERM") -> list[str]:
    """argv, wrapped so the child gets `signal` when its parent dies: a crashed test run then leaves
    no jackd (JACK allows only a handful of servers at once) and no orphaned daemon behind.
    (setpriv rather than a preexec_fn: forking a process that runs JACK threads must not run Python.)"""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", signal, "--", *argv] if setpriv else list(argv)


class JackServer:
    def __init__(self, name: str = "", rate: int = 48000, period: int = 64) -> None:
        if shutil.which("jackd") is None:
            raise UserError("jackd is not installed: apt-get install jackd2")
        self.name = name or f"antiphon-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.rate, self.period = rate, period
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"{self.name}.jackd.log"
        self.restarts = 0

    @property
    def env(self) -> dict[str, str]:
        """The environment a client of this server needs (on top of os.environ)."""
        return {**os.environ, "JACK_DEFAULT_SERVER": self.name, "JACK_NO_AUDIO_RESERVATION": "1"}

    def _tool(self, *argv: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), check=False, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> JackServer:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                orphan_safe(["jackd", "-n", self.name, "--no-realtime", "-d", "dummy", "-r", str(self.rate),
                             "-p", str(self.period)]), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ok = self._tool("jack_wait", "-s", self.name, "-w", "-t", str(int(STEP_TIMEOUT_S)),
                            timeout=STEP_TIMEOUT_S + 5).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if not ok or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"jackd did not start; its log:\n{self.log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def ports(self) -> list[str] | None:
        """The server's port names, or None when it does not answer in time (hung or gone)."""
        try:
            res = self._tool("jack_lsp", "-s", self.name, timeout=5.0)
        except subprocess.TimeoutExpired:
            return None
        return res.stdout.split("\n") if res.returncode == 0 else None

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        if self.ports() is None:
            return False
        # A busy box makes the odd late cycle; a hung graph logs a stall every period (1.3 ms).
        before = self._stalls()
        time.sleep(0.2)
        return self._stalls() - before < 20

    def _stalls(self) -> int:
        return self.log_path.read_text(errors="replace").count("was not finished")

    def ensure(self) -> JackServer:
        """A server that answers: this one, or a fresh one in its place."""
        if not self.healthy():
            print(f"jackserver: {self.name} stopped answering; restarting it", file=sys.stderr, flush=True)
            self.stop()
            self.restarts += 1
            self.start()
        return self

    def wait_ports(self, *names: str, timeout: float = STEP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            have = self.ports() or []
            if all(n in have for n in names):
                return
            time.sleep(0.05)
        raise TimeoutError(f"JACK ports {names} did not appear within {timeout} s (have: {self.ports()})")

    def connect(self, src: str, dst: str) -> None:
        res = self._tool("jack_connect", "-s", self.name, src, dst)
        if res.returncode != 0:
            raise RuntimeError(f"jack_connect {src} {dst} failed: {res.stderr.strip()}")

    def __enter__(self) -> JackServer:  # noqa: PYI034 - start() returns self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Probe:
    """A test musician on the same JACK server: plays into one port and records another.

    Arrival times are perf_counter (CLOCK_MONOTONIC), the clock the daemon schedules on, so
    they compare directly with the daemon's own timestamps and traces.
    """

    def __init__(self, server: JackServer, name: str = "probe") -> None:
        import rtmidi

        os.environ.update(JACK_DEFAULT_SERVER=server.name, JACK_NO_AUDIO_RESERVATION="1")
        self.server, self.name = server, name
        self.generation = server.restarts  # a client of a server since restarted must not be closed
        self.out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{name}-play")
        self.out.open_virtual_port("play")
        self.inp = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=f"{name}-hear")
        self.inp.ignore_types(sysex=True, timing=True, active_sense=True)
        self.inp.open_virtual_port("hear")
        self.heard: list[tuple[float, list[int]]] = []
        now, heard = time.perf_counter, self.heard
        self.inp.set_callback(lambda event, _d=None: heard.append((now(), event[0])))
        server.wait_ports(self.play_port, self.hear_port)

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
        t = time.perf_counter()
        self.out.send_message(msg)
        return t

    def play(self, events: list[tuple[float, list[int]]]) -> list[float]:
        """Send (offset seconds, message) pairs on time; returns when each was sent."""
        from antiphon.daemon.clock import MonotonicClock

        clock = MonotonicClock()
        t0 = clock.now() + 0.01
        sent = []
        for offset, msg in events:
            clock.sleep_until(t0 + offset)
            sent.append(self.send(msg))
        return sent

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
        self.inp.cancel_callback()
        if self.server.restarts != self.generation:
            return  # its server is gone: libjack crashes closing such a client, so leave it be
        for port in (self.inp, self.out):
            port.close_port()
            port.delete()
