"""`antiphon render`: a real piano-roll PNG and a real FluidSynth WAV of a real performance."""

from __future__ import annotations

import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from antiphon.daemon import codec

SATIE = Path(__file__).parent / "data" / "satie_gymnopedie1_hannds.mid"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def antiphon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "antiphon", *args], capture_output=True, text=True, timeout=300, check=False)


def test_render_png_and_wav_of_a_real_performance(tmp_path, fluidsynth):
    png, wav = tmp_path / "roll.png", tmp_path / "out.wav"
    proc = antiphon("render", str(SATIE), "--png", str(png), "--wav", str(wav))
    assert proc.returncode == 0, proc.stderr
    assert png_size(png) == (1600, 600)
    with wave.open(str(wav)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
        seconds = w.getnframes() / w.getframerate()
    rms = np.sqrt(np.mean(audio ** 2))
    assert rms > 100, f"the render is silent (RMS {rms:.1f})"
    length = codec.load_midi(SATIE).duration
    assert length <= seconds <= length + 3.0, "audio length matches the MIDI (plus the synth's release tail)"
    assert not list(tmp_path.glob(".*")), "no temporary files are left behind"


def test_render_refuses_bad_input_clearly(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"RIFF not midi")
    proc = antiphon("render", str(bad), "--png", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "bad.mid" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
    proc = antiphon("render", str(SATIE))
    assert proc.returncode == 2 and "--png" in proc.stderr


def answer_coloured_pixels(png: Path) -> int:
    import matplotlib.image

    from antiphon.daemon.offline.render import ANSWER_RGB

    rgb = matplotlib.image.imread(str(png))[..., :3]
    return int((np.abs(rgb - np.array(ANSWER_RGB)).max(axis=-1) < 0.2).sum())


def test_a_jam_recording_renders_with_the_answer_in_its_own_colour(tmp_path, fluidsynth):
    """A session file as `jam --record` writes it (tracks "player" and "antiphon", tempo) renders to
    a picture whose answer-coloured area is the answer's notes, not only the legend's swatch."""
    from antiphon.daemon.recorder import SessionRecorder

    rec = SessionRecorder(tmp_path, origin=50.0, bpm=100.0, name="session")
    for k in range(3):
        for i in range(6):
            t = 50.0 + 6.0 * k + 0.3 * i
            rec.player(t, [0x90, 55 + i, 80])
            rec.player(t + 0.25, [0x80, 55 + i, 0])
            rec.antiphon(t + 3.0, [0x91, 67 + i, 90])
            rec.antiphon(t + 3.4, [0x81, 67 + i, 0])
        rec.phrase_end(50.0 + 6.0 * k + 5.5)
    session = rec.close()
    png, wav, solo = tmp_path / "session.png", tmp_path / "session.wav", tmp_path / "solo.png"
    proc = antiphon("render", str(session), "--png", str(png), "--wav", str(wav))
    assert proc.returncode == 0, proc.stderr
    assert antiphon("render", str(SATIE), "--png", str(solo)).returncode == 0
    assert png_size(png) == (1600, 600)
    assert answer_coloured_pixels(png) > 5 * answer_coloured_pixels(solo) + 1000  # solo: the legend alone
    with wave.open(str(wav)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    assert np.sqrt(np.mean(audio ** 2)) > 100
