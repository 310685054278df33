"""The replay shard: a compact sample of the shipped model's own training music, as package data.

`antiphon tune` mixes it into fine-tuning so that a model learning one player's recordings keeps
answering what that player has not played yet (rehearsal against catastrophic forgetting). The
user's machine usually has no training corpus, so the sample ships with the package
(models/assets/replay.npz, about half a megabyte compressed):

    train_*   excerpts of the corpus's training split, performance and score tokens in the
              proportion the model was trained on, from files whose licence allows
              redistribution (HANNDs performances, MIT; music21 corpus scores, public domain; the
              music21 corpus's traditional ABC tunes)
    check_*   whole works of the corpus's valid_score split (music21, never trained on): tune's
              forgetting check
    meta      JSON: vocabulary, provenance and licence of every excerpt, sha256 of the tokens

Rebuild it from a corpus (`antiphon data build --out data/corpus`) with
    python -c "from antiphon.models.replay import build; build('data/corpus')"
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from antiphon.daemon import vocab as V
from antiphon.daemon.errors import UserError
from antiphon.models import shards

PATH = Path(__file__).resolve().parent / "assets" / "replay.npz"
# Sources, and the licences (as the corpus manifest records them) of the files whose excerpts
# ship; music21 files under CC-BY(-SA) and the Debian packages' MIDI files are left out. The ABC
# tunes are traditional (O'Neill's 1850, Aird's Airs, Ryan's Mammoth Collection...) and come with
# the music21 corpus, whose licence.txt covers the corpus as a whole; they are more than half of
# the training tokens, and without them the replay does not protect them (measured: +0.46
# nats/token on valid_score's ABC tunes after a 10-minute tune, +0.09 on its other scores).
LICENCES = {
    "hannds": ("MIT",),
    "music21": ("music21 corpus: public-domain work, encoding distributed with permission (corpus/license.txt)",
                "Public Domain", "Released to Public Domain in 1998"),
    "abc": ("unstated (traditional tunes in the music21 corpus)",),
}
TRAIN_TOKENS = 400_000
CHECK_TOKENS = 40_000
EXCERPT_TOKENS = 2048  # long enough for several training windows of tune's 512 tokens


def load(path: Path | None = None) -> dict[str, Any]:
    """{"train": docs, "train_kinds": kinds, "check": docs, "meta": {...}}; docs are BOS..EOS arrays."""
    path = path or PATH
    if not path.is_file():
        raise UserError(f"the replay shard {path} is missing from this installation; reinstall antiphon, "
                        "or tune with --replay 0 (the model may then forget what you have not played)")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        V.check_compatible(meta.get("vocab"), meta.get("vocab_size"), f"replay shard {path}")
        out: dict[str, Any] = {"meta": meta, "train_kinds": [shards.KINDS[k] for k in z["train_kinds"]]}
        for part in ("train", "check"):
            tokens, offsets = z[f"{part}_tokens"].astype(np.int64), z[f"{part}_offsets"]
            out[part] = [tokens[a:b] for a, b in itertools.pairwise(offsets)]
    return out


def write(path: Path, train: Sequence[np.ndarray], train_kinds: Sequence[str], check: Sequence[np.ndarray],
          meta: dict[str, Any]) -> Path:
    """Documents are token bodies without BOS/EOS; they are framed as the corpus frames them."""
    def flat(docs):
        framed = [np.concatenate([[V.BOS], np.asarray(d, dtype=np.int64), [V.EOS]]) for d in docs]
        offsets = np.cumsum([0] + [len(d) for d in framed]).astype(np.int64)
        tokens = np.concatenate(framed).astype(np.uint16) if framed else np.empty(0, np.uint16)
        return tokens, offsets

    (tt, to), (ct, co) = flat(train), flat(check)
    digest = hashlib.sha256(tt.tobytes() + ct.tobytes()).hexdigest()
    meta = {**meta, "vocab": json.loads(V.metadata()["vocab"]), "vocab_size": V.VOCAB_SIZE, "sha256": digest,
            "train_tokens": int(tt.size), "check_tokens": int(ct.size)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, train_tokens=tt, train_offsets=to, check_tokens=ct, check_offsets=co,
                        train_kinds=np.array([shards.KINDS.index(k) for k in train_kinds], dtype=np.uint8),
                        meta=np.array(json.dumps(meta)))
    tmp.replace(path)
    return path


def _manifest_docs(data: Path, split: str) -> list[tuple[dict[str, Any], np.ndarray]]:
    """(manifest row, document body) for the original (not augmented) documents of a split.

    The split file holds, in manifest order, each record's document followed (train only) by its
    augmented copies; the manifest's token counts say where each record's copies end."""
    tokens, offsets = shards.read_split(data, split)
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines() if line.strip()]
    out, i = [], 0
    for row in rows:
        if row.get("split") != split:
            continue
        body = np.asarray(tokens[offsets[i] + 1:offsets[i + 1] - 1], dtype=np.int64)
        if body.size != row["tokens"]:
            raise UserError(f"{data}: manifest and {split}.bin disagree at {row['path']}; rebuild the corpus")
        out.append((row, body))
        i += 1
        aug = 0
        while aug < row.get("aug_tokens", 0):
            aug += int(offsets[i + 1] - offsets[i] - 2)
            i += 1
    return out


def _excerpts(body: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to two excerpts of EXCERPT_TOKENS, each starting just after a TIME_SHIFT (at a moment in
    time, not inside a chord's events); short documents whole."""
    if body.size <= EXCERPT_TOKENS:
        return [body]
    shifts = np.flatnonzero((body[:-EXCERPT_TOKENS] >= V.TIME_SHIFT) & (body[:-EXCERPT_TOKENS] < V.VELOCITY)) + 1
    if shifts.size == 0:
        return [body[:EXCERPT_TOKENS]]
    starts = np.sort(rng.choice(shifts, size=min(2, shifts.size), replace=False))
    return [body[s:s + EXCERPT_TOKENS] for s in starts]


def shippable(row: dict[str, Any]) -> bool:
    return row.get("license") in LICENCES.get(row.get("source", ""), ())


def build(data: str | Path, out: Path = PATH, train_tokens: int = TRAIN_TOKENS, check_tokens: int = CHECK_TOKENS,
          seed: int = 0) -> Path:
    data = Path(data)
    rng = np.random.default_rng(seed)
    train = [(r, b) for r, b in _manifest_docs(data, "train") if shippable(r)]
    kinds = {k: sum(int(r["tokens"]) + int(r.get("aug_tokens", 0)) for r, _ in _manifest_docs(data, "train")
                    if r["kind"] == k) for k in shards.KINDS}
    perf_share = kinds["performance"] / max(1, sum(kinds.values()))
    picked: list[tuple[dict[str, Any], np.ndarray]] = []
    for kind, budget in (("performance", perf_share * train_tokens), ("score", (1 - perf_share) * train_tokens)):
        pool = [x for x in train if x[0]["kind"] == kind]
        got = 0
        for j in rng.permutation(len(pool)):
            if got >= budget:
                break
            for ex in _excerpts(pool[j][1], rng):
                picked.append((pool[j][0], ex))
                got += ex.size
    check: list[tuple[dict[str, Any], np.ndarray]] = []
    pool = [(r, b) for r, b in _manifest_docs(data, "valid_score") if shippable(r)]
    for j in rng.permutation(len(pool)):
        if sum(b.size for _, b in check) >= check_tokens:
            break
        check.append(pool[j])
    describe = lambda r, b: {"source": r["source"], "path": r["path"], "sha256": r["sha256"], "kind": r["kind"],
                             "licence": r["license"], "tokens": int(b.size)}
    manifest_sha = hashlib.sha256((data / "manifest.jsonl").read_bytes()).hexdigest()
    meta = {"what": "replay shard for antiphon tune: excerpts of the training split, whole valid_score works",
            "corpus_manifest_sha256": manifest_sha, "seed": seed,
            "performance_share_of_training_tokens": round(perf_share, 4),
            "licences_allowed": LICENCES, "train": [describe(r, b) for r, b in picked],
            "check": [describe(r, b) for r, b in check]}
    return write(out, [b for _, b in picked], [r["kind"] for r, _ in picked], [b for _, b in check], meta)
