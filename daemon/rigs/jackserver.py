"""A private, headless JACK server for the end-to-end tests and `antiphon bench --live`.

A named server (`jackd -n NAME`, clients find it through $JACK_DEFAULT_SERVER) keeps runs
apart from each other and from a user's own JACK. The dummy driver needs no sound card; period
64 at 48 kHz (1.3 ms) is the latency floor. On a busy 2-core box the whole JACK graph has been
seen to hang, so every step has a timeout and `ensure()` restarts a server that stopped
answering.
"""

from __future__ import annotations

import os
import select
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


def terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after grace_s: a daemon first closes its JACK clients and writes its files."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def start_jam(jack: JackServer, client: str, args: list[str], timeout_s: float = 30.0) -> subprocess.Popen:
    """`antiphon jam --client-name client *args` on `jack`, once it is ready: its ports exist and it
    has said it is listening (the model is loaded: a phrase played before then would be answered
    too late). Its stderr goes to a file (`jam_log`), so what it says can be read while it runs.
    RuntimeError, with what it said, when it does not start within `timeout_s`."""
    argv = [sys.executable, "-m", "antiphon.daemon", "jam", "--client-name", client, *args]
    log = tempfile.NamedTemporaryFile("w+", prefix=f"{client}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(orphan_safe(argv), env=jack.env, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log_path = log.name  # type: ignore[attr-defined]
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    if not line.startswith("antiphon: listening on"):
        proc.kill()
        raise RuntimeError(f"antiphon jam did not start within {timeout_s:.0f} s (said {line!r}): {jam_log(proc)[-3000:]}")
    jack.wait_ports(f"{client}:in", f"{client}-out:out")
    return proc


def jam_log(proc: subprocess.Popen) -> str:
    """What a jam whose stderr goes to the file `proc.log_path` has said. Once it has ended, the file
    is read a last time, kept on the process and removed: a test session starts dozens of jams."""
    kept = getattr(proc, "log_text", None)
    if kept is not None:
        return kept
    path = Path(proc.log_path)  # type: ignore[attr-defined]
    text = path.read_text()
    if proc.poll() is not None:
        proc.log_text = text  # type: ignore[attr-defined]
        path.unlink()
    return text


def realtime_allowed() -> bool:
    """Whether a process may take SCHED_FIFO here (asked of a throwaway child, so this one's own
    scheduling is untouched); ANTIPHON_JACK_REALTIME=0/1 decides instead when set."""
    forced = os.environ.get("ANTIPHON_JACK_REALTIME")
    if forced in ("0", "1"):
        return forced == "1"
    if not hasattr(os, "sched_setscheduler"):
        return False
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=10, check=False).returncode == 0


class JackServer:
    def __init__(self, name: str = "", rate: int = 48000, period: int = 64) -> None:
        if shutil.which("jackd") is None:
            raise UserError("jackd is not installed: apt-get install jackd2")
        self.name = name or f"antiphon-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.rate, self.period = rate, period
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"{self.name}.jackd.log"
        self.restarts = 0
        # Real-time scheduling where the machine allows it: without it, a busy box makes jackd
        # skip a late client's cycle, and that cycle's MIDI is lost or repeated (measured here:
        # thousands of "was not finished" per test run).
        self.realtime = realtime_allowed()
        self.realtime_flags = ["-R", "-P", "70"] if self.realtime else ["--no-realtime"]

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
                orphan_safe(["jackd", "-n", self.name, *self.realtime_flags, "-d", "dummy", "-r", str(self.rate),
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
        self.log_path.unlink(missing_ok=True)  # read while it ran; a test session starts hundreds

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
