"""`antiphon render`: a piano-roll picture and an audio render of a MIDI file.

Tracks named "antiphon" (as written by `continue` and `jam --record`) are drawn in the
answer colour, everything else in the player's, so call and answer can be told apart.
matplotlib and FluidSynth are imported/run only here: the jam daemon never needs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from antiphon.daemon.errors import UserError

SOUNDFONTS = (  # Debian's standard paths, best first
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
)
ANSWER_TRACK = "antiphon"
PLAYER_RGB, ANSWER_RGB = (0.12, 0.35, 0.75), (0.85, 0.33, 0.10)
PNG_SIZE_PX = (1600, 600)
DPI = 100


def _load(path: str):
    import symusic

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    try:
        score = symusic.Score(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable MIDI file ({e})") from e
    return score


def draw_piano_roll(midi_path: str, png_path: str) -> tuple[int, int]:
    """Write the picture; returns its size in pixels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import PolyCollection
        from matplotlib.patches import Patch
    except ImportError as e:
        raise UserError("drawing needs matplotlib: pip install 'antiphon[render]'") from e

    score = _load(midi_path)
    beats = [float(b) for b in score.to("second").get_beats()] if score.tempos else []
    seconds = score.to("second")
    fig, ax = plt.subplots(figsize=(PNG_SIZE_PX[0] / DPI, PNG_SIZE_PX[1] / DPI), dpi=DPI)
    lo, hi, end = 127, 0, 1.0
    for track in seconds.tracks:
        if track.is_drum or not track.notes:
            continue
        rgb = ANSWER_RGB if track.name.strip().lower() == ANSWER_TRACK else PLAYER_RGB
        boxes, colours = [], []
        for n in track.notes:
            t0, t1, p = float(n.time), float(n.time + max(n.duration, 0.01)), n.pitch
            boxes.append([(t0, p - 0.4), (t1, p - 0.4), (t1, p + 0.4), (t0, p + 0.4)])
            shade = 0.25 + 0.75 * n.velocity / 127  # velocity as opacity: soft notes are pale
            colours.append((*rgb, shade))
            lo, hi, end = min(lo, p), max(hi, p), max(end, t1)
        ax.add_collection(PolyCollection(boxes, facecolors=colours, edgecolors="none"))
    if hi < lo:
        plt.close(fig)
        raise UserError(f"{midi_path}: holds no notes outside drum tracks; nothing to draw")
    for b in beats:
        if b <= end:
            ax.axvline(b, color="0.85", linewidth=0.5, zorder=0)
    ax.set_xlim(0, end)
    ax.set_ylim(lo - 2, hi + 2)
    ax.set_xlabel("time (s)" + (", beat grid from the file's tempo" if beats else ""))
    ax.set_ylabel("MIDI pitch")
    ax.set_title(Path(midi_path).name)
    ax.legend(handles=[Patch(color=PLAYER_RGB, label="player"), Patch(color=ANSWER_RGB, label="antiphon")],
              loc="upper right")
    fig.tight_layout()
    _atomic(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
    return PNG_SIZE_PX


def find_soundfont(explicit: str = "") -> str:
    if explicit:
        if not Path(explicit).is_file():
            raise UserError(f"soundfont {explicit} not found")
        return explicit
    for path in SOUNDFONTS:
        if Path(path).is_file():
            return path
    raise UserError("no General MIDI soundfont found (looked in " + ", ".join(SOUNDFONTS) + "); "
                    "install one: sudo apt-get install fluid-soundfont-gm, or pass --soundfont FILE.sf2")


def render_wav(midi_path: str, wav_path: str, soundfont: str = "") -> None:
    _load(midi_path)  # a clear error for a bad file before FluidSynth prints its own
    fluidsynth = shutil.which("fluidsynth")
    if not fluidsynth:
        raise UserError("rendering audio needs FluidSynth: sudo apt-get install fluidsynth fluid-soundfont-gm")
    sf2 = find_soundfont(soundfont)

    def run(tmp: str) -> None:
        # -g 1.0: FluidSynth's default gain of 0.2 renders barely audible files.
        proc = subprocess.run([fluidsynth, "-ni", "-g", "1.0", "-T", "wav", "-F", tmp, sf2, midi_path],
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0 or not Path(tmp).is_file() or Path(tmp).stat().st_size <= 44:
            raise UserError(f"fluidsynth failed on {midi_path}: {proc.stderr.strip()[-500:]}")

    _atomic(wav_path, run)


def _atomic(path: str, write) -> None:
    """Write through a temporary file in the same folder, so nobody sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from a DAW run as another user
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(args) -> int:
    if not args.png and not args.wav:
        raise UserError("say what to render: --png FILE and/or --wav FILE")
    if args.png:
        w, h = draw_piano_roll(args.input, args.png)
        print(f"wrote {args.png} ({w}x{h} piano roll)")
    if args.wav:
        render_wav(args.input, args.wav, args.soundfont)
        print(f"wrote {args.wav}")
    return 0
