"""`antiphon jam` end to end over a real JACK server: a probe client plays phrases into it and
records what comes back, with arrival times on the clock the daemon schedules on.

These tests assert behaviour that must hold on any machine, loaded or not (jackclient.py states
the bounds): the answer comes after the player's wait, never before, and not late (LATE_S at the
probe); the probe hears what the daemon sent, in the order sent; the daemon's own --trace shows
its schedule kept (median within SEND_MEDIAN_S of due, none later than SEND_S); a barge-in
silences the answer (within LATE_S at the probe); no note is left sounding. How fast, at the median and p99, is `antiphon bench
--live`'s to say (idle: ~2 ms to the first note, jitter p99 under 1 ms).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from antiphon.daemon.rigs.jackprobe import Probe

H = sys.modules["jackclient"]  # loaded by conftest.py
WAIT_MS, ANSWER_MAX_S, PHRASE, LATE_S = H.WAIT_MS, H.ANSWER_MAX_S, H.PHRASE, H.LATE_S
start_jam, stop_jam, daemon_log, sounding = H.start_jam, H.stop_jam, H.daemon_log, H.sounding
sleep_past_answer, first_note_on, wait_first_note = H.sleep_past_answer, H.first_note_on, H.wait_first_note


class Session:
    """One `antiphon jam` and its probe, shared by tests, rebuilt when JACK had to be restarted."""

    proc: subprocess.Popen | None = None
    probe: Probe | None = None
    generation = -1

    def __init__(self, record: Path) -> None:
        self.record = record  # --record: the journal says what the daemon sent (see H.assert_closed)
        self.trace = record / "sent.trace"  # --trace: when each message was due and sent

    def get(self, jack, model) -> tuple[subprocess.Popen, Probe]:
        if self.generation != jack.restarts or self.proc is None or self.proc.poll() is not None:
            self.close()
            self.proc = start_jam(jack, model, "antiphon", "--record", str(self.record), "--trace", str(self.trace))
            self.probe = Probe(jack, "probe")
            self.probe.connect("antiphon:in", "antiphon-out:out")
            self.generation = jack.restarts
        return self.proc, self.probe

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.proc is not None:
            stop_jam(self.proc)
        self.proc = self.probe = None


@pytest.fixture(scope="module")
def jam_shared(tmp_path_factory):
    session = Session(tmp_path_factory.mktemp("jam-record"))
    yield session
    session.close()


@pytest.fixture()
def jam_session(jack, jam_model, jam_shared):
    return (*jam_shared.get(jack, jam_model), jam_shared)


def sent_by(session: Session) -> list:
    """The session's --trace, checked for sends on schedule: the daemon writes it out as it exits,
    so the session ends here (the next test starts a fresh one)."""
    proc = session.proc
    session.close()
    return H.assert_sent_on_time(session.trace, proc)


def test_answers_come_after_the_wait_in_order_on_schedule_and_close_every_note(jam_session):
    proc, probe, session = jam_session
    record = session.record
    delays = []
    t_first = None
    for _ in range(4):
        t_off = probe.play(PHRASE)[-1]
        t_first = t_first or t_off
        answer = H.answer_to(probe, proc, t_off)
        if answer is None:
            continue  # JACK lost the call's note-off: answered late by design, not timed here
        delays.append(first_note_on(answer) - t_off - WAIT_MS / 1000)
        H.assert_closed(answer, record, proc)
        assert all(m[0] & 0x0F == 0 for _, m in answer)  # out channel 1
    shown = [f"{1000 * d:.2f} ms" for d in delays]
    print(f"first note after phrase end + wait: {shown}")
    assert len(delays) >= 3, f"only {len(delays)} of 4 calls reached antiphon whole"
    assert min(delays) >= 0.0, f"an answer began before the player's wait was over: {shown}"
    assert max(delays) <= LATE_S, f"an answer began late: {shown}"
    assert proc.poll() is None
    heard = probe.since(t_first)
    H.assert_in_order(heard, sent_by(session))


def test_barge_in_silences_the_answer(jam_session):
    proc, probe, session = jam_session
    record = session.record
    t_off = probe.play(PHRASE)[-1]
    first = wait_first_note(probe, t_off, proc=proc)
    time.sleep(max(0.0, first + 0.3 - time.perf_counter()))  # well inside the >= 1.5 s answer
    t_barge = probe.send([0x90, 48, 100])
    time.sleep(0.4)  # the key is held: no phrase end, no new answer
    t_release = probe.send([0x80, 48, 0])
    heard = probe.since(t_off)
    by_late = [(t, m) for t, m in heard if t <= t_barge + LATE_S]
    after = [(t, m) for t, m in heard if t_barge + LATE_S < t < t_barge + 0.4]
    H.assert_closed(by_late, record, proc, by=t_barge + LATE_S)  # answer notes silenced at once
    assert after == [], f"the answer went on after the barge-in: {after[:5]}"
    sleep_past_answer(t_release)  # the barge-in note was a call of its own: let its answer end
    H.assert_closed(probe.since(t_off), record, proc)
    sent_by(session)


def test_sigterm_mid_answer_leaves_no_note_sounding(jack, jam_model, tmp_path):
    proc = start_jam(jack, jam_model, "antiphon-term", "--record", str(tmp_path))
    probe = Probe(jack, "probe-term")
    try:
        probe.connect("antiphon-term:in", "antiphon-term-out:out")
        t_off = probe.play(PHRASE)[-1]
        first = wait_first_note(probe, t_off, proc=proc)
        time.sleep(max(0.0, first + 0.2 - time.perf_counter()))
        t_term = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        time.sleep(0.1)
        heard = probe.since(t_off)
        if sounding(heard) or [0xB0, 123, 0] not in [m for t, m in heard if t >= t_term]:
            # The probe missed some of the shutdown burst (JACK repeats a late client's last cycle
            # and loses the next, see H.assert_closed): the session file records what was sent.
            sent = H.recorded_answer(tmp_path)
            panics = [i for i, (_, m) in enumerate(sent) if m == [0xB0, 123, 0]]
            assert panics and sounding(sent[:panics[-1]]) == set(), (sent, heard)
            print("shutdown note-offs sent by antiphon but lost by JACK")
    finally:
        probe.close()
        stop_jam(proc)


def test_jam_connects_to_existing_ports_by_name(jack, jam_model, tmp_path):
    probe = Probe(jack, "keys")
    proc = start_jam(jack, jam_model, "antiphon-named", "--in-port", "keys-play", "--out-port", "keys-hear:hear",
                     "--record", str(tmp_path))
    try:
        t_off = probe.play(PHRASE)[-1]
        wait_first_note(probe, t_off, proc=proc)
        sleep_past_answer(t_off)
        # The answer's first note as heard (not whatever note came first: JACK may drop that cycle).
        _, first = H.first_answer_note(probe, tmp_path, t_off)
        if first is not None:
            assert 0.0 <= first - t_off - WAIT_MS / 1000 <= LATE_S, f"{1000 * (first - t_off):.1f} ms after the phrase end"
    finally:
        stop_jam(proc)
        probe.close()


def test_an_unknown_port_is_a_clear_error(jack):
    argv = [sys.executable, "-m", "antiphon.daemon", "jam", "--api", "jack", "--client-name", "antiphon-bad",
            "--out-port", "no-such-synth"]
    proc = subprocess.run(argv, check=False, env=jack.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no output port matches 'no-such-synth'" in proc.stderr and "output ports are:" in proc.stderr


def test_an_output_that_vanishes_and_returns_gets_note_offs(jack, jam_model):
    player = Probe(jack, "player")
    synth = Probe(jack, "synth")
    proc = start_jam(jack, jam_model, "antiphon-vanish", "--out-port", synth.hear_port)
    try:
        player.connect("antiphon-vanish:in", "antiphon-vanish-out:out")
        t_off = player.play(PHRASE)[-1]
        wait_first_note(synth, t_off, proc=proc)
        synth.quit_hearing()  # the synth quits mid-answer...
        jack.wait_ports("antiphon-vanish:in")
        time.sleep(0.5)
        t_back = time.perf_counter()
        synth.hear_again()  # ...and comes back
        deadline = time.monotonic() + 5
        back = lambda: [m for _, m in synth.since(t_back)]
        while [0xB0, 123, 0] not in back() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [0xB0, 123, 0] in back() and [0xB0, 64, 0] in back(), daemon_log(proc)
        assert proc.poll() is None
    finally:
        stop_jam(proc)
        player.close()
        synth.close()


def test_a_jack_server_that_dies_ends_the_jam_with_a_clear_error(jackd, jam_model, tmp_path):
    """Its own server (not the session's): killed mid-session, like a crashed or stopped jackd."""
    from antiphon.daemon.rigs.jackserver import JackServer

    server = JackServer().start()
    try:
        proc = start_jam(server, jam_model, "antiphon-orphan", "--record", str(tmp_path))
        probe = Probe(server, "orphan-player")
        probe.connect("antiphon-orphan:in", "antiphon-orphan-out:out")
        wait_first_note(probe, probe.play(PHRASE)[-1], proc=proc)
        # jackd stopped under the daemon (SIGTERM: a SIGKILLed jackd leaves its entry in JACK's
        # shared registry, and a handful of those stop any new server from starting).
        server.proc.terminate()
        server.proc.wait(5)
        rc = proc.wait(10)
        probe.close()
        log = daemon_log(proc)
        assert rc != 0 and "the JACK server" in log and "stopped" in log and "Start JACK again" in log, log
        assert len(list(tmp_path.glob("*.mid"))) == 1 and not list(tmp_path.glob("*.journal"))  # saved, not lost
    finally:
        server.stop()


def test_the_live_benchmark_pairs_what_was_sent_with_what_was_heard(jack, jam_model, monkeypatch, tmp_path):
    """`bench --live`'s jitter rig, run short: every answer message the probe heard is matched to
    the daemon's trace of it, and the trace goes with the rig (nothing left in the temp folder)."""
    from antiphon.daemon.rigs import bench_live

    monkeypatch.setattr(bench_live.tempfile, "tempdir", str(tmp_path))
    r = bench_live.jitter(jack, jam_model, busy=False, calls=2)
    assert r["messages"] >= 4 and r["lost"] <= r["messages"], r  # JACK may drop a few on a busy box
    assert r["send_late_p50_ms"] >= 0.0 and r["jitter_p50_ms"] <= r["jitter_max_ms"]
    assert list(tmp_path.iterdir()) == []
