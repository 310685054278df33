"""`antiphon continue`: the daemon's engine continues a real file offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mido
import symusic

SATIE = Path(__file__).parent / "data" / "satie_gymnopedie1_hannds.mid"


def antiphon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "antiphon", *args], capture_output=True, text=True, timeout=300, check=False)


def note_pairs(track: mido.MidiTrack) -> tuple[int, int]:
    """(note-ons, note-ons left without a note-off) in one track."""
    sounding: dict[tuple[int, int], int] = {}
    ons = 0
    for msg in track:
        if msg.type == "note_on" and msg.velocity > 0:
            ons += 1
            sounding[(msg.channel, msg.note)] = sounding.get((msg.channel, msg.note), 0) + 1
        elif msg.type in ("note_off", "note_on") and sounding.get((msg.channel, msg.note)):
            sounding[(msg.channel, msg.note)] -= 1
    return ons, sum(sounding.values())


def test_continue_keeps_the_call_exactly_and_adds_a_closed_answer(tmp_path, tiny_model):
    out = tmp_path / "answer.mid"
    proc = antiphon("continue", str(SATIE), "-o", str(out), "--seconds", "6", "--seed", "3",
                    "--model", str(tiny_model.onnx))
    assert proc.returncode == 0, proc.stderr
    original, result = symusic.Score(str(SATIE)), symusic.Score(str(out))
    assert len(result.tracks) == len(original.tracks) + 1
    for before, after in zip(original.tracks, result.tracks):
        assert list(before.notes) == list(after.notes), "the call's notes are kept bit-exact (ticks)"
    answer = result.tracks[-1]
    assert answer.name == "antiphon" and len(answer.notes) > 0
    call_end = max(n.end for n in original.to("second").tracks[0].notes)
    answer_s = result.to("second").tracks[-1].notes
    assert min(n.time for n in answer_s) >= call_end - 0.6, "the answer follows the call"
    assert max(n.end for n in answer_s) <= call_end + 6 + 4.1, "answer length bounded by --seconds + a held note"

    midi = mido.MidiFile(str(out))
    channels = [{m.channel for m in t if hasattr(m, "channel")} for t in midi.tracks if any(
        m.type == "note_on" for m in t)]
    assert channels[-1].isdisjoint(set().union(*channels[:-1])), "the answer has a channel of its own"
    ons, open_ = note_pairs(midi.tracks[-1])
    assert ons == len(answer.notes) and open_ == 0

    again = tmp_path / "again.mid"
    assert antiphon("continue", str(SATIE), "-o", str(again), "--seconds", "6", "--seed", "3",
                    "--model", str(tiny_model.onnx)).returncode == 0
    assert again.read_bytes() == out.read_bytes(), "a seed makes the continuation reproducible"


def test_continue_refuses_bad_files_without_writing(tmp_path, tiny_model):
    not_midi = tmp_path / "text.mid"
    not_midi.write_text("hello")
    empty = tmp_path / "empty.mid"
    mido.MidiFile().save(str(empty))
    drums = tmp_path / "drums.mid"
    mid = mido.MidiFile()
    track = mido.MidiTrack([mido.Message("note_on", channel=9, note=36, velocity=100),
                            mido.Message("note_off", channel=9, note=36, time=240)])
    mid.tracks.append(track)
    mid.save(str(drums))
    for bad, words in ((not_midi, "not a readable MIDI file"), (empty, "no notes"), (drums, "no notes")):
        out = tmp_path / f"out-{bad.stem}.mid"
        proc = antiphon("continue", str(bad), "-o", str(out), "--model", str(tiny_model.onnx))
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no half-written temporary files"
