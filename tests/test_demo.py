"""`antiphon demo` end to end: a private JACK server, the real jam on the shipped model, the
bundled call played as a keyboard would (one phrase cutting in on an answer), and the three files
it promises. About a minute."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import wave
from collections import Counter

import mido
import numpy as np
import pytest

from antiphon.daemon.errors import UserError
from antiphon.daemon.offline import demo

LATE_MS = 50  # at the probe, as for the JACK tests (tests/jackclient.py): only what is late fails


def notes_on(track) -> list[tuple[float, int]]:
    t, out = 0.0, []
    for m in track:
        t += m.time
        if m.type == "note_on" and m.velocity > 0:
            out.append((t, m.note))
    return out


def left_sounding(track) -> set[int]:
    on: set[int] = set()
    for m in track:
        if m.type == "note_on" and m.velocity > 0:
            on.add(m.note)
        elif m.type in ("note_on", "note_off"):
            on.discard(m.note)
        elif m.type == "control_change" and m.control in (120, 123):
            on.clear()
    return on


def test_demo_plays_the_call_into_a_real_jam_and_writes_midi_png_and_wav(jackd, fluidsynth, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "antiphon", "demo", "-o", str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith("antiphon demo: you played 3 phrases of Satie's Gymnopédie No. 1 (54 notes)"), line
    found = re.search(r"antiphon answered (\d) times .* its first note came (-?[\d.]+) ms after", line)
    assert found and found.group(1) == "3", line

    # The session as jam recorded it: the player's three phrases and antiphon's answers, in one file.
    session = mido.MidiFile(str(out / "demo.mid"))
    tracks = {t.name: t for t in session.tracks}
    player, answer = notes_on(tracks["player"]), notes_on(tracks["antiphon"])
    assert len(answer) >= 3 and left_sounding(tracks["antiphon"]) == set()
    phrases = demo.load_phrases()
    played = [m[1] for ph in phrases for _, m in ph if m[0] & 0xF0 == 0x90 and m[2] > 0]
    # A lost cycle and a repeated one can leave the count right and the notes wrong: compare the notes.
    heard_notes, played_notes = Counter(p for _, p in player), Counter(played)
    differ = sum(((played_notes - heard_notes) + (heard_notes - played_notes)).values())
    if differ:
        # JACK dropped a cycle of the player's notes on the way in (seen without real-time scheduling:
        # phrase 2's last note, so antiphon heard that phrase end one note early and answered over
        # it). What antiphon heard is what it recorded; the barge-in cannot be judged against the
        # call as played.
        assert differ <= 2, (differ, [p for _, p in player])
        print(f"JACK lost or repeated {differ} of the player's notes on the way in: barge-in not judged; {line}")
    else:
        # The demo times the call's end when its player client stamps the send, which a busy box can
        # delay by tens of ms after the note left: "after your pause" may then read a little negative.
        assert -LATE_MS <= float(found.group(2)) <= LATE_MS, line
        assert "the second cutting in on an answer (which stopped)" in line, line
        # Barge-in: between the first note of phrase 2 (+ what was already on its way) and the end of
        # that phrase, antiphon plays nothing; each phrase gets an answer after it.
        n1, n2 = (sum(1 for _, m in ph if m[0] & 0xF0 == 0x90 and m[2] > 0) for ph in phrases[:2])
        barge, end2 = player[n1][0], player[n1 + n2 - 1][0]
        assert [t for t, _ in answer if player[0][0] < t < barge], "the first phrase was answered before the barge-in"
        assert [t for t, _ in answer if barge + 0.05 < t <= end2] == [], "the answer played on over the player"
        assert [t for t, _ in answer if t > player[-1][0]], "the last phrase got no answer"

    with open(out / "demo.png", "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1600, 600)
    with wave.open(str(out / "demo.wav")) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
        seconds = w.getnframes() / w.getframerate()
    assert np.sqrt(np.mean(audio ** 2)) > 100 and seconds >= session.length


def test_demo_without_a_midi_system_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    monkeypatch.setattr(demo, "alsa_sequencer_present", lambda: False)
    monkeypatch.setattr(demo.sys, "platform", "linux")
    with pytest.raises(UserError, match=r"needs a MIDI system.*sudo apt-get install jackd2"):
        demo.midi_system("")
    with pytest.raises(UserError, match=r"--api jack needs .*jackd2"):
        demo.midi_system("jack")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_first_answer_note_the_ears_missed_is_timed_by_the_recording(tmp_path):
    """JACK dropped the answer's first note on its way to the demo's ears (the next note came 572
    ms on, CI): the summary times that answer by the jam's recording, when it sent the note."""
    from antiphon.daemon.recorder import SessionRecorder

    rec = SessionRecorder(tmp_path, origin=100.0)
    rec.player(100.0, [0x90, 60, 80])
    rec.player(100.5, [0x80, 60, 0])
    rec.player(100.6, [0xB0, 64, 0])  # the pedal let go: the call's last event
    rec.antiphon(101.003, [0x90, 74, 86])  # 3 ms after the 400 ms wait
    rec.antiphon(101.5, [0x90, 73, 70])
    rec.antiphon(101.9, [0x80, 74, 0])
    rec.antiphon(101.9, [0x80, 73, 0])
    mid = rec.close()
    firsts = demo.recorded_firsts(mid, 0.4)
    assert len(firsts) == 1 and firsts[0][1] == 74 and firsts[0][0] == pytest.approx(3.0, abs=1.0)

    s = demo.Session()
    s.calls, s.ends = [[(0.0, [0x90, 60, 80])]], [200.6]
    heard = [(201.5, [0x90, 73, 70])]
    s.firsts = [(201.5, 73)]  # the ears' first note: the answer's second
    assert demo.summary(s, heard, 0.4).endswith("first note came 500.0 ms after your 400 ms pause")
    line = demo.summary(s, heard, 0.4, firsts)
    assert re.search(r"first note came [23]\.\d ms", line), line
    s.firsts = [(201.004, 74)]  # heard it: the ears' figure stands
    assert "first note came 4.0 ms" in demo.summary(s, [(201.004, [0x90, 74, 86])], 0.4, firsts)
