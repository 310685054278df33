"""`antiphon demo`: hear antiphon without a keyboard or a DAW.

A real `antiphon jam` (the shipped model, or --model) runs on a private JACK server (started as
`bench --live` does; Debian's jackd2) or, without JACK, on the machine's running MIDI system
(ALSA's sequencer, CoreMIDI). A stand-in keyboard (a probe client, rigs/jackprobe.py) plays the
bundled call into the jam's input the way a player would: three phrases of Satie's Gymnopédie
No. 1, the second cutting in on the first answer (a barge-in), each later one waiting for its
answer. The jam records the session; the demo writes it as MIDI, a piano roll (PNG) and audio
(WAV, FluidSynth), and says in one line what was played, what antiphon answered and how late its
first note was.

The call (assets/demo_call.mid, 0.7 KB) is cut from a performance in the HANNDs data set (MIT);
the composition (1888) is in the public domain.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from antiphon.daemon.config import DemoConfig
from antiphon.daemon.errors import UserError

CALL = Path(__file__).resolve().parents[1] / "assets" / "demo_call.mid"
CALL_TITLE = "Satie's Gymnopédie No. 1"
BARGE_AFTER_S = 2.5  # the second phrase starts this far into the first answer
QUIET_S = 1.5  # an answer is over when nothing has arrived for this long
ANSWER_TIMEOUT_S = 5.0
NOTE_ON = 0x90
NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def note_name(pitch: int) -> str:
    return f"{NAMES[pitch % 12]}{pitch // 12 - 1}"


def load_phrases(path: Path = CALL) -> list[list[tuple[float, list[int]]]]:
    """The call's phrases, each begun by a marker, as (seconds from the marker, message bytes)."""
    import mido

    phrases: list[list[tuple[float, list[int]]]] = []
    t = start = 0.0
    for msg in mido.MidiFile(str(path)):
        t += msg.time
        if msg.type == "marker":
            phrases.append([])
            start = t
        elif not msg.is_meta and phrases:
            phrases[-1].append((t - start, msg.bytes()))
    return phrases


class RunningMidi:
    """The machine's own MIDI system (ALSA sequencer, CoreMIDI) where the demo's ports live."""

    def __init__(self, api: str) -> None:
        self.api, self.env = api, dict(os.environ)

    def wait_ports(self, *names: str, timeout: float = 10.0) -> None:
        from antiphon.daemon.ports import list_ports

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            have = [p for side in list_ports(self.api) for p in side]
            if all(any(n in p for p in have) for n in names):
                return
            time.sleep(0.05)
        raise TimeoutError(f"MIDI ports {names} did not appear within {timeout} s")


def alsa_sequencer_present() -> bool:
    return Path("/dev/snd/seq").exists()


def midi_system(api: str) -> tuple[AbstractContextManager, str]:
    """(a context giving the 'server' the ports live on, the MIDI API to use)."""
    from antiphon.daemon.ports import api_name

    name = api_name(api)
    if name in ("", "jack") and shutil.which("jackd"):
        from antiphon.daemon.rigs.jackserver import JackServer

        return JackServer(), "jack"
    if name == "jack":
        raise UserError("antiphon demo --api jack needs JACK's server, jackd: sudo apt-get install jackd2")
    if not name:
        if sys.platform == "darwin":
            name = "coremidi"
        elif alsa_sequencer_present():
            name = "alsa"
        else:
            raise UserError("antiphon demo needs a MIDI system and found none: install JACK (Debian/Ubuntu: "
                            "sudo apt-get install jackd2; the demo starts a private server of its own), or load "
                            "the ALSA sequencer (sudo modprobe snd-seq)")
    if name == "winmm":
        raise UserError("Windows has no virtual MIDI ports, so the demo cannot wire itself up there; install "
                        "loopMIDI and use `antiphon jam --in A --out B`")
    return nullcontext(RunningMidi(name)), name


def start_jam(server: Any, api: str, cfg: DemoConfig, keys: Any, record: Path, log_file: Any) -> subprocess.Popen:
    from antiphon.daemon.rigs.jackserver import orphan_safe

    argv = [sys.executable, "-m", "antiphon.daemon", "jam", "--api", api, "--client-name", "antiphon-demo",
            "--in", f"{keys.name}-play", "--out", f"{keys.name}-hear", "--record", str(record),
            "--seed", str(cfg.seed), "--wait-ms", str(cfg.wait_ms)]
    if cfg.model:
        argv += ["--model", cfg.model]
    proc = subprocess.Popen(orphan_safe(argv), env=server.env, stdout=subprocess.PIPE, stderr=log_file, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    if not line.startswith("antiphon: listening on"):
        proc.kill()
        proc.wait(5)
        raise UserError(f"antiphon jam did not start: {Path(log_file.name).read_text()[-1500:]}")
    return proc


def first_note(keys: Any, since: float, timeout: float = ANSWER_TIMEOUT_S) -> tuple[float, int] | None:
    """(when, key) of the first note-on heard after `since`."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        for t, m in keys.since(since):
            if m[0] & 0xF0 == NOTE_ON and m[2] > 0:
                return t, m[1]
        time.sleep(0.005)
    return None


def recorded_firsts(midi: Path, wait_s: float) -> list[tuple[float, int]]:
    """Per answer in the jam's recording: (ms from the call's last event + the wait to the answer's
    first note-on, its key), on the jam's own clock: when it sent that note."""
    import symusic

    from antiphon.daemon.recorder import TRACK_NAMES

    player, antiphon = TRACK_NAMES
    events: list[tuple[float, int]] = []  # (seconds, antiphon's key struck, or -1: a player event)
    for track in symusic.Score(str(midi)).to("second").tracks:  # the tempo map honoured, as codec.load_midi
        if track.name == player:
            events += [(float(t), -1) for n in track.notes for t in (n.time, n.time + n.duration)]
            events += [(float(e.time), -1) for e in (*track.controls, *track.pitch_bends)]
        elif track.name == antiphon:
            events += [(float(n.time), n.pitch) for n in track.notes if n.velocity > 0]
    firsts, call_end = [], None
    for t, key in sorted(events):
        if key < 0:
            call_end = t
        elif call_end is not None:
            firsts.append((1000 * (t - call_end - wait_s), key))
            call_end = None
    return firsts


class Session:
    """What happened: per call, when its last event was sent and when the answer's first note came."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[float, list[int]]]] = []
        self.ends: list[float] = []
        self.firsts: list[tuple[float, int] | None] = []  # (when, key) of each answer's first note heard
        self.barge_at: float | None = None


def play(keys: Any, phrases: list, wait_s: float) -> Session:
    s = Session()
    for k, phrase in enumerate(phrases):
        if k == 1 and s.firsts[0] is not None:
            # Cut in on the first answer, as a player who has heard enough does.
            time.sleep(max(0.0, s.firsts[0][0] + BARGE_AFTER_S - time.perf_counter()))
        elif k > 0:
            keys.wait_quiet(QUIET_S, timeout=30.0)
        sent = keys.play(phrase)
        if k == 1 and s.firsts[0] is not None:
            s.barge_at = sent[0]  # when its first note went out: handing the phrase over takes a while on a busy box
        s.calls.append(phrase)
        s.ends.append(sent[-1])
        s.firsts.append(first_note(keys, sent[-1], timeout=wait_s + ANSWER_TIMEOUT_S))
    keys.wait_quiet(QUIET_S, timeout=30.0)
    return s


def summary(s: Session, heard: list[tuple[float, list[int]]], wait_s: float,
            recorded: list[tuple[float, int]] | None = None) -> str:
    """`recorded`: recorded_firsts of the jam's recording. Where the first note heard is not the
    answer's first (JACK dropped a cycle on the way to the demo's ears: seen without real-time
    scheduling, the next note 572 ms on), the recording says when the jam sent it."""
    played = sum(1 for c in s.calls for _, m in c if m[0] & 0xF0 == NOTE_ON and m[2] > 0)
    answered = [m[1] for _, m in heard if m[0] & 0xF0 == NOTE_ON and m[2] > 0]
    answers = sum(f is not None for f in s.firsts)
    late = []
    for k, (f, e) in enumerate(zip(s.firsts, s.ends)):
        if f is not None:
            sent = recorded[k] if recorded is not None and k < len(recorded) else None
            late.append(sent[0] if sent is not None and sent[1] != f[1] else 1000 * (f[0] - e - wait_s))
    barge = ""
    if s.barge_at is not None and s.firsts[0] is not None:
        # Allow for what was already on its way when the player came in (a JACK hop or two).
        cut = [t for t, m in heard if s.barge_at + 0.05 < t < s.ends[1] and m[0] & 0xF0 == NOTE_ON and m[2] > 0]
        barge = f", the second cutting in on an answer ({'which stopped' if not cut else 'which played on!'})"
    if not answered:
        return f"you played {len(s.calls)} phrases of {CALL_TITLE} ({played} notes){barge}; antiphon did not answer"
    span = f"{note_name(min(answered))}–{note_name(max(answered))}"
    return (f"you played {len(s.calls)} phrases of {CALL_TITLE} ({played} notes){barge}; antiphon answered "
            f"{answers} times with {len(answered)} notes ({span}); its first note came {late[0]:.1f} ms after "
            f"your {1000 * wait_s:.0f} ms pause"
            + (f" (later answers: {', '.join(f'{x:.1f}' for x in late[1:])} ms)" if late[1:] else ""))


def run(cfg: DemoConfig, log: Any = print) -> tuple[str, list[Path], list[str]]:
    """Plays the demo; returns (summary line, files written, what could not be written and why)."""
    from antiphon.daemon.offline import render
    from antiphon.daemon.rigs.jackprobe import Probe
    from antiphon.daemon.rigs.jackserver import terminate

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    phrases = load_phrases()
    context, api = midi_system(cfg.api)
    wait_s = cfg.wait_ms / 1000
    with context as server, tempfile.TemporaryDirectory(prefix="antiphon-demo-") as tmp:
        record = Path(tmp) / "record"
        log(f"demo: playing {len(phrases)} phrases into antiphon jam over {api} (about a minute)")
        keys = Probe(server, "demo-keys", api)
        with open(Path(tmp) / "jam.log", "w+") as jam_log:
            jam = start_jam(server, api, cfg, keys, record, jam_log)
            try:
                session = play(keys, phrases, wait_s)
                heard = list(keys.heard)
            finally:
                keys.close()
                terminate(jam, 15.0)
            said = Path(jam_log.name).read_text()
        sessions = sorted(record.glob("*.mid"))
        if not sessions:
            raise UserError(f"antiphon jam left no recording; it said: {said[-1500:]}")
        midi = out / "demo.mid"
        shutil.copyfile(sessions[-1], midi)
    written, missing = [midi], []
    for path, make in ((out / "demo.png", lambda p: render.draw_piano_roll(str(midi), str(p))),
                       (out / "demo.wav", lambda p: render.render_wav(str(midi), str(p)))):
        try:
            make(path)
            written.append(path)
        except UserError as e:
            missing.append(f"{path.name}: {e}")
    return summary(session, heard, wait_s, recorded_firsts(midi, wait_s)), written, missing


def main(args: Any) -> int:
    from antiphon.daemon.cli import configs

    cfg: DemoConfig = configs(args, DemoConfig)[0]
    line, written, missing = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"antiphon demo: {line}")
    print("wrote " + ", ".join(str(p) for p in written))
    for why in missing:
        print(f"antiphon demo: not written: {why}", file=sys.stderr)
    return 1 if missing else 0
