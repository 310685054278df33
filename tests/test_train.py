"""`antiphon train` on a tiny real corpus: learning, exact resume, DDP on gloo, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from antiphon.daemon import cli
from antiphon.daemon import vocab as V
from antiphon.models import window_augment
from antiphon.models.checkpoint import load_model
from antiphon.models.data import WindowSampler, load_split, transpose
from antiphon.models.shards import write_split

TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "64", "--context", "128", "--seq-len", "64",
        "--batch-size", "8", "--eval-batches", "2", "--warmup-steps", "5", "--lr", "0.003", "--threads", "1",
        "--device", "cpu"]


def chorale_docs(n: int) -> list[list[int]]:
    """Bach chorales from the music21 corpus, played at 120 bpm, through the real codec."""
    from music21 import corpus

    from antiphon.daemon import codec

    docs = []
    for path in sorted(corpus.getComposer("bach"))[:n]:
        notes = [codec.Note(p.midi, float(x.offset) * 0.5, float(x.offset + x.quarterLength) * 0.5, 80)
                 for x in corpus.parse(path).flatten().notes for p in x.pitches]
        docs.append(codec.encode_performance(codec.Performance(notes, [])))
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """12 chorales and a real performance (about 9k tokens): train 9 chorales + the performance,
    valid_perf 1 chorale, valid_score 2 chorales. About 2 s."""
    from antiphon.daemon import codec

    docs = chorale_docs(12)
    perf = codec.encode_file(Path(__file__).parent / "data" / "satie_gymnopedie1_hannds.mid")
    root = tmp_path_factory.mktemp("corpus")
    write_split(root, "train", docs[:9] + [perf], ["score"] * 9 + ["performance"])
    write_split(root, "valid_perf", docs[9:10], ["score"])
    write_split(root, "valid_score", docs[10:], ["score"] * 2)
    return root


def train(capsys, *argv: str) -> int:
    rc = cli.main(["train", *argv])
    capsys.readouterr()
    return rc


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_decreases_and_writes_run(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, "--data", str(corpus_dir), "--out", str(out), "--steps", "60", "--eval-every", "30",
                 *TINY) == 0
    evals = [r for r in log_rows(out) if "valid_score" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["valid_score"] < evals[0]["valid_score"] - 1.0  # from ~ln(391)=5.97 to well below
    assert evals[-1]["valid_perf"] < evals[0]["valid_perf"]
    _, cfg, meta = load_model(out / "best.pt")
    assert cfg.vocab_size == V.VOCAB_SIZE and meta["step"] == 60 and "optimizer" not in meta
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_is_exact(corpus_dir, tmp_path, capsys):
    args = ["--data", str(corpus_dir), "--steps", "16", "--eval-every", "100", "--dropout", "0.1", *TINY]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(capsys, *args, "--out", str(straight)) == 0
    assert train(capsys, *args, "--out", str(resumed), "--stop-at", "8") == 0
    half = torch.load(resumed / "last.pt", weights_only=True)
    assert half["step"] == 8
    # Resume with no configuration flags: everything must come from the checkpoint.
    assert train(capsys, "--out", str(resumed), "--data", str(corpus_dir), "--resume") == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["valid"] == b["valid"]
    losses = lambda out: [(r["step"], r["train_loss"]) for r in log_rows(out) if "train_loss" in r]
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 16


def test_ddp_two_processes_on_gloo(corpus_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun leaves a folder there
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "antiphon.daemon.cli", "train", "--data", str(corpus_dir), "--out", str(out),
         "--steps", "30", "--eval-every", "30", *TINY],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, _, meta = load_model(out / "last.pt")
    assert meta["step"] == 30 and meta["tokens_seen"] == 30 * 8 * 64 * 2  # two ranks' batches per step
    evals = [r for r in log_rows(out) if "valid_score" in r]
    assert evals[-1]["valid_score"] < evals[0]["valid_score"] - 0.5


def test_resume_refuses_other_vocabulary_and_keeps_checkpoint(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, "--data", str(corpus_dir), "--out", str(out), "--steps", "2", "--eval-every", "2",
                 *TINY) == 0
    assert cli.main(["train", "--data", str(corpus_dir), "--out", str(out), "--resume", "--d-model", "32"]) == 2
    assert "cannot change the model's shape" in capsys.readouterr().err
    ck = torch.load(out / "last.pt", weights_only=True)
    ck["vocab"]["time_step_ms"] = 20  # as if trained by a version with a coarser time grid
    torch.save(ck, out / "last.pt")
    before = (out / "last.pt").read_bytes()
    assert cli.main(["train", "--data", str(corpus_dir), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different token vocabulary" in err and "time_step_ms" in err
    assert (out / "last.pt").read_bytes() == before
    # Without --resume an existing run is not overwritten either.
    assert cli.main(["train", "--data", str(corpus_dir), "--out", str(out), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err


def test_missing_and_corrupt_data_dir(corpus_dir, tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "no 'train' split" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in corpus_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "train.bin").write_bytes((corpus_dir / "train.bin").read_bytes()[:1000])  # a half-written file
    assert cli.main(["train", "--data", str(broken), "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "b" / "last.pt").exists()


def test_transpose_shifts_notes_only_and_stays_on_keyboard():
    rng = np.random.default_rng(0)
    row = [V.BOS, V.note_on(60), V.time_shift(10), V.note_off(60), V.velocity(90), V.note_on(125), V.EOS]
    out = transpose(np.array([row] * 200), rng)
    shifts = out[:, 1] - row[1]
    assert set(np.unique(shifts)) == set(range(-6, 3))  # 125 + 2 = 127 is the top of the keyboard
    assert (out[:, 3] - row[3] == shifts).all() and (out[:, 5] - row[5] == shifts).all()
    assert (out[:, [0, 2, 4, 6]] == np.array(row)[[0, 2, 4, 6]]).all()


def test_perf_share_draws_that_share_of_windows_from_performances(corpus_dir):
    split = load_split(str(corpus_dir), "train", 65, with_kinds=True)
    perf_lo, perf_hi = int(split.offsets[-2]), int(split.offsets[-1])  # the Satie is the last document
    rng = np.random.default_rng(1)
    for share, lo, hi in ((1.0, 1.0, 1.0), (0.5, 0.4, 0.6), (0.0, 0.0, 0.4)):
        sampler = WindowSampler(split, 64, share, augment=False)
        x, y = sampler.batch(400, rng)
        assert x.shape == y.shape == (400, 64) and (x[:, 1:] == y[:, :-1]).all()
        # A window from the performance holds its tokens; a chorale window cannot (no pedal, other notes).
        tokens = np.asarray(split.tokens[perf_lo:perf_hi], dtype=np.int64)
        starts = [int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens, 8) == row[:8]).all(1)).size > 0)
                  for row in x]
        assert lo <= np.mean(starts) <= hi, (share, np.mean(starts))


def test_perf_share_needs_kinds_and_performances(corpus_dir, tmp_path):
    split = load_split(str(corpus_dir), "valid_score", 65, with_kinds=True)  # chorales only
    with pytest.raises(Exception, match="no performance documents"):
        WindowSampler(split, 64, 0.5)
    (tmp_path / "c").mkdir()
    for f in corpus_dir.iterdir():
        if not f.name.endswith(".kinds.npy"):
            (tmp_path / "c" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(Exception, match="rebuild it"):
        load_split(str(tmp_path / "c"), "train", 65, with_kinds=True)


def test_performance_variation_changes_tempo_and_dynamics_not_the_notes():
    from antiphon.daemon import codec

    tokens = np.array(codec.encode_file(Path(__file__).parent / "data" / "satie_gymnopedie1_hannds.mid"))
    seconds = lambda t: V.STEP_S * sum(x - V.TIME_SHIFT + 1 for x in t if V.TIME_SHIFT <= x < V.VELOCITY)
    events = lambda t: [x for x in t if x < V.TIME_SHIFT or x >= V.SUSTAIN_ON]
    ratios, loudness = [], []
    for seed in range(20):
        out = window_augment.vary(tokens, np.random.default_rng(seed))
        assert events(out) == events(tokens)  # notes and pedal in the same order: only time and velocity move
        ratios.append(seconds(out) / seconds(tokens))
        perf = codec.decode_performance(out)
        loudness.append(np.mean([n.velocity for n in perf.notes]))
    assert 0.86 < min(ratios) < 0.97 and 1.03 < max(ratios) < 1.14  # ±10 % tempo, with drift
    base = np.mean([n.velocity for n in codec.decode_performance(list(tokens)).notes])
    assert min(loudness) < 0.9 * base and max(loudness) > 1.1 * base


def test_init_fine_tunes_from_a_checkpoint_and_records_its_parent(corpus_dir, tmp_path, capsys):
    parent = tmp_path / "parent"
    assert train(capsys, "--data", str(corpus_dir), "--out", str(parent), "--steps", "30", "--eval-every", "30",
                 *TINY) == 0
    child = tmp_path / "child"
    tiny = ["--seq-len", "64", "--batch-size", "8", "--eval-batches", "2", "--warmup-steps", "5", "--lr", "0.001",
            "--threads", "1", "--device", "cpu"]
    assert train(capsys, "--data", str(corpus_dir), "--out", str(child), "--steps", "10", "--eval-every", "10",
                 "--perf-share", "0.5", "--init", str(parent / "last.pt"), *tiny) == 0
    _, cfg, meta = load_model(child / "last.pt")
    _, _, parent_meta = load_model(parent / "last.pt")
    assert cfg.d_model == 64 and cfg.n_layer == 2  # the parent's shape, taken without shape flags
    assert meta["parent_run_id"] == parent_meta["run_id"] != meta["run_id"]
    step0 = log_rows(child)[0]
    assert step0["step"] == 0 and abs(step0["valid_score"] - parent_meta["valid"]["valid_score"]) < 1e-6
    # A shape that differs from the checkpoint's is refused, naming both.
    assert cli.main(["train", "--data", str(corpus_dir), "--out", str(tmp_path / "bad"), "--init",
                     str(parent / "last.pt"), "--d-model", "32", *tiny]) == 2
    err = capsys.readouterr().err
    assert "d_model 64 there, 32 here" in " ".join(err.split())


def test_a_half_precision_copy_loads_as_the_same_model_and_fine_tunes(corpus_dir, tmp_path, capsys):
    """What ships (models/ship.py): fp16 weights, no optimizer, read everywhere as fp32."""
    from antiphon.models.checkpoint import save_half

    run = tmp_path / "run"
    assert train(capsys, "--data", str(corpus_dir), "--out", str(run), "--steps", "6", "--eval-every", "6", *TINY) == 0
    half = tmp_path / "half.pt"
    save_half(run / "last.pt", half)
    raw = torch.load(half, weights_only=True)
    assert "optimizer" not in raw and {v.dtype for v in raw["model"].values()} == {torch.float16}
    assert half.stat().st_size < 0.6 * (run / "best.pt").stat().st_size
    full, _, meta = load_model(run / "last.pt")
    halved, _, half_meta = load_model(half)
    assert half_meta["run_id"] == meta["run_id"] and next(halved.parameters()).dtype == torch.float32
    x = torch.tensor([[V.BOS, V.note_on(60), V.time_shift(50), V.note_off(60)]])
    with torch.no_grad():
        assert torch.allclose(full(x)[0], halved(x)[0], atol=2e-2)
    assert train(capsys, "--data", str(corpus_dir), "--out", str(tmp_path / "child"), "--steps", "2",
                 "--eval-every", "2", "--init", str(half), *TINY) == 0


def test_shipping_appends_the_run_to_the_shipped_models_lineage(tmp_path, monkeypatch):
    from antiphon.models import ship

    record = tmp_path / "default.json"
    stages = [{"stage": 1, "run_id": "a", "tokens_seen": 100, "wall_s": 10.0},
              {"stage": 2, "run_id": "b", "tokens_seen": 50, "wall_s": 5.5}]
    record.write_text(json.dumps({"run_id": "b", "lineage": {"stages": stages}}))
    monkeypatch.setattr(ship, "RECORD", record)
    meta = {"run_id": "c", "step": 7, "tokens_seen": 30, "wall_s": 2.0}
    got = ship.lineage(meta, "stage three", "antiphon train --init models/assets/default.pt")
    assert [s["run_id"] for s in got["stages"]] == ["a", "b", "c"]
    assert got["stages"][-1] == {"stage": 3, "run_id": "c", "what": "stage three", "steps": 7, "tokens_seen": 30,
                                 "wall_s": 2.0, "command": "antiphon train --init models/assets/default.pt"}
    assert (got["tokens_seen_total"], got["wall_s_total"]) == (180, 17.5)
    # Shipping the same run again replaces its stage instead of adding one.
    record.write_text(json.dumps({"lineage": got}))
    assert [s["run_id"] for s in ship.lineage(meta, "again", "")["stages"]] == ["a", "b", "c"]


def test_heldout_scores_every_token_once_in_side_by_side_windows():
    from antiphon.daemon.config import ModelConfig
    from antiphon.models.gpt import GPT
    from antiphon.models.heldout import split_nll

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=V.VOCAB_SIZE)).eval()
    tokens = np.random.default_rng(0).integers(V.PAD + 1, 100, 40)  # no padding; windows 0-16, 16-32, 32-39 (a short last one)
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(torch.from_numpy(w[None, :-1]))[0][0], torch.from_numpy(w[1:]),
                                                 reduction="sum") for w in (tokens[0:17], tokens[16:33], tokens[32:40])]
    assert split_nll(model, tokens, 16, batch=2) == pytest.approx(float(sum(nll)) / 39, rel=1e-5)
