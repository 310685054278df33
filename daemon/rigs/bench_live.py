"""`antiphon bench --live`: the daemon measured over a private JACK server, against the rig's floor.

1. Phrase end (+ wait) → first answer note at the client, p50/p99, for `antiphon jam` and for a
   bare echo partner (the same phrase-end rule, replaying the phrase an octave up): the echo is
   what JACK, rtmidi and Python cost without a model, so antiphon's figure minus the echo's is
   what antiphon adds. Each call barges in on the previous answer, as a player would.
2. Scheduled-vs-received jitter: every message the daemon sends is traced with its due time;
   the client's arrival time minus that due time, centred on its median, is the jitter. Run
   idle and with a CPU-busy pure-Python thread inside the daemon (the GIL case).
3. Daemon start-up (process start → ports ready) and peak RSS.
4. Idle cost: CPU share of one core of an `antiphon jam` waiting for a player (its status line on
   a terminal, as a musician runs it) and, over the same seconds on the same server, of a bare
   rtmidi JACK in/out pair that does nothing — the floor any JACK MIDI client pays for its
   per-period process threads. Measured side by side, so other load on the machine cancels.

`python -m antiphon.daemon.rigs.bench_live echo|busy|pair ...` are the helper processes.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from antiphon.daemon.clock import MonotonicClock
from antiphon.daemon.jam import read_trace
from antiphon.daemon.rigs.jackprobe import Probe
from antiphon.daemon.rigs.jackserver import JackServer, orphan_safe, terminate

WAIT_MS = 250
TARGETS = {"added_p50_ms": 1.0, "added_p99_ms": 2.0, "jitter_p99_ms": 1.0, "jitter_max_ms": 3.0,
           "rss_mb": 300.0, "startup_s": 2.0, "idle_added_pct": 0.5}


def phrase(k: int) -> list[tuple[float, list[int]]]:
    base = 55 + (k * 5) % 17
    return [(0.1 * i + d, [0x90 if d == 0 else 0x80, base + 2 * i, 80 if d == 0 else 0])
            for i in range(3) for d in (0.0, 0.08)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


class Partner:
    """A daemon process (antiphon or the echo) on the bench's JACK server, with a probe wired to it."""

    def __init__(self, server: JackServer, argv: list[str], client: str, probe_name: str) -> None:
        t0 = time.perf_counter()
        # stderr to a file: a pipe nobody reads would block the daemon once 64 KB of log filled it.
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(orphan_safe(argv), env=server.env, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        if "jam" in argv or "busy" in argv:  # ready = model loaded, which jam announces in one line
            ready, _, _ = select.select([self.proc.stdout], [], [], 60)
            if not ready or not self.proc.stdout.readline().startswith("antiphon:"):
                self.proc.kill()
                raise RuntimeError(f"{client} did not start: {Path(self.log.name).read_text()[-2000:]}")
        server.wait_ports(f"{client}:in", f"{client}-out:out", timeout=60)
        self.startup_s = time.perf_counter() - t0
        self.probe = Probe(server, probe_name)
        self.probe.connect(f"{client}:in", f"{client}-out:out")

    def first_note_after(self, t: float, timeout: float = 3.0) -> float | None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            for at, m in self.probe.since(t):
                if m[0] & 0xF0 == 0x90 and m[2] > 0:
                    return at
            time.sleep(0.0005)
        return None

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> str:
        self.probe.close()
        terminate(self.proc)
        return Path(self.log.name).read_text()


def first_note_latencies(p: Partner, calls: int) -> tuple[list[float], int]:
    """ms from (last note-off sent + wait) to the answer's first note, over `calls` calls."""
    out, missing = [], 0
    for k in range(calls):
        t_off = p.probe.play(phrase(k))[-1]
        t = p.first_note_after(t_off)
        if t is None:
            missing += 1
            continue
        out.append(1000 * (t - t_off - WAIT_MS / 1000))
        time.sleep(0.05)  # a little of the answer, then the next call barges in
    return out, missing


def jitter(server: JackServer, model: str, busy: bool, calls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        return _jitter(server, model, busy, calls, Path(tmp) / "trace.txt")


def _jitter(server: JackServer, model: str, busy: bool, calls: int, trace: Path) -> dict[str, float]:
    client = "antiphon-busy" if busy else "antiphon-jit"
    argv = [sys.executable, "-m", "antiphon.daemon.rigs.bench_live", "busy" if busy else "jam", "--api", "jack",
            "--client-name", client, "--model", model, "--wait-ms", str(WAIT_MS), "--seed", "5",
            "--answer-min-s", "2", "--answer-max-s", "2", "--trace", str(trace)]
    p = Partner(server, argv, client, f"probe-{client}")
    try:
        for k in range(calls):
            t_off = p.probe.play(phrase(k))[-1]
            time.sleep(max(0.0, t_off + WAIT_MS / 1000 + 2.3 - time.perf_counter()))  # the whole 2 s answer
        heard = list(p.probe.heard)
    finally:
        stderr = p.close()
    sent = read_trace(trace)
    pairs, i = [], 0
    for at, m in heard:  # JACK keeps order: walk both lists; a message lost on either side is skipped
        j = next((k for k in range(i, min(i + 16, len(sent))) if sent[k][2] == m), None)
        if j is not None:
            pairs.append((sent[j][0], sent[j][1], at))
            i = j + 1
    delay = [1000 * (at - due) for due, _, at in pairs]
    med = pct(delay, 50)
    dev = [abs(d - med) for d in delay]
    send_late = [1000 * (s - due) for due, s, _ in pairs]
    if not pairs:
        raise RuntimeError(f"{client} sent nothing the probe heard ({len(heard)} heard, {len(sent)} traced); "
                           f"its stderr:\n{stderr[-2000:]}")
    return {"messages": len(pairs), "lost": len(heard) - len(pairs) + (len(sent) - len(pairs)),
            "delay_p50_ms": med, "jitter_p50_ms": pct(dev, 50), "jitter_p99_ms": pct(dev, 99),
            "jitter_max_ms": max(dev, default=float("nan")), "send_late_p50_ms": pct(send_late, 50),
            "send_late_p99_ms": pct(send_late, 99), "send_late_max_ms": max(send_late, default=float("nan"))}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(server: JackServer, model: str, seconds: float) -> dict[str, float]:
    """% of one core used by an idle jam and by a bare rtmidi JACK in/out pair, side by side."""
    import pty

    leader, terminal = pty.openpty()  # the jam draws its status line, as on a musician's terminal
    threading.Thread(target=_drain, args=(leader,), daemon=True).start()
    jam = subprocess.Popen(orphan_safe([sys.executable, "-m", "antiphon.daemon", "jam", "--api", "jack", "--model",
                                        model, "--client-name", "antiphon-idle"]),
                           env=server.env, stdout=subprocess.DEVNULL, stderr=terminal)
    pair = subprocess.Popen(orphan_safe([sys.executable, "-m", "antiphon.daemon.rigs.bench_live", "pair",
                                         "--client-name", "bare"]), env=server.env)
    try:
        server.wait_ports("antiphon-idle:in", "antiphon-idle-out:out", "bare:in", "bare-out:out", timeout=60)
        time.sleep(2.0)  # start-up work done
        t0, jam0, pair0 = time.perf_counter(), cpu_seconds(jam.pid), cpu_seconds(pair.pid)
        time.sleep(seconds)
        dt = time.perf_counter() - t0
        jam_pct = 100 * (cpu_seconds(jam.pid) - jam0) / dt
        pair_pct = 100 * (cpu_seconds(pair.pid) - pair0) / dt
    finally:
        for proc in (jam, pair):
            terminate(proc)
        os.close(terminal)
    return {"seconds": dt, "jam_pct": jam_pct, "pair_pct": pair_pct, "added_pct": jam_pct - pair_pct}


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        return


def run(model: str, quick: bool, log: Any) -> dict[str, Any]:
    calls = 30 if quick else 120
    res: dict[str, Any] = {"wait_ms": WAIT_MS, "calls": calls, "model": model, "targets": TARGETS}
    with JackServer() as server:
        log("floor: echo partner")
        echo = Partner(server, [sys.executable, "-m", "antiphon.daemon.rigs.bench_live", "echo", "--client-name",
                                "echo"], "echo", "probe-echo")
        try:
            floor, floor_missing = first_note_latencies(echo, calls)
        finally:
            echo.close()
        log("antiphon jam")
        jam = Partner(server, [sys.executable, "-m", "antiphon.daemon", "jam", "--api", "jack", "--model", model,
                               "--wait-ms", str(WAIT_MS), "--seed", "1", "--answer-min-s", "0.5"],
                      "antiphon", "probe-jam")
        try:
            lat, missing = first_note_latencies(jam, calls)
            res["startup_s"], res["rss_mb"] = jam.startup_s, jam.peak_rss_mb()
        finally:
            jam.close()
        res["first_note"] = {
            "echo_p50_ms": pct(floor, 50), "echo_p99_ms": pct(floor, 99), "echo_missing": floor_missing,
            "antiphon_p50_ms": pct(lat, 50), "antiphon_p99_ms": pct(lat, 99), "antiphon_missing": missing}
        res["first_note"]["added_p50_ms"] = pct(lat, 50) - pct(floor, 50)
        res["first_note"]["added_p99_ms"] = pct(lat, 99) - pct(floor, 99)
        log("jitter: idle, then with a busy thread in the daemon")
        res["jitter_idle"] = jitter(server, model, False, 3 if quick else 8)
        res["jitter_busy"] = jitter(server, model, True, 3 if quick else 8)
        log("idle cost: jam and a bare rtmidi pair side by side")
        res["idle"] = idle_cpu(server, model, 10.0 if quick else 60.0)
        res["jack_restarts"] = server.restarts
    return res


def table(r: dict[str, Any]) -> str:
    f, ji, jb = r["first_note"], r["jitter_idle"], r["jitter_busy"]
    rows = [
        f"antiphon bench --live: {r['calls']} calls, wait {r['wait_ms']} ms, model {r['model']}",
        f"{'':34}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
        f"{'first note, echo (floor)':34}{f['echo_p50_ms']:9.2f}{f['echo_p99_ms']:9.2f}",
        f"{'first note, antiphon':34}{f['antiphon_p50_ms']:9.2f}{f['antiphon_p99_ms']:9.2f}",
        f"{'  added by antiphon (target 1/2)':34}{f['added_p50_ms']:9.2f}{f['added_p99_ms']:9.2f}",
        f"{'jitter, idle (target -/1/3)':34}{ji['jitter_p50_ms']:9.2f}{ji['jitter_p99_ms']:9.2f}{ji['jitter_max_ms']:9.2f}",
        f"{'jitter, busy thread':34}{jb['jitter_p50_ms']:9.2f}{jb['jitter_p99_ms']:9.2f}{jb['jitter_max_ms']:9.2f}",
        (f"{'  scheduler alone (sent - due), idle':34}{ji['send_late_p50_ms']:9.2f}{ji['send_late_p99_ms']:9.2f}"
        f"{ji['send_late_max_ms']:9.2f}"),
        (f"{'  scheduler alone, busy thread':34}{jb['send_late_p50_ms']:9.2f}{jb['send_late_p99_ms']:9.2f}"
        f"{jb['send_late_max_ms']:9.2f}"),
        (f"due → arrival median: idle {ji['delay_p50_ms']:.2f} ms, busy {jb['delay_p50_ms']:.2f} ms "
         f"({ji['messages']} + {jb['messages']} messages, lost {ji['lost']} + {jb['lost']})"),
        f"start-up {r['startup_s']:.2f} s (target 2), peak RSS {r['rss_mb']:.0f} MB (target 300)",
        (f"idle, % of a core over {r['idle']['seconds']:.0f} s: jam {r['idle']['jam_pct']:.2f}, bare rtmidi JACK "
         f"pair {r['idle']['pair_pct']:.2f}, added {r['idle']['added_pct']:+.2f} (target 0.5)"),
        (f"missing answers: echo {f['echo_missing']}, antiphon {f['antiphon_missing']}; "
         f"JACK restarts {r['jack_restarts']}")]
    return "\n".join(rows)


def main(args: Any) -> int:
    from antiphon.daemon.engine import runtime_default_model

    model = getattr(args, "model", "") or runtime_default_model()
    as_json = getattr(args, "json", False)
    log = (lambda s: None) if as_json else (lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    r = run(model, getattr(args, "quick", False), log)
    print(json.dumps(r, indent=2) if as_json else table(r))
    return 0


# ---------------------------------------------------------------------- helper processes

def echo_partner(client: str, wait_ms: int = WAIT_MS) -> None:
    """The floor: timestamp-and-enqueue input, same phrase-end rule, replay an octave up on time."""
    import signal

    import rtmidi

    sys.setswitchinterval(0.0005)
    q: queue.SimpleQueue = queue.SimpleQueue()
    clock, wait = MonotonicClock(), wait_ms / 1000
    inp = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=client)
    inp.open_virtual_port("in")
    inp.set_callback(lambda e, _d=None: q.put((clock.now(), e[0])))
    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{client}-out")
    out.open_virtual_port("out")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    played: list[tuple[float, list[int]]] = []
    down: set[int] = set()
    try:
        while True:
            end = played[-1][0] + wait if played and not down else None
            try:
                t, m = q.get(timeout=0.1 if end is None else max(0.0, end - clock.now() - 0.002))
            except queue.Empty:
                if end is None:
                    continue
                clock.sleep_until(end)
                sounding: set[int] = set()
                for at, msg in played:
                    clock.sleep_until(end + at - played[0][0])
                    if not q.empty():
                        break  # barge-in
                    out.send_message([msg[0], msg[1] + 12, msg[2]])
                    (sounding.add if msg[0] & 0xF0 == 0x90 and msg[2] else sounding.discard)(msg[1] + 12)
                for pitch in sounding:
                    out.send_message([0x80, pitch, 0])
                played = []
                continue
            if m[0] & 0xF0 in (0x80, 0x90):
                (down.add if m[0] & 0xF0 == 0x90 and m[2] else down.discard)(m[1])
                played.append((t, m))
    finally:
        inp.cancel_callback()
        for port in (inp, out):
            port.close_port()
            port.delete()


def bare_pair(client: str) -> None:
    """The idle floor: an rtmidi JACK input (with a callback) and output, and nothing else."""
    import signal

    import rtmidi

    inp = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=client)
    inp.open_virtual_port("in")
    inp.set_callback(lambda e, _d=None: None)
    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{client}-out")
    out.open_virtual_port("out")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        signal.pause()  # no wake-up of ours until SIGTERM
    inp.cancel_callback()
    for port in (inp, out):
        port.close_port()
        port.delete()


def busy_jam(argv: list[str]) -> int:
    """`antiphon jam` with a pure-Python thread spinning beside it (holds the GIL whenever it can)."""
    from antiphon.daemon import cli

    def spin() -> None:
        x = 0
        while True:
            x += 1

    threading.Thread(target=spin, daemon=True).start()
    return cli.main(["jam", *argv])


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "echo":
        echo_partner(rest[rest.index("--client-name") + 1] if "--client-name" in rest else "echo")
    elif mode == "busy":
        sys.exit(busy_jam(rest))
    elif mode == "pair":
        bare_pair(rest[rest.index("--client-name") + 1] if "--client-name" in rest else "bare")
    else:  # "jam": the same daemon, launched the same way as "busy" for a fair comparison
        from antiphon.daemon import cli

        sys.exit(cli.main(["jam", *rest]))
    os._exit(0)
