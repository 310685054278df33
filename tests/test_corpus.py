"""`antiphon data build` on real sources: shards, manifest, splits, corrupt files, reproducibility."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.config import DataConfig
from antiphon.models import augment as A
from antiphon.models import corpus, shards
from antiphon.models import sources as S

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"source", "path", "sha256", "license", "split", "kind", "group", "notes", "tokens", "seconds",
          "aug_tokens", "skipped"}


def _melody(pitches, step=0.5, offset=0, velocity=80) -> codec.Performance:
    notes = [codec.Note(p + offset, i * step, i * step + step * 0.9, velocity) for i, p in enumerate(pitches)]
    return codec.Performance(notes, [])


TUNE = [60, 62, 64, 65, 67, 65, 64, 62, 60, 67, 69, 71, 72, 71, 69, 67, 65, 64, 62, 60]


@pytest.fixture(scope="module")
def builds(tmp_path_factory, abc2midi):
    root = tmp_path_factory.mktemp("corpus")
    cache = root / "cache"
    wheel_dir = REPO / "data" / "cache" / "pip"
    if wheel_dir.is_dir():  # reuse a wheel a full build already fetched (pip download otherwise)
        shutil.copytree(wheel_dir, cache / "pip")
    midi = root / "mine"
    midi.mkdir()
    codec.write_midi({"a": _melody(TUNE)}, midi / "tune.mid")
    (midi / "sub").mkdir()
    codec.write_midi({"a": _melody(TUNE[::-1], step=0.3)}, midi / "sub" / "other.mid")
    (midi / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage that is not a MIDI file")
    outs = []
    for name in ("a", "b"):
        cfg = DataConfig(out=str(root / name), midi=str(midi), sources="hannds,music21,abc", cache=str(cache),
                         workers=2, max_files=4, augment_copies=1, seed=3)
        stats = corpus.build(cfg)
        outs.append((root / name, stats))
    return outs


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_shards_match_manifest(builds):
    out, stats = builds[0]
    rows = _manifest(out)
    assert rows and all(set(r) == FIELDS for r in rows)
    for split in shards.SPLITS:
        tokens, offsets = shards.read_split(out, split)
        used = [r for r in rows if r["split"] == split]
        assert used, f"no {split} documents"
        n_docs = len(used) + (sum(1 for r in used if r["aug_tokens"]) if split == "train" else 0)
        assert offsets.size - 1 == n_docs
        assert tokens.size == sum(r["tokens"] + r["aug_tokens"] + 2 * (1 + bool(r["aug_tokens"])) for r in used)
        assert tokens[offsets[:-1]].tolist() == [V.BOS] * n_docs
        assert stats["splits"][split]["tokens"] == sum(r["tokens"] + r["aug_tokens"] for r in used)
    for r in rows:
        assert len(r["sha256"]) == 64 and r["license"]
        if r["skipped"]:
            assert r["split"] is None and r["tokens"] == 0
        else:
            assert r["notes"] > 0 and r["tokens"] > r["notes"] and r["seconds"] > 0 and r["group"]
    # the first HANNDs document is exactly what the daemon's codec makes of that file
    train = [r for r in rows if r["split"] == "train"]  # documents: each file, then its augmented copies
    index = [i + sum(1 for r in train[:i] if r["aug_tokens"]) for i in range(len(train))]
    i = next(i for i, r in enumerate(train) if r["source"] == "hannds")
    tokens, offsets = shards.read_split(out, "train")
    doc = tokens[offsets[index[i]] + 1:offsets[index[i] + 1] - 1].tolist()
    assert doc == codec.encode_file(out.parent / "cache" / "hannds" / train[i]["path"])


def test_corrupt_file_is_counted_not_fatal(builds):
    out, stats = builds[0]
    rows = {(r["source"], r["path"]): r for r in _manifest(out)}
    broken = rows[("midi", "broken.mid")]
    assert broken["skipped"].startswith("unreadable") and broken["split"] is None
    assert rows[("midi", "sub/other.mid")]["split"] == "train"
    assert stats["skipped"]["midi"] == {"unreadable": 1}
    assert any("1 unreadable" in w for w in stats["warnings"])
    # licence exclusions are listed with their reason, and never read
    assert all(r["skipped"].startswith("licence") for k, r in rows.items() if k[0] == "essen")
    assert any(k[1].startswith("palestrina/") and r["skipped"].startswith("licence") for k, r in rows.items())


def test_heldout_groups_are_disjoint_and_exported(builds):
    out, _ = builds[0]
    rows = [r for r in _manifest(out) if r["split"]]
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    perf = [r for r in rows if r["split"] == "valid_perf"]
    assert perf and all(r["source"] == "hannds" and r["group"].split(":")[1] in S.HANNDS_HELDOUT for r in perf)
    assert not any(r["source"] == "hannds" and r["group"].split(":")[1] in S.HANNDS_HELDOUT
                   for r in rows if r["split"] == "train")
    assert {r["source"] for r in rows if r["split"] == "valid_score"} <= set(corpus.SCORE_SOURCES)
    for split in ("valid_perf", "valid_score"):
        files = sorted((out / "heldout" / split).glob("*.mid"))
        assert len(files) == sum(1 for r in rows if r["split"] == split)
        notes = sorted(len(codec.load_midi(f).notes) for f in files)
        assert notes == sorted(r["notes"] for r in rows if r["split"] == split)


def test_two_builds_are_byte_identical(builds):
    (a, _), (b, _) = builds
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files_a) > 8
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_duplicate_tunes_share_a_group():
    """The same tune transposed and re-timed in two collections lands in one group, one split."""
    perfs = {("abc", "x.abc#0001"): _melody(TUNE), ("abc", "y.abc#0007"): _melody(TUNE, step=0.37, offset=5),
             ("abc", "z.abc#0002"): _melody(TUNE[::-1])}
    items = [S.Item(src, path, "", "score", "l", "abc") for src, path in perfs]
    recs = [{"source": it.source, "path": it.path, "skipped": "", "_fp": corpus.fingerprint(perfs[it[:2]])}
            for it in items]
    corpus.assign_splits(recs, items, seed=1)
    assert recs[0]["group"] == recs[1]["group"] != recs[2]["group"]
    assert recs[0]["split"] == recs[1]["split"]
    assert {r["split"] for r in recs} == {"train", "valid_score"}  # one of the two groups is held out


def test_augmentation_is_seeded_and_humanizes():
    score = _melody(TUNE * 4, step=0.25)
    one = A.augment(score, A.work_rng(7, "abc/x", 0))
    assert one == A.augment(score, A.work_rng(7, "abc/x", 0))
    assert one != A.augment(score, A.work_rng(7, "abc/x", 1))
    shift = {n.pitch - m.pitch for n, m in zip(sorted(one.notes, key=lambda n: n.start), score.notes)}
    assert len(shift) == 1 and -5 <= shift.pop() <= 6  # one transposition, order kept
    assert len({n.velocity for n in one.notes}) > 5  # a flat-velocity score gets a velocity curve
    ioi = np.diff([n.start for n in sorted(one.notes, key=lambda n: n.start)])
    assert ioi.std() > 0.002 and np.all(ioi > -0.1)  # jitter and drift, never far out of order
