"""The player's recordings for `antiphon tune`: every readable MIDI file under the folders, read
through the daemon's codec without antiphon's own answer track, duplicates and broken files
skipped and listed; and the newest whole recordings held out to measure the tuned model."""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.errors import UserError
from antiphon.daemon.offline.render import ANSWER_TRACK
from antiphon.models import evaluate as E
from antiphon.models import metrics as M

MIDI_SUFFIXES = (".mid", ".midi")
MIN_HELDOUT_S = E.CALL_S + E.RESPONSE_S + 4.0  # one call and its true answer, with room to find them
MIN_TUNE_S = 60.0
SESSION_NAME = re.compile(r"session-(\d{8})-(\d{6})")


@dataclass
class Recording:
    path: Path
    sha256: str
    tokens: list[int]
    seconds: float
    session: bool  # recorded by `jam --record`: the answer track was dropped
    when: float  # recency: the session's start from its name, else the file's mtime

    def describe(self, role: str) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "tokens": len(self.tokens),
                "seconds": round(self.seconds, 1), "session": self.session, "role": role}


def _when(path: Path) -> float:
    m = SESSION_NAME.search(path.name)
    if m:
        try:
            return time.mktime(time.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S"))
        except ValueError:
            pass
    return path.stat().st_mtime


def player_tokens(path: Path, scratch: Path) -> tuple[list[int], bool]:
    """The codec's tokens of everything but antiphon's own track; (tokens, had an answer track)."""
    import symusic

    try:
        score = symusic.Score(str(path))
    except Exception as e:  # symusic raises bare ValueError/RuntimeError on bad bytes
        raise codec.MidiFileError(f"{path}: not a readable MIDI file ({e})") from e
    answers = [i for i, t in enumerate(score.tracks) if t.name == ANSWER_TRACK]
    if not answers:
        return codec.encode_file(path), False
    for i in reversed(answers):
        score.tracks.pop(i)
    player = scratch / "player.mid"
    score.dump_midi(str(player))  # tempo map kept: the codec reads it as it reads any file
    return codec.encode_file(player), True


def collect(dirs: list[str], log) -> tuple[list[Recording], list[str]]:
    """Every readable recording under `dirs` with notes of the player's, and what was skipped."""
    files: list[Path] = []
    for d in dirs:
        root = Path(d).expanduser()
        if not root.exists():
            raise UserError(f"{d}: no such folder")
        found = [root] if root.is_file() else sorted(root.rglob("*"))
        files += [p for p in found if p.suffix.lower() in MIDI_SUFFIXES]
        files += sorted(root.rglob("*.journal")) if root.is_dir() else []
    recs, skipped, seen = [], [], {}
    with tempfile.TemporaryDirectory(prefix="antiphon-tune-read-") as scratch:
        for path in files:
            if path.suffix == ".journal":
                skipped.append(f"{path}: a session that did not end cleanly; the next `antiphon jam --record "
                               f"{path.parent}` recovers it into its .mid")
                continue
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                skipped.append(f"{path}: same file as {seen[sha]}")
                continue
            try:
                tokens, session = player_tokens(path, Path(scratch))
            except codec.MidiFileError as e:
                skipped.append(str(e))
                continue
            if not any(V.NOTE_ON <= t < V.NOTE_OFF for t in tokens):
                skipped.append(f"{path}: no notes of the player's")
                continue
            seen[sha] = path
            recs.append(Recording(path, sha, tokens, M.duration_s(tokens), session, _when(path)))
    for s in skipped:
        log(f"skipped {s}")
    if not recs:
        where = ", ".join(dirs)
        if not files:
            raise UserError(f"no MIDI files (.mid, .midi) in {where}; record sessions with "
                            "`antiphon jam --record DIR`, or put MIDI files of your playing there")
        raise UserError(f"none of the {len(files)} MIDI files in {where} could be used (see the skipped list above)")
    return recs, skipped


def split_holdout(recs: list[Recording], share: float) -> tuple[list[Recording], list[Recording]]:
    """(to tune on, held out): newest recordings held out until they hold `share` of the playing
    time and at least MIN_HELDOUT_S; whole recordings only, and some left to learn from."""
    if not 0.0 < share < 1.0:
        raise UserError(f"--holdout must be between 0 and 1, got {share}")
    newest_first = sorted(recs, key=lambda r: (r.when, r.path.name), reverse=True)
    total = sum(r.seconds for r in recs)
    need = (f"tuning needs at least {MIN_HELDOUT_S + MIN_TUNE_S:.0f} s of your playing in two or more recordings: "
            f"the newest recordings, at least {MIN_HELDOUT_S:.0f} s, are held out to measure the tuned model, "
            f"and at least {MIN_TUNE_S:.0f} s are learnt from")
    if len(recs) < 2:
        raise UserError(f"found one recording ({recs[0].path.name}, {total:.0f} s); {need}")
    held, held_s = [], 0.0
    for r in newest_first[:-1]:
        if held and held_s >= max(share * total, MIN_HELDOUT_S):
            break
        held.append(r)
        held_s += r.seconds
    tune = newest_first[len(held):]
    tune_s = sum(r.seconds for r in tune)
    if held_s < MIN_HELDOUT_S or tune_s < MIN_TUNE_S:
        raise UserError(f"{len(recs)} recordings hold {total:.0f} s of playing ({held_s:.0f} s would be held out, "
                        f"{tune_s:.0f} s learnt); {need}. Record a few more sessions")
    return tune[::-1], held
