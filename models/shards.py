"""The corpus on disk: one flat uint16 token file per split plus document offsets.

    DIR/{split}.bin        uint16 tokens; every document is BOS ... EOS
    DIR/{split}.docs.npy   int64 offsets, n_docs + 1 entries (doc i is bin[off[i]:off[i+1]])
    DIR/{split}.kinds.npy  uint8 per document: index into KINDS (what sort of music it is), so
                           training can weight real performance against scores by share

Flat files memory-map, so training reads random windows without loading the corpus.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from antiphon.daemon import vocab as V
from antiphon.daemon.errors import UserError

SPLITS = ("train", "valid_perf", "valid_score")
KINDS = ("performance", "score", "sequenced")  # augmented copies of scores count as scores


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_split(out_dir: str | Path, split: str, docs: Iterable[Sequence[int]],
                kinds: Sequence[str] | None = None) -> int:
    """Write documents (token lists without BOS/EOS) atomically; returns the token count.

    `kinds`: one of KINDS per document (None: all "performance")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    chunks = []
    for doc in docs:
        arr = np.empty(len(doc) + 2, dtype=np.uint16)
        arr[0], arr[-1] = V.BOS, V.EOS
        arr[1:-1] = doc
        chunks.append(arr)
        offsets.append(offsets[-1] + len(arr))
    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint16)
    codes = np.zeros(len(chunks), dtype=np.uint8) if kinds is None else np.array(
        [KINDS.index(k) for k in kinds], dtype=np.uint8)
    if codes.size != len(chunks):
        raise ValueError(f"{len(chunks)} documents but {codes.size} kinds")
    tmp_bin, tmp_off = out_dir / f".{split}.bin.tmp", out_dir / f".{split}.docs.tmp.npy"
    tmp_kind = out_dir / f".{split}.kinds.tmp.npy"
    tokens.tofile(tmp_bin)
    np.save(tmp_off, np.asarray(offsets, dtype=np.int64))
    np.save(tmp_kind, codes)
    tmp_kind.replace(out_dir / f"{split}.kinds.npy")
    tmp_bin.replace(out_dir / f"{split}.bin")
    tmp_off.replace(out_dir / f"{split}.docs.npy")
    return int(tokens.size)


def read_kinds(data_dir: str | Path, split: str, n_docs: int) -> np.ndarray:
    """uint8 codes into KINDS, one per document; a corpus built before kinds were recorded is refused."""
    path = Path(data_dir) / f"{split}.kinds.npy"
    if not path.is_file():
        raise UserError(f"{path}: missing (the corpus predates per-document kinds); rebuild it with "
                        "`antiphon data build`, or train with --perf-share 0")
    codes = np.load(path)
    if codes.shape != (n_docs,):
        raise UserError(f"{path}: {codes.size} kinds for {n_docs} documents; rebuild the corpus")
    return codes


def read_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens as a read-only uint16 memmap, int64 document offsets)."""
    data_dir = Path(data_dir)
    bin_path, off_path = data_dir / f"{split}.bin", data_dir / f"{split}.docs.npy"
    if not bin_path.is_file() or not off_path.is_file():
        raise UserError(f"{data_dir}: no '{split}' split found ({bin_path.name}, {off_path.name}); "
                        "build the corpus first with `antiphon data build --out DIR`")
    offsets = np.load(off_path)
    size = bin_path.stat().st_size // 2
    if offsets.ndim != 1 or offsets.size == 0 or offsets[-1] != size:
        raise UserError(f"{bin_path}: token file and offsets disagree (corrupt or half-written corpus); "
                        "rebuild it with `antiphon data build`")
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r") if size else np.empty(0, dtype=np.uint16)
    if size and int(tokens.max(initial=0)) >= V.VOCAB_SIZE:
        raise UserError(f"{bin_path}: holds tokens outside this vocabulary (v{V.VOCAB.version}, "
                        f"{V.VOCAB_SIZE} tokens); rebuild the corpus with this antiphon version")
    return tokens, offsets
