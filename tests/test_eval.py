"""`antiphon eval`, the Markov baseline and the musical metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from antiphon.daemon import cli, codec
from antiphon.daemon import vocab as V
from antiphon.daemon.memory import SessionMemory
from antiphon.models import metrics as M
from antiphon.models.markov import MarkovModel, baseline_for
from antiphon.models.shards import write_split

SATIE = Path(__file__).parent / "data" / "satie_gymnopedie1_hannds.mid"


@pytest.fixture(scope="module")
def corpus_and_midi(tmp_path_factory) -> tuple[Path, Path]:
    """A corpus of 8 Bach chorales (music21) and a MIDI folder of 2 other chorales + the Satie
    performance, written with the codec's MIDI writer. About 2 s."""
    from music21 import corpus

    perfs = []
    for path in sorted(corpus.getComposer("bach"))[:10]:
        notes = [codec.Note(p.midi, float(x.offset) * 0.5, float(x.offset + x.quarterLength) * 0.5, 80)
                 for x in corpus.parse(path).flatten().notes for p in x.pitches]
        perfs.append(codec.Performance(notes, []))
    root = tmp_path_factory.mktemp("eval")
    docs = [codec.encode_performance(p) for p in perfs]
    for split, part in (("train", docs[:8]), ("valid_perf", docs[8:9]), ("valid_score", docs[9:])):
        write_split(root / "corpus", split, part)
    midi = root / "midi"
    midi.mkdir()
    for i, p in enumerate(perfs[8:]):
        codec.write_midi({"piano": p}, midi / f"chorale{i}.mid")
    (midi / "satie.mid").write_bytes(SATIE.read_bytes())
    return root / "corpus", midi


def test_markov_prefers_repetition_and_stays_finite():
    rng = np.random.default_rng(0)
    motif = rng.integers(V.NOTE_ON, V.VELOCITY, size=24)
    model = MarkovModel.fit(np.concatenate([[V.BOS], np.tile(motif, 40), [V.EOS]]), max_order=8)
    repeated = model.token_nll(np.concatenate([[V.BOS], np.tile(motif, 3)]))
    random = model.token_nll(rng.integers(1, V.VOCAB_SIZE, size=73))  # mostly never-seen contexts and tokens
    assert np.isfinite(random).all() and np.isfinite(repeated).all()
    assert repeated.mean() < 0.5 < math.log(V.VOCAB_SIZE) < random.mean()
    # The sampling distribution is the same model as the scores: it sums to 1 and agrees token by token.
    seq = np.concatenate([[V.BOS], motif, motif[:5]])
    p = model.distribution(seq[:-1])
    assert p.sum() == pytest.approx(1.0) and (p > 0).sum() >= V.VOCAB_SIZE - 1  # all but PAD
    assert -math.log(p[seq[-1]]) == pytest.approx(model.token_nll(seq)[-1])


def test_baseline_is_cached_by_corpus_hash(corpus_and_midi):
    data, _ = corpus_and_midi
    first = baseline_for(data, max_order=6)
    cached = list(data.glob("markov-*-o6-*.npz"))
    assert len(cached) == 1
    again = baseline_for(data, max_order=6)
    doc = np.asarray(codec.encode_file(SATIE)[:500])
    assert np.array_equal(first.token_nll(doc), again.token_nll(doc))
    # A corpus with other training data gets its own cache entry, not the stale one.
    write_split(data, "train", [doc.tolist()])
    baseline_for(data, max_order=6)
    assert len(list(data.glob("markov-*-o6-*.npz"))) == 2


def test_eval_json_against_baseline(corpus_and_midi, tiny_model, capsys):
    data, midi = corpus_and_midi
    for model_path in (tiny_model.checkpoint, tiny_model.onnx):
        session = [] if model_path == tiny_model.onnx else ["--no-session"]  # streaming one is enough
        rc = cli.main(["eval", "--model", str(model_path), "--midi", str(midi), "--data", str(data), "--json",
                       "--phrases", "2", "--markov-order", "6", *session])
        out = capsys.readouterr().out
        assert rc == 0
        result = json.loads(out)
        expected_tokens = sum(len(codec.encode_file(f)) for f in sorted(midi.iterdir()))
        assert result["files"] == 3 and result["tokens"] == expected_tokens
        assert 0 < result["model_nll"] < 20 and 0 < result["baseline_nll"] < 20
        assert result["ratio"] == pytest.approx(result["model_nll"] / result["baseline_nll"])
        assert set(result["metrics"]) == {"phrases", "model", "baseline", "truth", "ratio_to_truth"}
        assert result["metrics"]["phrases"] == 2 and set(result["metrics"]["truth"]) == set(M.METRICS)
        if model_path == tiny_model.checkpoint:
            assert "session" not in result
            torch_nll = result["model_nll"]
            continue
        session = result["session"]
        assert 0 < session["nll_with_memory"] < 20 and 0 < session["nll_without_memory"] < 20
        # Streamed with jam's slide (keep half, prefill afresh) the model sees less history than the
        # stride-half windows; both score every token.
        assert session["nll_without_memory"] == pytest.approx(result["model_nll"], rel=0.15)
    assert result["model_nll"] == pytest.approx(torch_nll, rel=1e-3)  # ONNX and PyTorch score alike


def test_streamed_session_memory_pays_off_when_the_player_repeats(tiny_model):
    from antiphon.daemon.engine import Engine
    from antiphon.models import session_eval as SE

    piece = codec.encode_file(SATIE)[:400]
    lm = Engine(str(tiny_model.onnx), log=lambda _: None)
    s = SE.stream(lm, [[V.BOS] + piece + piece])  # 801 tokens through a 128-token window: it slides
    notes = sum(V.NOTE_ON <= t < V.NOTE_OFF for t in piece)
    assert s["logp"].size == 800 and s["target"].size == 2 * notes and s["pitch_logp"].shape == (2 * notes, 128)
    # The second time through, the memory knows every note: its long matches all predict right.
    second = s["match"][notes + 8:, -1]
    assert (second >= 6).mean() > 0.9
    assert SE.nll(s, *SE.shipped_constants()) < SE.nll(s) - 0.05
    best = SE.fit(s)
    assert best["nll"] <= SE.nll(s, *SE.shipped_constants()) and best["nll_without"] == SE.nll(s)
    # The shipping rule: the largest top-voice weight still below the model alone, none above it.
    chosen = SE.rule(s)
    rows = chosen["by_top_weight"]
    assert rows[str(chosen["top_weight"])]["nll"] < SE.nll(s)
    assert all(r["nll"] >= SE.nll(s) for top, r in rows.items() if float(top) > chosen["top_weight"])


def test_sliding_window_scores_every_token_once(tiny_model):
    from antiphon.models.evaluate import TorchLM, sliding_nll

    lm = TorchLM(str(tiny_model.checkpoint))
    tokens = [V.BOS] + codec.encode_file(SATIE)[:300]  # 301 tokens, context 128: four windows
    nll = sliding_nll(lm, tokens)
    assert nll.shape == (300,) and np.isfinite(nll).all()
    first = lm.logits_for(tokens[:128]).astype(np.float64)
    first = first - np.log(np.exp(first).sum(-1, keepdims=True))
    assert np.allclose(nll[:127], -first[np.arange(127), tokens[1:128]], atol=1e-4)
    # Stride 64: windows start at 0, 64, 128, 192; token 200 is first unscored in the window at 128
    # (the one at 64 ends at 191), where it has 72 tokens of history: window position 71 predicts it.
    window = lm.logits_for(tokens[128:256]).astype(np.float64)
    logp = window - np.log(np.exp(window).sum(-1, keepdims=True))
    assert nll[199] == pytest.approx(-logp[71, tokens[200]], abs=1e-4)


def test_eval_refuses_empty_folder(corpus_and_midi, tmp_path, capsys):
    data, _ = corpus_and_midi
    assert cli.main(["eval", "--model", str(tmp_path / "x.pt"), "--midi", str(tmp_path), "--data", str(data)]) == 2
    assert "no such model file" in capsys.readouterr().err


# --------------------------------------------------------------------------- metrics on hand-made phrases

def phrase(pitches: list[int], step_s: float = 0.25, hold_s: float = 0.2, close: bool = True) -> list[int]:
    notes = [codec.Note(p, i * step_s, i * step_s + hold_s, 80) for i, p in enumerate(pitches)]
    tokens = codec.encode_performance(codec.Performance(notes, []))
    return tokens if close else [t for t in tokens if not (V.NOTE_OFF <= t < V.TIME_SHIFT)]


C_MAJOR = [60, 62, 64, 65, 67, 69, 71, 72]


def test_key_agreement_prefers_the_calls_scale():
    call = phrase(C_MAJOR * 2)
    in_key = M.phrase_metrics(call, phrase([72, 71, 69, 67, 65, 64, 62, 60]), 4.0, 2.0)
    chromatic = M.phrase_metrics(call, phrase(list(range(60, 72))), 4.0, 3.0)
    assert in_key["key_agreement"] == 1.0
    assert chromatic["key_agreement"] == pytest.approx(7 / 12)
    assert M.best_key(M.notes_of(phrase([57, 60, 64, 57, 60, 64, 59, 62, 56, 57])))[:2] == (9, "minor")


def test_density_range_closed_and_repetition():
    call = phrase(C_MAJOR * 2)  # 16 notes in 4 s
    slow_high = M.phrase_metrics(call, phrase([84, 86, 88, 89], step_s=1.0), 4.0, 4.0)
    assert slow_high["density_ratio"] == pytest.approx(0.25)
    assert slow_high["range_overlap"] == 0.0
    same = M.phrase_metrics(call, call, 4.0, 4.0)
    assert same["density_ratio"] == 1.0 and same["range_overlap"] == 1.0 and same["closed"] == 1.0
    assert M.closed_share(phrase([60, 64, 67], close=False)) == 0.0
    looping = M.repetition(M.notes_of(phrase([60, 64, 67, 64] * 4)))
    straight = M.repetition(M.notes_of(phrase(list(range(48, 64)))))
    wandering = M.repetition(M.notes_of(phrase([60, 61, 63, 66, 70, 75, 69, 62, 54, 63, 73, 62])))
    assert wandering == 0.0 < looping and straight == pytest.approx(11 / 12)


def test_motif_echo_held_velocity_rhythm_and_copies():
    motif = [60, 64, 62, 67]
    call = phrase(motif * 4)
    varied = M.phrase_metrics(call, phrase([v + 5 for v in motif] * 2 + [70, 71, 59, 61]), 4.0, 3.0)
    unrelated = M.phrase_metrics(call, phrase([60, 61, 63, 66, 70, 75, 69, 62]), 4.0, 2.0)
    assert unrelated["motif_echo"] == 0.0
    # The transposed motif's intervals are the call's: 6 of its 9 3-interval grams occur in the call.
    assert varied["motif_echo"] == pytest.approx(5 / 9)
    assert varied["copied"] == 0.0  # transposed: no exact copy
    verbatim = M.phrase_metrics(call, call[:len(call) // 2], 4.0, 2.0)
    assert verbatim["copied"] == 1.0 and verbatim["motif_echo"] == 1.0
    drones = M.phrase_metrics(call, phrase([48, 52, 55, 60], step_s=0.1, hold_s=3.0), 4.0, 1.4)
    assert drones["held_share"] == 0.0  # clipped at the 1.4 s window: none sounds 1.5 s inside it
    drones = M.phrase_metrics(call, phrase([48, 52, 55, 60], step_s=0.1, hold_s=3.0), 4.0, 4.0)
    assert drones["held_share"] == 1.0
    assert M.phrase_metrics(call, call, 4.0, 4.0)["held_share"] == 0.0
    soft = [codec.Note(60 + i, i * 0.25, i * 0.25 + 0.2, 30 + 10 * (i % 2)) for i in range(8)]
    soft_tokens = codec.encode_performance(codec.Performance(soft, []))
    m = M.phrase_metrics(call, soft_tokens, 4.0, 2.0)
    assert 30 <= m["velocity_mean"] <= 40 and 4 <= m["velocity_std"] <= 6
    assert M.phrase_metrics(call, call, 4.0, 4.0)["rhythm"] == 1.0
    assert M.phrase_metrics(call, phrase(motif * 2, step_s=1.0), 4.0, 4.0)["rhythm"] == 0.0


def test_onsets_30_ms_apart_are_one_cluster_wherever_they_fall():
    """As the daemon counts them (memory.CLUSTER_STEPS): a chord spread over 30 ms is one cluster
    wherever its float onsets land (1.23 - 1.2 > 0.03 in floats), one spread over 40 ms is two."""
    def clusters(start: float, spread_s: float) -> int:
        notes = [codec.Note(48, 0.0, 0.2, 80), codec.Note(60, start, start + 0.5, 80),
                 codec.Note(64, start + spread_s, start + 0.5, 80)]
        return len(M.onset_clusters(M.notes_of(codec.encode_performance(codec.Performance(notes, [])))))

    for start in (0.5, 1.2, 7.77, 123.45):
        assert clusters(start, 0.03) == 2, start  # the first note, then the chord
        assert clusters(start, 0.04) == 3, start


def test_the_rhythm_metric_counts_in_the_steers_classes_wherever_an_interval_falls():
    """eval measures rhythm in the classes the rhythm steer aims at (sampling.ioi_classes): a
    200 ms interval is one class at 0 s and at 123.45 s, though 123.65 - 123.45 < 0.2 in floats."""
    from antiphon.daemon.sampling import call_rhythm

    for start in (0.0, 1.23, 123.45):
        for k in (4, 7, 20, 50, 99, 200, 350):  # steps: a beat of k * 10 ms
            notes = [codec.Note(60, start + i * k * V.STEP_S, start + i * k * V.STEP_S + 0.02, 80) for i in range(6)]
            hist = M.ioi_histogram(M.notes_of(codec.encode_performance(codec.Performance(notes, []))))
            steer = call_rhythm(np.array([n.start for n in notes]))
            assert hist.max() == 1.0 and hist.argmax() == steer.argmax(), (start, k)
    assert M.ioi_histogram(M.notes_of(codec.encode_performance(codec.Performance(
        [codec.Note(60, 0.2 * i, 0.2 * i + 0.05, 80) for i in range(6)], [])))).argmax() == 11


def test_streamed_nll_mixes_the_top_voice_as_jam_does(tiny_model):
    from antiphon.daemon.engine import Engine
    from antiphon.daemon.memory import mix_pitch, mix_top
    from antiphon.models import session_eval as SE

    piece = codec.encode_file(SATIE)[:300]
    lm = Engine(str(tiny_model.onnx), log=lambda _: None)
    s = SE.stream(lm, [[V.BOS] + piece + piece], variants=(("interval", 6),))
    banded = ~np.isnan(s["top_add"]).all(axis=1)
    assert banded.mean() > 0.5  # the second time through, the top voice proposes at most note-ons
    # Row by row, as the sampler mixes (memory.mix_pitch, then memory.mix_top), recomputed here,
    # at the shipped weights, at half the top voice's, and without it.
    variant, weight, half_order, top_weight = SE.shipped_constants()
    for scale in (1.0, 0.5, 0.0):
        jam = SessionMemory()
        rows, i = [], 0
        for tok in piece + piece:
            if V.NOTE_ON <= tok < V.NOTE_OFF:
                w, p = jam.propose()
                mixed = mix_pitch(s["pitch_logp"][i].astype(np.float64), w, p)
                w_top, *top = jam.propose_top()
                rows.append(mix_top(mixed, scale * w_top, *top))
                i += 1
            jam.hear_token(tok)
        mixed = np.array(rows)
        mixed -= mixed.max(axis=1, keepdims=True)
        mixed -= np.log(np.exp(mixed).sum(axis=1, keepdims=True))
        by_rows = -(mixed[np.arange(i), s["target"]] - s["pitch_logp"][np.arange(i), s["target"]]).sum()
        expected = (-s["logp"].sum() + by_rows) / s["logp"].size
        assert SE.nll(s, variant, weight, half_order, scale * top_weight) == pytest.approx(expected, rel=1e-5), scale
