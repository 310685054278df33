"""Held-out NLL of checkpoints as the stage table in docs/model.md gives it: every token of each
held-out split scored once, in windows of the model's context laid side by side (so a window's
first tokens have little context: these figures run a little above `antiphon eval`'s sliding
window). For comparing checkpoints of one run or of several stages; run from a checkout:

    python -m antiphon.models.heldout runs/NAME/best.pt models/assets/default.pt [--data data/corpus]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

SPLITS = ("valid_perf", "valid_score")


def split_nll(model, tokens: np.ndarray, context: int, batch: int = 8) -> float:
    import torch
    import torch.nn.functional as F

    from antiphon.daemon import vocab as V

    step = context  # a window of context + 1 tokens predicts `context` of them; the next starts at its last
    starts = range(0, max(1, tokens.size - 1), step)
    total, count = 0.0, 0
    windows = [np.asarray(tokens[s:s + context + 1], dtype=np.int64) for s in starts]
    windows = [w for w in windows if w.size >= 2]
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = windows[i:i + batch]
            n = max(w.size for w in chunk)
            x = torch.full((len(chunk), n), V.PAD, dtype=torch.long)
            for j, w in enumerate(chunk):
                x[j, :w.size] = torch.from_numpy(w)
            logits, _ = model(x[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), ignore_index=V.PAD,
                                           reduction="sum"))
            count += int((x[:, 1:] != V.PAD).sum())
    return total / max(1, count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m antiphon.models.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", default="data/corpus", help="corpus built by `antiphon data build`")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from antiphon.models.checkpoint import load_model
    from antiphon.models.data import load_split

    torch.set_num_threads(args.threads)
    for path in args.checkpoints:
        model, cfg, _ = load_model(path)
        row = {name: round(split_nll(model, load_split(args.data, name, 2).tokens, cfg.context), 4) for name in SPLITS}
        print(json.dumps({"checkpoint": path, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
