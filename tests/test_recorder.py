"""Session recorder: a valid two-track MIDI file after a clean close, and after a SIGKILL mid-session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mido
import pytest
import symusic

from antiphon.daemon.recorder import SessionRecorder, read_journal, recover

ORIGIN = 100.0
PHRASE_S = 4.0


def phrase(k: int) -> tuple[list[tuple[float, list[int]]], list[tuple[float, list[int]]]]:
    """Phrase k: the player's four notes, then antiphon's four, as (time, message) lists."""
    base = ORIGIN + k * PHRASE_S
    player, answer = [], []
    for i in range(4):
        on = base + 0.25 * i
        player += [(on, [0x90, 48 + 4 * k + i, 60 + i]), (on + 0.2, [0x80, 48 + 4 * k + i, 0])]
        on = base + 1.5 + 0.25 * i
        answer += [(on, [0x91, 72 + 4 * k + i, 90]), (on + 0.2, [0x81, 72 + 4 * k + i, 0])]
    return player, answer


def expected_notes(phrases: range) -> set[tuple[str, int, float, float]]:
    notes = set()
    for k in phrases:
        for name, msgs in zip(("player", "antiphon"), phrase(k)):
            for t, m in msgs:
                if m[0] & 0xF0 == 0x90:
                    notes.add((name, m[1], round(t - ORIGIN, 3), 0.2))
    return notes


def file_notes(path: Path) -> set[tuple[str, int, float, float]]:
    score = symusic.Score(str(path)).to("second")
    return {(tr.name, n.pitch, round(n.time, 3), round(n.duration, 3)) for tr in score.tracks for n in tr.notes}


def assert_two_named_tracks(path: Path) -> None:
    mf = mido.MidiFile(str(path))
    assert mf.type == 1 and [tr.name for tr in mf.tracks] == ["player", "antiphon"]
    assert sorted(tr.name for tr in symusic.Score(str(path)).tracks) == ["antiphon", "player"]


def feed(rec: SessionRecorder, k: int, end: bool = True) -> None:
    player, answer = phrase(k)
    for t, m in player:
        rec.player(t, m)
    for t, m in answer:
        rec.antiphon(t, m)
    if end:
        rec.phrase_end(ORIGIN + k * PHRASE_S + 3.0)


def test_clean_close_writes_a_two_track_file_with_tempo_and_removes_the_journal(tmp_path):
    rec = SessionRecorder(tmp_path, origin=ORIGIN, bpm=120.0, beats_per_bar=3, name="clean")
    for k in range(3):
        feed(rec, k)
    rec.tempo(ORIGIN + 8.0, 90.0)
    rec.tempo(ORIGIN + 9.0, 1.25)  # a stalled clock's "tempo" (no set_tempo can hold it): not written, not fatal
    rec.marker(ORIGIN + 8.0, "clock stop")
    rec.player(ORIGIN + 11.0, [0xF8])  # not a track event: skipped, not written
    rec.antiphon(ORIGIN + 11.5, [0x90, 30, 50])  # left sounding: the file closes it
    path = rec.close()
    assert rec.error is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.mid"]
    assert_two_named_tracks(path)
    notes = file_notes(path)
    assert expected_notes(range(3)) <= notes
    assert notes - expected_notes(range(3)) == {("antiphon", 30, 11.5, 0.0)}
    score = symusic.Score(str(path))
    assert [round(t.qpm, 2) for t in score.tempos] == [120.0, 90.0]
    assert [(ts.numerator, ts.denominator) for ts in score.time_signatures] == [(3, 4)]
    assert [m.text for m in score.markers] == ["clock stop"]
    assert mido.MidiFile(str(path)).length == pytest.approx(11.5, abs=0.01)
    assert rec.tracks.skipped == 1


def test_each_phrase_end_leaves_a_readable_file_and_no_temporary(tmp_path):
    rec = SessionRecorder(tmp_path, origin=ORIGIN, name="live")
    feed(rec, 0)
    assert rec.sync()
    assert file_notes(tmp_path / "live.mid") == expected_notes(range(1))
    feed(rec, 1, end=False)  # handed over, not yet durable: the file still shows phrase 0 only
    assert rec.sync()
    assert file_notes(tmp_path / "live.mid") == expected_notes(range(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.journal", "live.mid"]
    assert recover(tmp_path) == []  # a live session's journal is not touched
    rec.close()
    assert file_notes(tmp_path / "live.mid") == expected_notes(range(2))


def test_long_stretches_without_phrase_ends_still_become_durable(tmp_path):
    rec = SessionRecorder(tmp_path, origin=ORIGIN, name="endless", durable_every_s=5.0)
    for i in range(24):  # twelve seconds of one phrase that never ends
        rec.player(ORIGIN + i * 0.5, [0x90, 40 + i, 64])
        rec.player(ORIGIN + i * 0.5 + 0.25, [0x80, 40 + i, 0])
    assert rec.sync()
    starts = sorted(n[2] for n in file_notes(tmp_path / "endless.mid"))
    assert starts == [i * 0.5 for i in range(21)]  # up to the message that crossed 10 s
    rec.close()


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_recorder import SessionRecorder, feed, ORIGIN
    rec = SessionRecorder({folder!r}, origin=ORIGIN, name="crash")
    for k in range(5):
        feed(rec, k)
    rec.sync()
    feed(rec, 5, end=False)   # the phrase being played when the process dies
    rec.sync()
    print("mid-phrase", flush=True)
    time.sleep(60)
""")


def test_sigkill_mid_session_then_recover_keeps_every_phrase_but_the_last(tmp_path):
    folder = tmp_path / "sessions"
    code = CHILD.format(tests=str(Path(__file__).parent), folder=str(folder))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        assert child.stdout.readline().strip() == "mid-phrase"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    journal, mid = folder / "crash.journal", folder / "crash.mid"
    assert journal.exists()
    assert file_notes(mid) == expected_notes(range(5))  # the last refresh before the crash

    assert recover(folder) == [mid]
    assert not journal.exists() and not (folder / "crash.mid.tmp").exists()
    assert_two_named_tracks(mid)
    notes = file_notes(mid)
    assert expected_notes(range(5)) <= notes  # all but at most the last phrase
    assert notes <= expected_notes(range(6))  # and nothing that was not played
    assert recover(folder) == []


def test_recover_reads_a_journal_cut_mid_line(tmp_path):
    rec = SessionRecorder(tmp_path, origin=ORIGIN, name="cut")
    feed(rec, 0)
    feed(rec, 1)
    assert rec.sync()
    journal = tmp_path / "cut.journal"
    text = journal.read_text()
    rec._journal.close()  # stand-in for the process dying: the lock goes with the file
    cut_at = text.index(f"P {4.25:.6f}") + 3  # inside phrase 1's third player line
    journal.write_text(text[:cut_at])
    tracks = read_journal(journal)
    assert tracks.skipped == 0
    assert recover(tmp_path) == [tmp_path / "cut.mid"]
    notes = file_notes(tmp_path / "cut.mid")
    assert expected_notes(range(1)) <= notes
    assert notes - expected_notes(range(1)) == {("player", 52, 4.0, 0.2)}  # what came before the cut


def test_a_failing_disk_stops_recording_not_the_caller(tmp_path):
    rec = SessionRecorder(tmp_path, origin=ORIGIN, name="broken")
    rec._journal.close()  # every later write fails
    feed(rec, 0)
    assert rec.sync()
    assert rec.error is not None
    feed(rec, 1)  # still accepted, silently drained
    assert rec.sync()
    rec.close()
