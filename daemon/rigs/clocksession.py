"""antiphon following a MIDI clock nobody on the project wrote: Debian's `jack_midi_clock`, driven
by `jack_transport` as a DAW drives it, on a private JACK server. Used by tests/test_clock_jack.py
and, run as a program, for the report in docs/clock.md:

    python -m antiphon.daemon.rigs.clocksession --sessions 40 [--model M] [--json]

A session: `antiphon jam` with --trace and --record; `jack_midi_clock -b BPM -B` turning JACK's
transport into MIDI clock; a reference listener (a `tap` child, below) on the clock's own output;
a player probe playing phrases into antiphon and hearing its answers. Scenarios:

- stopped: transport at 0 and stopped, then play (Start);
- rolling: the transport already rolls when the clock source joins (ticks, no Start);
- locate: between phrases the transport stops and plays again, from 0 (Start) or located
  elsewhere (Stop, Continue: MIDI continues from where it stopped);
- relay: as stopped, but antiphon hears the clock through a relay that drops ticks.

Truth is the clock source as the reference listener hears it (clocklisten.py): the song position
of each tick counted the MIDI way (from Start; across Stop/Continue; from the first tick when there
was no Start), counted by intervals so ticks the listener itself lost do not matter.
For each phrase: did an answer come, at which song position does antiphon's --trace say its first
note was placed, and how far from that beat (as the source placed it) was it sent and heard. For
each tick antiphon counted (its --trace's clock lines): where its tempo line put that song position
against where the source played it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from antiphon.daemon.context import LOST_NOTE_OFF
from antiphon.daemon.jam import read_trace_beats, read_trace_clock
from antiphon.daemon.midiclock import CONTINUE, START, STOP
from antiphon.daemon.rigs import jackserver
from antiphon.daemon.rigs.clockjudge import (
    believed_vs_source,
    follower_on_the_listeners_stamps,
    gone_while,
    silences,
)
from antiphon.daemon.rigs.clocklisten import BPM, PPQN, SourceBeats, Tap
from antiphon.daemon.rigs.clocksim import RELAY_DROPS
from antiphon.daemon.rigs.framedump import FrameDump, answer_onsets, off_grid
from antiphon.daemon.rigs.jackprobe import Probe
from antiphon.daemon.rigs.jackserver import JackServer, jam_log, orphan_safe, terminate
from antiphon.daemon.studio import TRANSPORT_MARKERS

WAIT_MS = 300
# --max-note-s 2: a call whose note-off JACK lost (a dropped cycle under load) is answered 2 s
# later, inside its phrase's 4.5 s, instead of after the next phrase has begun.
JAM_ARGS = ["--api", "jack", "--seed", "1", "--wait-ms", str(WAIT_MS), "--answer-min-s", "1.0",
            "--answer-max-s", "1.5", "--max-note-s", "2"]
PHRASE = [(0.25 * i + d, [0x90 if d == 0 else 0x80, p, 90 if d == 0 else 0])
          for i, p in enumerate((60, 62, 64, 67)) for d in (0.0, 0.2)]
PHRASE_GAP_S = 4.5  # one phrase every this many seconds: the answer (<= 1.5 s, from <= 1.9 s) is over by 3.4 s
CLOCK_PORT = "jack_midi_clock:mclk_out"
SCENARIOS = ("stopped", "rolling", "locate", "relay")
TICK_S = 60.0 / (BPM * PPQN)


def transport(jack: JackServer, command: str) -> None:
    """One jack_transport command (it reads them from stdin: `play`, `stop`, `locate FRAME`)."""
    subprocess.run(["jack_transport"], input=command + "\n", env=jack.env, capture_output=True, text=True,
                   timeout=10, check=True)


# --------------------------------------------------------------------------- one session

@dataclass
class Answer:
    phrase: int
    answered: bool
    traced_beats: float | None = None  # the song position antiphon's trace gives the first note
    source_beat: float | None = None  # that note's due time as a song position of the source
    sent_ms: float | None = None  # sent minus the source's time of the traced beat
    heard_ms: float | None = None  # heard by the player minus the source's time of the traced beat (None: JACK lost it)
    due: float | None = None  # when the trace says the first note was due
    # False after a transport message that JACK dropped for antiphon or for the listener (they heard
    # different Start/Continue/Stop sequences from there on): which beat is right is then unknowable.
    judged: bool = True
    # The relay, antiphon's clock in that scenario, sent no tick (as a second tap on its output
    # heard) for longer than antiphon waits before it takes the clock as gone (CI: 1.1 s, and never
    # again): free time is then right.
    clock_gone: bool = False
    # By JACK frame (framedump.py): the source's song position when the first note was written,
    # and that note minus the source's time of the traced beat; exact to a JACK period.
    frames_beat: float | None = None
    frames_heard_ms: float | None = None
    # Every tick jack_midi_dump heard in this run, up to the note, lay on the source's frame grid:
    # its count is then exact (framedump.off_grid).
    frames_exact: bool = False


@dataclass
class Session:
    scenario: str
    answers: list[Answer]
    log: str
    source: SourceBeats
    relay_dropped: int = 0  # ticks the relay kept from antiphon
    transport: str = ""  # the transport messages the listener heard, in order: S(tart) C(ontinue) P (stop)
    workdir: Path = Path()
    markers: list[str] = field(default_factory=list)  # the markers of antiphon's --record file, in order
    relay_silences: list[tuple[float, float]] = field(default_factory=list)  # see Answer.clock_gone
    relay_said: str = ""  # the relay's stderr, and whether it had died
    # antiphon's ClockFollower fed the listener's own stamps: (ticks compared, ticks it counted
    # differently from the listener, runs it began on another count). Same stamps, so what differs
    # is how the two count, not what JACK delivered to each.
    replayed: tuple[int, int, int] = (0, 0, 0)
    frames: SourceBeats | None = None  # the source's ticks by JACK frame (real-time scheduling only)
    # For each tick antiphon counted (its --trace), where its follower put that tick's song position
    # on its tempo line minus where the source played it (by the listener), ms; not in the rolling
    # scenario (no common count) nor after a transport message one side lost.
    believed_ms: list[float] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # what each tap heard, for --keep

    @property
    def truths_disagree(self) -> bool:
        """The listener's count and the frame tap's differ by a tick or more at some answer the frames
        judge exactly (after a tick off the frame grid the frame count guesses too)."""
        return any(a.source_beat is not None and a.frames_beat is not None and a.frames_exact
                   and round(PPQN * (a.source_beat - a.frames_beat)) != 0 for a in self.answers)

    @property
    def off_the_beat(self) -> bool:
        """An answer at another song position than the source's, by the listener or by frames."""
        return any(a.judged and a.traced_beats is not None
                   and any(b is not None and abs(b - round(a.traced_beats)) >= 0.03
                           for b in (a.source_beat, a.frames_beat if a.frames_exact else None))
                   for a in self.answers)

    @property
    def ticks_apart(self) -> int:
        """Ticks antiphon counted half a tick or more from the source's count."""
        return sum(1 for e in self.believed_ms if abs(e) >= 500 * TICK_S)

    @property
    def all_answered(self) -> bool:
        return all(a.answered for a in self.answers)

    @property
    def antiphon_transport(self) -> str:
        """The transport messages antiphon heard, as its recording marks them: S, C, P."""
        return "".join(MARKER_LETTERS.get(m, "") for m in self.markers)

    @property
    def calls_cut_short(self) -> int:
        """Calls whose note-off JACK lost on the way to antiphon, by antiphon's log."""
        return self.log.count(LOST_NOTE_OFF)


def start_jam(jack: JackServer, model: str, client: str, *extra: str) -> subprocess.Popen:
    return jackserver.start_jam(jack, client, [*JAM_ARGS, *(["--model", model] if model else []), *extra],
                                timeout_s=60.0)


def stop_jam(proc: subprocess.Popen) -> str:
    """SIGTERM, and time to write the trace the session is judged by: a busy box has taken over 10 s
    (how fast a jam shuts down is test_studio_jack's to judge; killed, it leaves no trace)."""
    terminate(proc, grace_s=30.0)
    return jam_log(proc)


def run_session(jack: JackServer, model: str, scenario: str, workdir: Path, phrases: int = 5,
                name: str = "clk") -> Session:
    """One session of `phrases` phrases under `scenario` (see the module docstring)."""
    trace = workdir / f"{name}.trace"
    jam = start_jam(jack, model, name, "--trace", str(trace), "--record", str(workdir / f"{name}-rec"))
    player = Probe(jack, f"{name}-player")
    ref = Tap(jack, f"{name}-ref")
    relay = Tap(jack, f"{name}-relay", RELAY_DROPS) if scenario == "relay" else None
    # What the relay really sent antiphon: it hears its input whether or not its output still works.
    relayed = Tap(jack, f"{name}-relayed") if relay is not None else None
    # The exact truth: the clock and antiphon's answers on one port, stamped by JACK frame. Only with
    # real-time scheduling: without it, under two CPU hogs, one client more tipped a graph that just
    # held (the listener lost 28-45 ticks a session and its count failed the test).
    dump = FrameDump(jack, f"{name}-frames") if jack.realtime else None
    clock_src: subprocess.Popen | None = None
    offs: list[float] = []
    try:
        player.connect(f"{name}:in", f"{name}-out:out")
        targets = [ref.in_port, *([dump.in_port] if dump else []), relay.in_port if relay else f"{name}:in"]
        if dump is not None:
            jack.connect(f"{name}-out:out", dump.in_port)
        if relay is not None and relayed is not None:
            jack.connect(relay.out_port, f"{name}:in")
            jack.connect(relay.out_port, relayed.in_port)
        transport(jack, "stop")
        transport(jack, "locate 0")

        def start_clock() -> subprocess.Popen:
            src = subprocess.Popen(orphan_safe(["jack_midi_clock", "-b", f"{BPM:g}", "-B", *targets]), env=jack.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            jack.wait_ports(CLOCK_PORT)
            return src

        if scenario == "rolling":
            transport(jack, "play")
            time.sleep(0.7)
            clock_src = start_clock()
        else:
            clock_src = start_clock()
            time.sleep(0.3)
            transport(jack, "play")
        time.sleep(1.5)  # a second and a half of ticks for the tempo line
        for k in range(phrases):
            t0 = time.perf_counter()
            offs.append(player.play(PHRASE)[-1])
            time.sleep(max(0.0, t0 + PHRASE_GAP_S - 1.0 - time.perf_counter()))
            if scenario == "locate" and k < phrases - 1:
                transport(jack, "stop")
                time.sleep(0.2)
                transport(jack, "locate 0" if k % 2 else f"locate {int(48000 * (3.1 + k))}")
                time.sleep(0.1)
                transport(jack, "play")
            time.sleep(max(0.0, t0 + PHRASE_GAP_S - time.perf_counter()))
        time.sleep(0.5)
        transport(jack, "stop")
        time.sleep(0.2)
    finally:
        if clock_src is not None:
            clock_src.terminate()
            clock_src.wait(5)
        log = stop_jam(jam)
        player.close()
        ref.close()
        if dump is not None:
            dump.close()
        for tap in (relay, relayed):
            if tap is not None:
                tap.close()
    source = SourceBeats.from_heard(ref.heard)
    dumped = dump.heard if dump is not None else []
    frames = SourceBeats.from_heard([(t, m) for t, m in dumped if m[0] >= 0xF0]) if dump is not None else None
    firsts = []  # (answer, its first note-on) of the answered phrases
    rows = read_trace_beats(trace) if trace.exists() else []
    answers = []
    for k, t_off in enumerate(offs):
        until = offs[k + 1] if k + 1 < len(offs) else float("inf")
        ons = [r for r in rows if r[2][0] & 0xF0 == 0x90 and r[2][2] > 0 and t_off < r[0] < until]
        if not ons:
            answers.append(Answer(k, False))
            continue
        due, sent, msg, beats = ons[0]
        a = Answer(k, True, beats, source.beat_at(due), due=due)
        # That very note-on: JACK drops a cycle's events for one client now and then, and the next
        # note the player heard (226 ms later, seen) is not the answer's first.
        heard = [t for t, m in player.since(t_off) if m[:2] == msg[:2] and m[2] > 0 and sent - 0.005 < t < until]
        src_t = source.time_of(round(beats), near=due) if beats is not None else None
        if src_t is not None:
            a.sent_ms = 1000 * (sent - src_t)
            a.heard_ms = 1000 * (heard[0] - src_t) if heard else None
        firsts.append((a, msg))
        answers.append(a)
    onsets = answer_onsets([(t, m) for t, m in dumped if m[0] & 0xF0 == 0x90 and len(m) > 2 and m[2] > 0])
    if frames is not None and len(onsets) == len(firsts):  # else an answer was lost whole: no matching by order
        for (a, msg), (t, m) in zip(firsts, onsets):
            if m[:2] == msg[:2]:  # not a later note of the answer, its first one lost
                by_frames(a, frames, t)
    dropped = sum(1 for d in RELAY_DROPS if d <= source.ticks) if relay else 0
    moves = [(t, TRANSPORT_LETTERS[m[0]]) for t, m in ref.heard if m[0] in TRANSPORT_LETTERS]
    s = Session(scenario, answers, log, source, dropped, "".join(letter for _, letter in moves), workdir,
                recorded_markers(workdir / f"{name}-rec"))
    if relay is not None and relayed is not None:
        s.relay_said = relay.said
        s.relay_silences = silences([t for t, _ in relayed.heard],
                                    until=max((t for t, m in ref.heard if m[0] == 0xF8), default=-math.inf))
        for a, t_off in zip(answers, offs):
            a.clock_gone = any(gone_while(gap, t_off, a.due if a.due is not None else t_off + 2.0)
                               for gap in s.relay_silences)
            a.judged = a.judged and not a.clock_gone
    s.replayed = follower_on_the_listeners_stamps(ref.heard, source)
    s.frames = frames
    clock_in = read_trace_clock(trace) if trace.exists() else []
    s.raw = {"ref": ref.heard, "frames": dumped, "player": player.since(-math.inf),
             "trace": [list(r) for r in rows], "antiphon_clock": clock_in,
             "relayed": relayed.heard if relayed is not None else []}
    theirs = s.antiphon_transport
    common_until = math.inf
    if s.transport != theirs:
        split = next((i for i, (a, b) in enumerate(zip(s.transport, theirs)) if a != b),
                     min(len(s.transport), len(theirs)))
        if split < len(moves):
            since = moves[split][0]
        elif theirs[split] == "P":
            # The listener lost a Stop that antiphon heard: the source's ticks stopped there, so
            # everything before its last tick is common ground (seen: the session's final Stop lost,
            # which left no phrase judged).
            since = max((t for t, m in ref.heard if m[0] == 0xF8), default=-math.inf)
        else:
            since = moves[-1][0] if moves else -math.inf
        for a, t_off in zip(answers, offs):
            a.judged = t_off < since
        common_until = since
    if scenario != "rolling":
        s.believed_ms = believed_vs_source(clock_in, source, common_until)
    return s


def by_frames(a: Answer, frames: SourceBeats, heard: float) -> None:
    """The answer's first note, written at frame time `heard`, against the source's ticks by
    frame (Answer.frames_*)."""
    if a.traced_beats is None:
        return
    a.frames_beat = frames.beat_at(heard)
    run = frames.run_at(heard)
    a.frames_exact = run is not None and off_grid([run], until=heard) == 0
    beat_t = frames.time_of(round(a.traced_beats), near=heard)
    a.frames_heard_ms = None if beat_t is None else 1000 * (heard - beat_t)


TRANSPORT_LETTERS = {START: "S", CONTINUE: "C", STOP: "P"}
MARKER_LETTERS = {TRANSPORT_MARKERS[status]: letter for status, letter in TRANSPORT_LETTERS.items()}


def recorded_markers(rec_dir: Path) -> list[str]:
    """The markers of antiphon's --record file(s) in rec_dir, in order."""
    import mido

    return [m.text for mid in sorted(rec_dir.glob("*.mid")) for m in mido.MidiFile(str(mid)).tracks[0]
            if m.type == "marker"]


# --------------------------------------------------------------------------- the report

def summary(sessions: list[Session]) -> dict[str, Any]:
    answers = [a for s in sessions for a in s.answers if a.answered]
    # After a transport message one side lost, antiphon and the listener have no common beat.
    judged = [a for a in answers if a.judged]
    on_beat = [a for a in judged if a.traced_beats is not None and a.source_beat is not None
               and abs(a.traced_beats - round(a.traced_beats)) < 0.02 and abs(a.source_beat - round(a.traced_beats)) < 0.03]
    heard = sorted(abs(a.heard_ms) for a in judged if a.heard_ms is not None)
    # Not the rolling scenario: with no Start each client counts from the first tick it heard.
    by_frames = [a for s in sessions if s.scenario != "rolling" for a in s.answers if a.answered and a.judged
                 and a.frames_beat is not None and a.frames_heard_ms is not None and a.frames_exact]
    on_frames = [a for a in by_frames if abs(a.frames_beat - round(a.traced_beats)) < 0.03]
    heard_frames = sorted(abs(a.frames_heard_ms) for a in by_frames)
    listener_otherwise = [a for a in by_frames if a.source_beat is not None
                          and round(PPQN * (a.source_beat - a.frames_beat)) != 0]
    sent = sorted(abs(a.sent_ms) for a in judged if a.sent_ms is not None)
    believed = sorted(abs(e) for s in sessions for e in s.believed_ms)

    def q(xs: list[float], p: float) -> float:
        return round(float(np.percentile(xs, p)), 2) if xs else float("nan")

    return {
        "sessions": len(sessions),
        "all_phrases_answered": sum(s.all_answered for s in sessions),
        "phrases": sum(len(s.answers) for s in sessions),
        "answered": len(answers),
        "judged": len(judged),
        "answers_on_a_source_beat": len(on_beat),
        "by_scenario": {sc: f"{sum(s.all_answered for s in sessions if s.scenario == sc)}/"
                            f"{sum(1 for s in sessions if s.scenario == sc)}" for sc in SCENARIOS},
        "sent_vs_beat_ms": {"p50": q(sent, 50), "p90": q(sent, 90), "max": q(sent, 100)},
        "heard_vs_beat_ms": {"p50": q(heard, 50), "p90": q(heard, 90), "max": q(heard, 100)},
        "ticks_missed_by_listener": sum(s.source.missing for s in sessions),
        "by_frames": {"judged_where_exact": len(by_frames), "answers_on_a_source_beat": len(on_frames),
                      "heard_vs_beat_ms": {"p50": q(heard_frames, 50), "p90": q(heard_frames, 90),
                                           "max": q(heard_frames, 100)},
                      "listener_counted_otherwise": len(listener_otherwise),
                      "ticks_missed_by_frame_tap": sum(s.frames.missing for s in sessions if s.frames),
                      "tick_intervals_off_the_frame_grid": sum(off_grid(s.frames.runs) for s in sessions if s.frames)},
        "antiphons_ticks_against_the_source": {
            "ticks": len(believed), "half_a_tick_or_more_apart": sum(s.ticks_apart for s in sessions),
            "sessions_with_any": sum(1 for s in sessions if s.ticks_apart),
            "abs_ms": {"p50": q(believed, 50), "p90": q(believed, 90), "p99": q(believed, 99), "max": q(believed, 100)}},
        "follower_on_the_listeners_stamps": {
            "ticks": sum(s.replayed[0] for s in sessions), "counted_otherwise": sum(s.replayed[1] for s in sessions),
            "runs_begun_otherwise": sum(s.replayed[2] for s in sessions),
            "sessions_with_any": sum(1 for s in sessions if s.replayed[1])},
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=40, help="sessions back to back, scenarios in turn")
    p.add_argument("--phrases", type=int, default=5, help="phrases per session")
    p.add_argument("--model", default="", help="ONNX model (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="also print every answer as JSON lines")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="which scenarios, in turn (comma-separated)")
    p.add_argument("--keep", default="", help="write what every tap and antiphon heard, as JSON, to this folder, for "
                                               "each session where an answer or a tick of antiphon's is off the "
                                               "source's count, or the listener's count and the frame tap's disagree")
    p.add_argument("--keep-all", action="store_true", help="with --keep: write every session")
    args = p.parse_args(argv)
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        p.error(f"--scenarios: {', '.join(sorted(unknown))} unknown; choose from {', '.join(SCENARIOS)}")
    sessions = []
    with JackServer() as jack, tempfile.TemporaryDirectory() as tmp:
        for i in range(args.sessions):
            scenario = scenarios[i % len(scenarios)]
            jack.ensure()
            s = run_session(jack, args.model, scenario, Path(tmp), args.phrases, name=f"clk{i}")
            sessions.append(s)
            shown = " ".join("-" if not a.answered else f"{a.traced_beats}@{a.heard_ms and round(a.heard_ms, 1)}ms"
                             for a in s.answers)
            print(f"session {i + 1} {scenario}: {shown}", flush=True)
            if args.json:
                print(json.dumps([a.__dict__ for a in s.answers]), flush=True)
            why = [w for w, yes in (("an answer off the source's beat", s.off_the_beat),
                                    (f"{s.ticks_apart} ticks counted otherwise", s.ticks_apart),
                                    ("the listener's count and the frame tap's disagree", s.truths_disagree)) if yes]
            if args.keep and (why or args.keep_all):
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                kept = Path(args.keep) / f"session-{i + 1}-{scenario}.json"
                kept.write_text(json.dumps({"answers": [a.__dict__ for a in s.answers], **s.raw}))
                print(f"  {'; '.join(why) or 'kept'}: {kept}", flush=True)
            if not s.all_answered:
                print(f"  transport heard {s.transport!r}; source runs (first, last index, period ms) "
                      f"{s.source.describe()}",
                      flush=True)
                print("  its log: " + " | ".join(s.log.strip().splitlines()[-12:]), flush=True)
        stalls = jack._stalls()
    result = summary(sessions)
    result["jackd_xrun_reports"] = stalls
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
