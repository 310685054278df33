"""`--record DIR`: every session becomes a standard MIDI file, and a crash loses at most a phrase.

Threads: `player`, `antiphon`, `tempo`, `marker` and `phrase_end` only put a tuple on a
queue.SimpleQueue (never blocks), so they may be called from the real-time threads. A writer
thread of the recorder's own does all file work: it appends each message to a text journal
(`<name>.journal`), and at each phrase end (or after `durable_every_s` of session time without
one) it flushes and fsyncs the journal and rewrites `<name>.mid` atomically (tmp, fsync, rename). A SIGKILL therefore leaves a journal holding at
least everything up to the last phrase end, and `recover(DIR)` at the next start turns it into
its .mid. `close()` writes the final .mid and removes the journal.

The .mid is type 1, two tracks named "player" and "antiphon", tempo, time signature and markers
on the first. Each track is written on one channel, whatever channel its messages came on,
because readers such as symusic split a track by channel. Each track's events are encoded once,
as they arrive (mido encodes every event), into a growing byte string, so refreshing the file
costs a copy, not a re-encoding of the whole session. Notes still sounding when the file is
written are closed at its end.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import mido
from mido.midifiles.midifiles import encode_variable_int

PLAYER, ANTIPHON, TEMPO, MARKER, PHRASE_END, SYNC, CLOSE = range(7)
TRACK_NAMES = ("player", "antiphon")
TAGS = "PATMEYC"  # journal line tag per record kind
JOURNAL = ".journal"
PPQ = 960
MAX_TEMPO_US = 0xFFFFFF  # a set_tempo holds 24 bits of microseconds per beat
MAGIC = "antiphon-journal 1"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, recover trusts the caller
    fcntl = None  # type: ignore[assignment]


class SmfTracks:
    """Timed messages (seconds from the session start) in, type-1 SMF bytes out."""

    def __init__(self, bpm: float = 120.0, beats_per_bar: int = 4, channels: tuple[int, int] = (0, 1)) -> None:
        self.channels = channels
        self.data = [bytearray(), bytearray()]
        self.last_tick = [0, 0]
        self.sounding: list[set[tuple[int, int]]] = [set(), set()]
        self._seg_t, self._seg_tick, self._bpm = 0.0, 0, bpm
        self.skipped = 0
        for i, name in enumerate(TRACK_NAMES):
            self._meta(i, 0, mido.MetaMessage("track_name", name=name))
        self._meta(0, 0, mido.MetaMessage("time_signature", numerator=beats_per_bar, denominator=4))
        self._meta(0, 0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm)))

    def tick(self, t: float) -> int:
        return max(0, round(self._seg_tick + (t - self._seg_t) * self._bpm * PPQ / 60.0))

    def _put(self, track: int, tick: int, encoded: list[int]) -> None:
        tick = max(tick, self.last_tick[track])  # the two threads' messages may arrive a little out of order
        self.data[track] += bytes(encode_variable_int(tick - self.last_tick[track])) + bytes(encoded)
        self.last_tick[track] = tick

    def _meta(self, track: int, tick: int, meta: mido.MetaMessage) -> None:
        self._put(track, tick, meta.bytes())

    def message(self, track: int, t: float, msg: list[int] | tuple[int, ...]) -> None:
        try:
            if not 0x80 <= msg[0] < 0xF0:
                raise ValueError("not a channel message")
            m = mido.Message.from_bytes(list(msg)).copy(channel=self.channels[track])
        except (ValueError, TypeError, IndexError):
            self.skipped += 1  # clock, SysEx and malformed bytes have no place in a track
            return
        self._put(track, self.tick(t), m.bytes())
        if m.type == "note_on" and m.velocity > 0:
            self.sounding[track].add((m.channel, m.note))
        elif m.type in ("note_on", "note_off"):
            self.sounding[track].discard((m.channel, m.note))

    def tempo(self, t: float, bpm: float) -> None:
        # Below ~3.6 bpm a set_tempo does not fit its 24 bits: no clock's tempo, and no reason to
        # stop recording.
        if bpm * MAX_TEMPO_US < 60e6 or abs(bpm - self._bpm) < 0.05:
            return
        # Ticks already written in either track keep the tempo they were computed with: the
        # change takes effect no earlier than the latest event, and time stays continuous there.
        tick = max(self.tick(t), *self.last_tick)
        seg_t = self._seg_t + (tick - self._seg_tick) * 60.0 / (self._bpm * PPQ)
        self._seg_t, self._seg_tick, self._bpm = seg_t, tick, bpm
        self._meta(0, tick, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm)))

    def marker(self, t: float, text: str) -> None:
        self._meta(0, self.tick(t), mido.MetaMessage("marker", text=text))

    def smf_bytes(self) -> bytes:
        chunks = [b"MThd" + (6).to_bytes(4, "big") + (1).to_bytes(2, "big") + (2).to_bytes(2, "big")
                  + PPQ.to_bytes(2, "big")]
        end = max(self.last_tick)
        for i in range(2):
            body = bytearray(self.data[i])
            delta = bytes(encode_variable_int(end - self.last_tick[i]))
            for channel, note in sorted(self.sounding[i]):  # a file is never left with a note on
                body += delta + bytes((0x80 | channel, note, 0))
                delta = b"\x00"
            body += b"\x00\xff\x2f\x00"
            chunks.append(b"MTrk" + len(body).to_bytes(4, "big") + bytes(body))
        return b"".join(chunks)

    def apply(self, kind: int, t: float, payload: object) -> None:
        if kind in (PLAYER, ANTIPHON):
            self.message(kind, t, payload)  # type: ignore[arg-type]
        elif kind == TEMPO:
            self.tempo(t, float(payload))  # type: ignore[arg-type] - a number, or its journal text
        elif kind == MARKER:
            self.marker(t, str(payload))


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _journal_line(kind: int, t: float, payload: object) -> str:
    if kind in (PLAYER, ANTIPHON):
        text = " ".join(str(int(b)) for b in payload)  # type: ignore[attr-defined]
    else:
        text = "" if payload is None else str(payload).replace("\n", " ")
    return f"{TAGS[kind]} {t:.6f} {text}\n"


def free_name(folder: Path) -> str:
    """session-YYYYmmdd-HHMMSS (wall-clock time names the file; it never times anything)."""
    base = "session-" + time.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (folder / (name + ".mid")).exists() or (folder / (name + JOURNAL)).exists():
        n += 1
        name = f"{base}-{n}"
    return name


class SessionRecorder:
    def __init__(self, folder: str | Path, origin: float, bpm: float = 120.0, beats_per_bar: int = 4,
                 channels: tuple[int, int] = (0, 1), name: str = "", durable_every_s: float = 30.0) -> None:
        """`origin`: the daemon-clock time that becomes 0:00 of the file (the session start);
        `channels`: the 0-based MIDI channel each track (player, antiphon) is written on;
        `durable_every_s`: session time after which a message also makes a durable point, for
        long stretches without phrase ends (answering switched off, one endless phrase)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name or free_name(self.folder)
        self.mid_path = self.folder / (self.name + ".mid")
        self.journal_path = self.folder / (self.name + JOURNAL)
        self.origin = origin
        self.tracks = SmfTracks(bpm, beats_per_bar, channels)
        self.error: BaseException | None = None
        self.phrases = 0
        self.durable_every_s = durable_every_s
        self._durable_at = 0.0
        self._journal = open(self.journal_path, "x", encoding="utf-8")  # noqa: SIM115 - the writer owns it
        if fcntl is not None:  # tells recover() in another process that this session is alive
            fcntl.flock(self._journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # origin: journal times are seconds from it; with it a test lines them up with its own clock.
        header = {"bpm": bpm, "beats_per_bar": beats_per_bar, "channels": list(channels), "origin": origin}
        self._journal.write(f"{MAGIC} {json.dumps(header)}\n")
        self._journal.flush()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread, never blocks

    def player(self, t: float, msg: list[int] | tuple[int, ...]) -> None:
        self._q.put((PLAYER, t, msg))

    def antiphon(self, t: float, msg: list[int] | tuple[int, ...]) -> None:
        self._q.put((ANTIPHON, t, msg))

    def tempo(self, t: float, bpm: float) -> None:
        self._q.put((TEMPO, t, bpm))

    def marker(self, t: float, text: str) -> None:
        self._q.put((MARKER, t, text))

    def phrase_end(self, t: float) -> None:
        """A durable point: everything handed over so far survives a crash once the writer gets here."""
        self._q.put((PHRASE_END, t, None))

    # ------------------------------------------------------------------ control thread only

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until the writer has handled everything handed over so far (tests, shutdown)."""
        done = threading.Event()
        self._q.put((SYNC, 0.0, done))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> Path:
        """Final .mid, journal removed; returns the .mid path."""
        if self._thread.is_alive():
            self._q.put((CLOSE, 0.0, None))
            self._thread.join(timeout)
        return self.mid_path

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            kind, t, payload = self._q.get()
            if kind == SYNC:
                payload.set()  # type: ignore[union-attr]
            elif kind == CLOSE:
                self._finish()
                return
            elif self.error is None:  # after a failure (disk full) only drain: recording ends, the jam goes on
                self._record(kind, t, payload)

    def _finish(self) -> None:
        try:
            if self.error is None:
                self._durable()
                self._journal.close()
                self.journal_path.unlink()  # the .mid now holds everything
        except Exception as e:  # noqa: BLE001 - reported through .error by the jam loop
            self.error = e
        finally:
            self._journal.close()  # releases the lock: recover() may take what the journal holds

    def _record(self, kind: int, t: float, payload: object) -> None:
        try:
            rel = max(t - self.origin, 0.0)
            self.tracks.apply(kind, rel, payload)
            self._journal.write(_journal_line(kind, rel, payload))
            if kind == PHRASE_END:
                self.phrases += 1
            if kind == PHRASE_END or rel - self._durable_at >= self.durable_every_s:
                self._durable()
                self._durable_at = rel
        except Exception as e:  # noqa: BLE001 - reported through .error by the jam loop
            self.error = e

    def _durable(self) -> None:
        self._journal.flush()
        os.fsync(self._journal.fileno())
        write_atomically(self.mid_path, self.tracks.smf_bytes())


def journal_entries(path: Path) -> tuple[dict, list[tuple[int, float, str]]]:
    """A journal's header and its lines as (kind, session time, text); lines cut short by a crash
    (or otherwise unreadable) are skipped."""
    entries = []
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
        try:
            header = json.loads(first[len(MAGIC):]) if first.startswith(MAGIC) else {}
        except ValueError:
            header = {}
        for line in f:
            if not line.endswith("\n"):
                break  # the crash cut this line short
            try:
                tag, t, text = line[:-1].split(" ", 2)
                entries.append((TAGS.index(tag), float(t), text))
            except ValueError:
                continue
    return header, entries


def read_journal(path: Path) -> SmfTracks:
    """Replay a journal into the tracks it was recording."""
    header, entries = journal_entries(path)
    tracks = SmfTracks(float(header.get("bpm", 120.0)), int(header.get("beats_per_bar", 4)),
                       tuple(header.get("channels", (0, 1))))  # type: ignore[arg-type]
    for kind, t, text in entries:
        try:
            tracks.apply(kind, t, [int(b) for b in text.split()] if kind in (PLAYER, ANTIPHON) else text)
        except ValueError:
            continue
    return tracks


def recover(folder: str | Path) -> list[Path]:
    """Turn every journal that no live session holds into its .mid; returns the files written."""
    written = []
    for journal in sorted(Path(folder).glob("*" + JOURNAL)):
        with open(journal, "rb") as f:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a running session's journal
            mid = journal.with_suffix(".mid")
            write_atomically(mid, read_journal(journal).smf_bytes())
            journal.unlink()
            mid.with_name(mid.name + ".tmp").unlink(missing_ok=True)  # a refresh the crash interrupted
            written.append(mid)
    return written
