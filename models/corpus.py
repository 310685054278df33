"""`antiphon data build`: read every source, encode it as the daemon would, split, shard.

    DIR/{train,valid_perf,valid_score}.bin/.docs.npy   token shards (models/shards.py)
    DIR/manifest.jsonl     one line per source file (ABC: per tune), including skipped ones
    DIR/stats.json         files, notes, hours, tokens per split and per source; licences
    DIR/heldout/valid_perf/*.mid, DIR/heldout/valid_score/*.mid   for `antiphon eval --midi`

Splits never cut a work: HANNDs composers are held out whole (valid_perf); score works are
grouped by work folder and by a transposition-invariant melody fingerprint, so the same tune
in two collections lands on one side, and whole groups are held out (valid_score). Results
are sorted before anything is written, so the output is byte-identical for the same inputs
and seed however the worker processes were scheduled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from itertools import pairwise
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon.config import DataConfig
from antiphon.daemon.errors import UserError
from antiphon.models import augment as A
from antiphon.models import shards
from antiphon.models import sources as S

VALID_SCORE_SHARE = 0.05  # share of score work groups (per source) held out as valid_score
SCORE_SOURCES = ("music21", "abc", "essen")


# --------------------------------------------------------------------------- one item (in a worker)

def fingerprint(perf: codec.Performance, n_intervals: int = 24) -> str:
    """Hash of the first melodic intervals of the top voice, repeated pitches collapsed."""
    top: dict[int, int] = {}
    for n in perf.notes:
        k = round(n.start * 100)
        top[k] = max(top.get(k, 0), n.pitch)
    mel = [top[k] for k in sorted(top)]
    mel = [p for i, p in enumerate(mel) if i == 0 or p != mel[i - 1]]
    iv = [b - a for a, b in pairwise(mel)][:n_intervals]
    if len(iv) < 12:
        return ""
    return hashlib.sha1(bytes((x + 128) % 256 for x in iv)).hexdigest()[:16]


def read_item(item: S.Item) -> codec.Performance:
    if item.reader == "music21":
        return S.read_music21(item.file)
    if item.reader == "abc":
        with tempfile.TemporaryDirectory(prefix="antiphon-abc-") as tmp:
            return codec.load_midi(S.abc_to_midi(item.text, Path(tmp)))
    return codec.load_midi(item.file)


def _sha256(item: S.Item) -> str:
    data = item.text.encode("latin-1", "replace") if item.reader == "abc" else Path(item.file).read_bytes()
    return hashlib.sha256(data).hexdigest()


def process(task: tuple[S.Item, int, int]) -> dict[str, Any]:
    """Read, encode and (scores) augment one item; never raises: failures become `skipped`."""
    item, copies, seed = task
    rec: dict[str, Any] = {"source": item.source, "path": item.path, "license": item.license,
                           "kind": item.kind, "sha256": "", "notes": 0, "tokens": 0, "seconds": 0.0,
                           "skipped": item.skip, "_fp": "", "_doc": None, "_aug": [], "_aug_s": 0.0, "_notes": None}
    try:
        rec["sha256"] = _sha256(item)
        if item.skip:
            return rec
        warnings.simplefilter("ignore")
        perf = read_item(item)
        if not perf.notes:
            rec["skipped"] = "no notes"
            return rec
        doc = np.asarray(codec.encode_performance(perf), dtype=np.uint16)
        starts = min(n.start for n in perf.notes)
        rec.update(notes=len(perf.notes), tokens=int(doc.size), seconds=round(perf.duration - starts, 3), _doc=doc)
        if item.kind == "score":
            rec["_fp"] = fingerprint(perf)
            rec["_notes"] = np.array([(n.pitch, n.start, n.end, n.velocity) for n in perf.notes], dtype=np.float64)
            for c in range(copies):
                aug = A.augment(perf, A.work_rng(seed, f"{item.source}/{item.path}", c))
                rec["_aug"].append(np.asarray(codec.encode_performance(aug), dtype=np.uint16))
                rec["_aug_s"] += aug.duration - min(n.start for n in aug.notes)
    except Exception as e:  # noqa: BLE001 -- a corrupt or unparseable file is counted, never fatal
        msg = re.sub(r"\S*antiphon-abc-[^/\s]*/", "", " ".join(str(e).split()))[:200]  # no temp paths
        rec.update(skipped=f"unreadable: {type(e).__name__}: {msg}", notes=0, tokens=0, seconds=0.0,
                   _doc=None, _aug=[], _aug_s=0.0, _notes=None, _fp="")
    return rec


# --------------------------------------------------------------------------- gathering and splitting

def _groups(recs: list[dict[str, Any]], items: list[S.Item]) -> None:
    """Set rec['group']: fixed groups as given; score works joined by work folder and fingerprint."""
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    keys: list[list[str]] = []
    for rec, it in zip(recs, items):
        if it.group:
            ks = [it.group]
        else:
            own = S.music21_work_key(it.path) if it.source == "music21" else f"work:{it.source}:{it.path}"
            ks = [own] + ([f"fp:{rec['_fp']}"] if rec["_fp"] else [])
        for k in ks[1:]:
            union(ks[0], k)
        keys.append(ks)
    for rec, ks in zip(recs, keys):
        rec["group"] = find(ks[0])


def assign_splits(recs: list[dict[str, Any]], items: list[S.Item], seed: int) -> None:
    _groups(recs, items)
    home: dict[str, str] = {}  # score group -> source of its first member (records are sorted)
    for rec in recs:
        if rec["source"] in SCORE_SOURCES and not rec["skipped"]:
            home.setdefault(rec["group"], rec["source"])
    held: set[str] = set()
    for src in SCORE_SOURCES:
        gs = sorted((hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(), g) for g, s in home.items() if s == src)
        if len(gs) >= 2:
            held.update(g for _, g in gs[:max(1, round(VALID_SCORE_SHARE * len(gs)))])
    for rec in recs:
        if rec["skipped"]:
            rec["split"] = None
        elif rec["source"] == "hannds":
            rec["split"] = "valid_perf" if rec["group"].split(":", 1)[1] in S.HANNDS_HELDOUT else "train"
        elif rec["source"] in SCORE_SOURCES and rec["group"] in held:
            rec["split"] = "valid_score"
        else:
            rec["split"] = "train"


# --------------------------------------------------------------------------- writing

def _heldout_name(rec: dict[str, Any]) -> str:
    """'abc', 'airdsAirs/book1.abc#0003' -> 'abc__airdsAirs__book1_0003.mid' (unique per record)."""
    path = re.sub(r"\.(mxl|xml|musicxml|krn|abc)(?=#|$)", "", rec["path"])
    stem = f"{rec['source']}__{path}".replace("/", "__").replace("#", "_")
    return stem if stem.lower().endswith(S.MIDI_SUFFIXES) else stem + ".mid"


def write_outputs(out: Path, recs: list[dict[str, Any]], items: list[S.Item]) -> None:
    docs: dict[str, list[np.ndarray]] = {s: [] for s in shards.SPLITS}
    kinds: dict[str, list[str]] = {s: [] for s in shards.SPLITS}
    for rec in recs:
        if rec["split"]:
            docs[rec["split"]].append(rec["_doc"])
            kinds[rec["split"]].append(rec["kind"])
            if rec["split"] == "train":
                docs["train"].extend(rec["_aug"])
                kinds["train"].extend([rec["kind"]] * len(rec["_aug"]))
    for split in shards.SPLITS:
        shards.write_split(out, split, docs[split], kinds[split])
    for split in ("valid_perf", "valid_score"):
        folder = out / "heldout" / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for rec, it in zip(recs, items):
        if rec["split"] == "valid_perf":
            shutil.copyfile(it.file, out / "heldout" / "valid_perf" / _heldout_name(rec))
        elif rec["split"] == "valid_score":
            notes = [codec.Note(int(p), float(s), float(e), int(v)) for p, s, e, v in rec["_notes"]]
            codec.write_midi({"score": codec.Performance(notes, [])},
                             out / "heldout" / "valid_score" / _heldout_name(rec))
    fields = ("source", "path", "sha256", "license", "split", "kind", "group", "notes", "tokens",
              "seconds", "aug_tokens", "skipped")
    tmp = out / ".manifest.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in recs:
            row = {k: rec[k] for k in fields if k != "aug_tokens"}
            row["aug_tokens"] = int(sum(a.size for a in rec["_aug"])) if rec["split"] == "train" else 0
            f.write(json.dumps({k: row[k] for k in fields}, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(out / "manifest.jsonl")


# --------------------------------------------------------------------------- statistics

def _add(row: dict[str, Any], files: int, notes: int, seconds: float, tokens: int) -> None:
    row["files"] = row.get("files", 0) + files
    row["notes"] = row.get("notes", 0) + notes
    row["hours"] = round(row.get("hours", 0.0) + seconds / 3600.0, 6)
    row["tokens"] = row.get("tokens", 0) + tokens


def statistics(recs: list[dict[str, Any]], problems: list[str], cfg: DataConfig) -> dict[str, Any]:
    splits: dict[str, dict[str, Any]] = {s: {} for s in shards.SPLITS}
    by_source: dict[str, dict[str, Any]] = {}
    licences: dict[str, dict[str, int]] = {}
    skipped: dict[str, dict[str, int]] = {}
    train_real = {"tokens": 0, "seconds": 0.0}
    train_all = {"tokens": 0, "seconds": 0.0}
    for rec in recs:
        src = by_source.setdefault(rec["source"], {"skipped": 0})
        if rec["skipped"]:
            src["skipped"] += 1
            reason = rec["skipped"].split(":", 1)[0]
            skipped.setdefault(rec["source"], {}).setdefault(reason, 0)
            skipped[rec["source"]][reason] += 1
            continue
        licences.setdefault(rec["source"], {}).setdefault(rec["license"], 0)
        licences[rec["source"]][rec["license"]] += 1
        aug = rec["split"] == "train" and bool(rec["_aug"])
        aug_tokens = int(sum(a.size for a in rec["_aug"])) if aug else 0
        aug_s = rec["_aug_s"] if aug else 0.0
        _add(splits[rec["split"]], 1, rec["notes"], rec["seconds"], rec["tokens"])
        _add(src, 1, rec["notes"], rec["seconds"], rec["tokens"])
        src.setdefault("by_split", {}).setdefault(rec["split"], 0)
        src["by_split"][rec["split"]] += 1
        if aug:
            _add(splits["train"], 0, rec["notes"] * len(rec["_aug"]), aug_s, aug_tokens)
            splits["train"]["augmented_tokens"] = splits["train"].get("augmented_tokens", 0) + aug_tokens
            src["augmented_tokens"] = src.get("augmented_tokens", 0) + aug_tokens
        if rec["split"] == "train":
            train_all["tokens"] += rec["tokens"] + aug_tokens
            train_all["seconds"] += rec["seconds"] + aug_s
            if rec["kind"] == "performance":
                train_real["tokens"] += rec["tokens"]
                train_real["seconds"] += rec["seconds"]
    share = {k: round(train_real[k] / train_all[k], 4) if train_all[k] else 0.0 for k in ("tokens", "seconds")}
    return {"config": {"sources": cfg.sources, "midi": bool(cfg.midi), "max_files": cfg.max_files,
                       "augment_copies": cfg.augment_copies, "seed": cfg.seed},
            "vocab_version": codec.V.VOCAB.version,
            "splits": splits, "sources": dict(sorted(by_source.items())),
            "train_performance_share": {"tokens": share["tokens"], "hours": share["seconds"]},
            "licences": licences, "skipped": skipped, "warnings": problems,
            "decisions": {"essen": S.ESSEN_SKIP, "kern": "Palestrina and CCARH Bach kern files carry a "
                          "licensing agreement reserving derivative formats: excluded",
                          "hannds_heldout_composers": list(S.HANNDS_HELDOUT),
                          "valid_score_share_of_groups": VALID_SCORE_SHARE}}


def print_table(stats: dict[str, Any], wall_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"corpus (v{stats['vocab_version']} vocabulary), built in {wall_s:.0f} s")
    for col in ("", "files", "skipped", "notes", "hours", "tokens"):
        table.add_column(col, justify="left" if not col else "right")
    for name, row in stats["splits"].items():
        table.add_row(name, f"{row.get('files', 0):,}", "", f"{row.get('notes', 0):,}",
                      f"{row.get('hours', 0):.1f}", f"{row.get('tokens', 0):,}")
    table.add_section()
    for name, row in stats["sources"].items():
        table.add_row(name, f"{row.get('files', 0):,}", f"{row['skipped']:,}", f"{row.get('notes', 0):,}",
                      f"{row.get('hours', 0):.1f}", f"{row.get('tokens', 0):,}")
    console = Console(stderr=True)
    console.print(table)
    share = stats["train_performance_share"]
    console.print(f"real performance in train: {share['tokens']:.1%} of tokens, {share['hours']:.1%} of hours "
                  "(train includes augmented score copies)")
    for w in stats["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")


# --------------------------------------------------------------------------- command

def build(cfg: DataConfig) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(cfg.out)
    items, problems = S.gather(cfg)
    if not any(not it.skip for it in items):
        raise UserError("no input files: every requested source was empty or unavailable")
    order = sorted(range(len(items)), key=lambda i: (-(len(items[i].text) or _size(items[i].file)), i))
    tasks = [(items[i], cfg.augment_copies, cfg.seed) for i in order]
    workers = cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)
    recs: dict[tuple[str, str], dict[str, Any]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False, console=None) as bar:
        job = bar.add_task("reading sources", total=len(tasks))
        with Pool(workers, maxtasksperchild=500) as pool:
            for rec in pool.imap_unordered(process, tasks, chunksize=2):
                recs[(rec["source"], rec["path"])] = rec
                bar.advance(job)
                if not bar.console.is_terminal and len(recs) % 500 == 0:  # a log line when not on a tty
                    print(f"reading sources: {len(recs)}/{len(tasks)}", file=sys.stderr, flush=True)
    ordered = [recs[(it.source, it.path)] for it in items]
    failed = sum(1 for r in ordered if r["skipped"].startswith("unreadable"))
    if failed:
        problems.append(f"{failed} unreadable file(s) skipped (see 'skipped' in manifest.jsonl)")
    assign_splits(ordered, items, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, ordered, items)
    stats = statistics(ordered, problems, cfg)
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return stats


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def main(args) -> int:
    from antiphon.daemon import cli

    cfg = cli.configs(args, DataConfig)[0]
    t0 = time.monotonic()
    stats = build(cfg)
    print_table(stats, time.monotonic() - t0)
    print(f"wrote {cfg.out}: {', '.join(shards.SPLITS)} shards, manifest.jsonl, stats.json, heldout/", file=sys.stderr)
    return 0
