"""`antiphon continue`: continue a MIDI file offline with the daemon's engine and sampling.

The input is read the way the daemon hears a keyboard (tracks merged, drums dropped, fed
through the streaming encoder); the answer comes from the same Engine, Sampler, grammar
mask and TokenDecoder the daemon runs. The original tracks are kept note for note (in
their own ticks) and the continuation is added as one more track, "antiphon", on a channel
of its own.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.answer import answer_decoder
from antiphon.daemon.config import Steers
from antiphon.daemon.engine import Engine
from antiphon.daemon.errors import UserError
from antiphon.daemon.offline.render import ANSWER_TRACK
from antiphon.daemon.sampling import Sampler, grammar_mask, jam_sampler

DEFAULT_SECONDS = 8.0
CALL_S = 8.0


def continue_tokens(engine: Engine, context: list[int], seconds: float, sampler: Sampler,
                    max_note_s: float = 4.0, max_tokens: int = 20000) -> codec.Performance:
    """Sample until `seconds` of music have passed after the context; every note is closed.
    The sampler's session memory has learned the whole input, as jam's would have (it keeps
    what the window drops)."""
    if sampler.memory is not None:
        sampler.memory.hear_tokens(context)
    if len(context) >= engine.context:
        context = context[-(engine.context // 2):]  # the daemon's slide policy: keep the recent half
    engine.rollback(0)
    logits = engine.prefill([V.BOS] + context if len(context) < engine.context - 1 else context)
    enc = codec.TokenEncoder()
    enc.velocity_bin = next((t - V.VELOCITY for t in reversed(context) if V.VELOCITY <= t < V.SUSTAIN_ON), -1)
    decoder = answer_decoder(enc, 0, max_note_s)
    mask = np.ones(V.VOCAB_SIZE, dtype=bool)
    messages: list[codec.TimedMessage] = []
    for _ in range(max_tokens):
        token = sampler.sample(logits, grammar_mask(decoder, mask), decoder)
        if V.TIME_SHIFT <= token < V.VELOCITY and decoder.time + (token - V.TIME_SHIFT + 1) * V.STEP_S > seconds:
            break
        decoder.feed(token, messages)
        if engine.length >= engine.context:
            logits = engine.slide(engine.context // 2)
        logits = engine.decode(token)
    decoder.close(messages)
    return codec.messages_to_performance(messages)


def _bar_seconds(score) -> float:
    bpm = float(score.tempos[0].qpm) if len(score.tempos) else 120.0
    beats = int(score.time_signatures[0].numerator) if len(score.time_signatures) else 4
    return beats * 60.0 / bpm


def continue_file(in_path: str, out_path: str, seconds: float | None, bars: float | None, seed: int,
                  steers: Steers, model: str = "") -> dict:
    import symusic

    perf = codec.load_midi(in_path)
    if not perf.notes:
        raise UserError(f"{in_path}: holds no notes outside drum tracks; give antiphon something to answer")
    score = symusic.Score(in_path)  # original ticks, kept exactly
    seconds_score = score.to("second")
    length = bars * _bar_seconds(score) if bars is not None else (seconds if seconds is not None else DEFAULT_SECONDS)
    if length <= 0:
        raise UserError("the continuation length must be positive")

    engine = Engine(model or None, threads=1)
    sampler = jam_sampler(None if seed < 0 else seed, steers)
    # The call is the input's last CALL_S seconds: the rate of what was just played, not of the piece.
    last = max(n.start for n in perf.notes)
    sampler.begin_call([n for n in perf.notes if n.start > last - CALL_S],
                       min(CALL_S, last - min(n.start for n in perf.notes)))
    context = codec.encode_performance(perf)
    answer = continue_tokens(engine, context, length, sampler)

    # The context ends at the call's last event; the answer's time 0 is that moment.
    events = codec.to_events(perf)
    call_end = events[-1].time if events else 0.0
    track = symusic.Track(name=ANSWER_TRACK, program=0, is_drum=False, ttype="second")
    for n in answer.notes:
        track.notes.append(symusic.Note(call_end + n.start, max(n.end - n.start, 0.0), n.pitch, n.velocity,
                                        ttype="second"))
    for t, down in answer.sustain:
        track.controls.append(symusic.ControlChange(call_end + t, codec.CC_SUSTAIN, 127 if down else 0,
                                                    ttype="second"))
    # Convert the answer to ticks through the input's own tempo map, so the DAW sees it in time.
    carrier = symusic.Score(score.tpq, ttype="second")
    carrier.tempos = seconds_score.tempos
    carrier.tracks.append(track)
    score.tracks.append(carrier.to("tick").tracks[0])

    target = Path(out_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".mid", dir=target.parent)
    os.close(fd)
    try:
        score.dump_midi(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"input_notes": len(perf.notes), "answer_notes": len(answer.notes), "seconds": round(length, 3),
            "output": str(target)}


def main(args) -> int:
    stats = continue_file(args.input, args.output, args.seconds, args.bars, args.seed, Steers.of(args), args.model)
    print(f"{args.input}: {stats['input_notes']} notes; added {stats['answer_notes']} notes over "
          f"{stats['seconds']} s on track '{ANSWER_TRACK}' → {stats['output']}")
    return 0
