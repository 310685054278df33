"""`antiphon tokenize`: show exactly what the model sees of a MIDI file."""

from __future__ import annotations

import json
from collections import Counter

from antiphon.daemon import codec
from antiphon.daemon import vocab as V

# Long enough that tokenize never shortens a real note: the round trip shows the encoding,
# not the live decoder's safety limit.
ROUND_TRIP_MAX_NOTE_S = 600.0


def summarize(path: str) -> tuple[codec.Performance, list[int], dict]:
    perf = codec.load_midi(path)
    if not perf.notes:
        raise codec.MidiFileError(f"{path}: holds no notes outside drum tracks; nothing to tokenize")
    tokens = codec.encode_performance(perf)
    kinds = Counter(V.kind(t) for t in tokens)
    stats = {"file": str(path), "notes": len(perf.notes), "tokens": len(tokens),
             "seconds": round(perf.duration, 3), "tokens_per_second": round(len(tokens) / max(perf.duration, 1e-9), 2),
             "by_kind": dict(sorted(kinds.items()))}
    return perf, tokens, stats


def main(args) -> int:
    _perf, tokens, stats = summarize(args.input)
    if args.output:
        decoded = codec.decode_performance(tokens, max_note_s=ROUND_TRIP_MAX_NOTE_S)
        codec.write_midi({"tokens": decoded}, args.output)
        stats["output"] = args.output
        stats["output_notes"] = len(decoded.notes)
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"{stats['file']}: {stats['notes']} notes, {stats['tokens']} tokens, {stats['seconds']} s "
              f"({stats['tokens_per_second']} tokens/s)")
        for k, n in stats["by_kind"].items():
            print(f"  {k:<11} {n}")
        if args.output:
            print(f"wrote decode(encode(input)) to {args.output} ({stats['output_notes']} notes)")
    if args.tokens:
        print("\n".join(V.describe_token(t) for t in tokens))
    return 0
