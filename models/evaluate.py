"""`antiphon eval`: model NLL vs the Markov baseline on a folder of MIDI files, plus musical metrics.

NLL is nats per token over exactly the same tokens for both (each file encoded, BOS prepended,
every token after BOS scored). Files longer than the model's context are scored with a sliding
window whose stride is half the context, so every token sees at least context/2 tokens of history.

Musical metrics (models/metrics.py): from each file, 8 s calls at 0, 16, 32 s ...; the model and
the baseline each answer with 8 s sampled with the jam's sampler (by default its temperature,
top-p and density following) under the daemon's grammar mask, and are compared with the true 8 s
that followed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.config import Steers
from antiphon.daemon.errors import UserError
from antiphon.daemon.sampling import Sampler, grammar_mask, jam_sampler
from antiphon.models import metrics as M
from antiphon.models import session_eval as SE
from antiphon.models.markov import MarkovModel, baseline_for

CALL_S = RESPONSE_S = 8.0
ROLLS = 6  # piano rolls drawn with --rolls
MAX_RESPONSE_TOKENS = 800  # a runaway stream of zero-time tokens must still end


class TorchLM:
    """A .pt checkpoint behind the engine's interface: logits_for, prefill/decode with a KV cache."""

    def __init__(self, path: str):
        import torch

        from antiphon.models.checkpoint import load_model

        self.torch = torch
        self.model, cfg, _ = load_model(path)
        self.context = cfg.context
        self.cache: list | None = None

    def logits_for(self, tokens: Sequence[int]) -> np.ndarray:
        with self.torch.inference_mode():
            logits, _ = self.model(self.torch.tensor([list(tokens)], dtype=self.torch.long))
        return logits[0].float().numpy()

    def _step(self, tokens: Sequence[int]) -> np.ndarray:
        with self.torch.inference_mode():
            logits, new = self.model(self.torch.tensor([list(tokens)], dtype=self.torch.long), self.cache)
        self.cache = new if self.cache is None else [
            (self.torch.cat([k0, k1], 1), self.torch.cat([v0, v1], 1)) for (k0, v0), (k1, v1) in zip(self.cache, new)]
        return logits[0, -1].float().numpy()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        self.cache = None
        return self._step(tokens)

    def decode(self, token: int) -> np.ndarray:
        return self._step([token])

    def reset(self) -> None:
        self.cache = None

    @property
    def length(self) -> int:
        return 0 if self.cache is None else int(self.cache[0][0].shape[1])


def load_lm(path: str):
    if path.endswith(".onnx"):
        from antiphon.daemon.engine import Engine

        return Engine(path, threads=min(4, os.cpu_count() or 1), log=lambda m: print(m, file=sys.stderr))
    if not Path(path).is_file():
        raise UserError(f"{path}: no such model file (give a .pt checkpoint or an .onnx model)")
    return TorchLM(path)


def sliding_nll(lm, tokens: Sequence[int]) -> np.ndarray:
    """NLL of tokens[1:] with windows of lm.context and stride context/2."""
    C = lm.context
    stride = max(1, C // 2)
    out = np.empty(len(tokens) - 1)
    done = 0  # targets tokens[1 .. done] are scored
    start = 0
    while done < len(tokens) - 1:
        window = tokens[start:start + C]
        logp = SE.log_softmax(lm.logits_for(window))
        targets = np.asarray(window[1:])
        first = done - start  # window position whose target is the first unscored token
        out[done:start + len(targets)] = -logp[np.arange(first, len(targets)), targets[first:]]
        done = start + len(targets)
        start += stride
    return out


def generate(next_logits: Callable[[list[int]], np.ndarray], prompt: list[int], seconds: float,
             sampler: Sampler) -> list[int]:
    """Sample until `seconds` of TIME_SHIFTs (or EOS); the grammar mask follows the decoder's ledger."""
    decoder = codec.TokenDecoder()
    for t in prompt:
        decoder.feed(t)
    target, steps, out = round(seconds / V.STEP_S), 0, []
    mask = np.empty(V.VOCAB_SIZE, dtype=bool)
    while steps < target and len(out) < MAX_RESPONSE_TOKENS:
        tok = sampler.sample(next_logits(out), grammar_mask(decoder, mask), decoder)
        if tok == V.EOS:
            break
        out.append(tok)
        decoder.feed(tok)
        if V.TIME_SHIFT <= tok < V.VELOCITY:
            steps += tok - V.TIME_SHIFT + 1
    return out


def lm_sampler(lm, prompt: list[int]) -> Callable[[list[int]], np.ndarray]:
    """next_logits for a model with a KV cache; a full context keeps its last half and re-prefills."""
    lm.reset()
    state = {"logits": lm.prefill(prompt[-lm.context:]), "seq": list(prompt[-lm.context:])}

    def next_logits(out: list[int]) -> np.ndarray:
        if out:
            state["seq"].append(out[-1])
            if lm.length >= lm.context:
                state["seq"] = state["seq"][-(lm.context // 2):]
                lm.reset()
                state["logits"] = lm.prefill(state["seq"])
            else:
                state["logits"] = lm.decode(out[-1])
        return np.array(state["logits"], dtype=np.float32)
    return next_logits


def markov_sampler(baseline: MarkovModel, prompt: list[int]) -> Callable[[list[int]], np.ndarray]:
    """next_logits for the baseline: log of its distribution (PAD, the one zero, is masked anyway)."""
    return lambda out: np.log(baseline.distribution(np.array(prompt + out)) + 1e-300)


def phrases(docs: list[list[int]], n: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(session before the call, call, true continuation), 8 s + 8 s, taken round-robin over files
    so none dominates. The session before the call is what the session memory has heard."""
    per_file = []
    for doc in docs:
        body, found, pos = doc[1:], [], 0
        while pos < len(body):
            rest = body[pos:]
            cut = M.split_at(rest, CALL_S)
            end = M.split_at(rest[cut:], RESPONSE_S) + cut
            call, truth = rest[:cut], rest[cut:end]
            if end >= len(rest) or M.duration_s(truth) < RESPONSE_S - 0.5:
                break
            if len(M.notes_of(call)) >= 4:
                found.append((body[:pos], call, truth))
            pos += end
        per_file.append(found)
    out = []
    for i in range(max((len(f) for f in per_file), default=0)):
        out += [f[i] for f in per_file if i < len(f)]
    return out[:n]


def phrase_names(names: Sequence[str], docs: list[list[int]], n: int) -> list[tuple[str, int]]:
    """(file name, call start in seconds) of each phrase, in phrases()'s order."""
    per_file = [[(name, round(M.duration_s(before))) for before, _, _ in phrases([doc], 10**6)]
                for name, doc in zip(names, docs)]
    out = []
    for i in range(max((len(f) for f in per_file), default=0)):
        out += [f[i] for f in per_file if i < len(f)]
    return out[:n]


def musical_metrics(lm, baseline: MarkovModel, docs: list[list[int]], n: int, seed: int, steers: Steers,
                    rolls: str = "", names: Sequence[str] = ()) -> dict:
    """`rolls`: a folder to draw the first ROLLS calls' piano rolls into (call, answer, truth)."""
    rows: dict[str, list] = {"model": [], "baseline": [], "truth": []}
    pairs = phrases(docs, n)
    for i, (before, call, truth) in enumerate(pairs):
        prompt = [V.BOS] + call
        samplers = [jam_sampler(seed + i, steers), jam_sampler(seed + i, steers, with_memory=False)]
        samplers[0].memory.hear_tokens(before + call)  # the session so far, as jam's memory has heard it
        call_notes = M.notes_of(call)
        for s in samplers:
            s.begin_call(call_notes, CALL_S)
        model_out = generate(lm_sampler(lm, prompt), prompt, RESPONSE_S, samplers[0])
        base_out = generate(markov_sampler(baseline, prompt), prompt, RESPONSE_S, samplers[1])
        for name, resp in (("model", model_out), ("baseline", base_out), ("truth", truth)):
            rows[name].append(M.phrase_metrics(call, resp, CALL_S, RESPONSE_S))
        if rolls and i < ROLLS:
            from antiphon.models.plots import plot_call_answer_truth

            Path(rolls).mkdir(parents=True, exist_ok=True)
            label = f"held-out call {i}" + (f" ({names[i]})" if i < len(names) else "")
            plot_call_answer_truth(call_notes, M.notes_of(model_out), M.notes_of(truth), CALL_S,
                                   Path(rolls) / f"call-{i:02d}.png", label)
    means = {name: M.summarize(r) for name, r in rows.items()}
    # How far each generator lands from what the player actually did next (1 = same as the truth).
    ratio = {gen: {m: means[gen][m] / means["truth"][m] if means["truth"][m] else math.nan for m in M.METRICS}
             for gen in ("model", "baseline")}
    return {"phrases": len(pairs), **means, "ratio_to_truth": ratio}


def _finite(x):
    """NaN/inf (an undefined metric) as JSON null, so the output is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def midi_files(folder: str, limit: int) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--midi {folder}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    if not files:
        raise UserError(f"--midi {folder}: no .mid/.midi files in it")
    return files[:limit] if limit > 0 else files


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    log = lambda msg: console.print(f"[dim]{msg}[/]")
    if not args.model:
        from antiphon.daemon.engine import default_model_path
        args.model = default_model_path()
    lm = load_lm(args.model)
    docs, skipped, names = [], [], []
    for f in midi_files(args.midi, args.max_files):
        try:
            tokens = codec.encode_file(f)
        except codec.MidiFileError as e:
            skipped.append(str(e))
            continue
        if tokens:
            docs.append([V.BOS] + tokens)
            names.append(f.stem)
    if not docs:
        raise UserError(f"--midi {args.midi}: none of the files held notes ({'; '.join(skipped[:3])})")
    baseline = baseline_for(args.data, args.markov_order, args.markov_discount, log)
    log(f"scoring {len(docs)} files with {args.model}")
    model_nll = np.concatenate([sliding_nll(lm, d) for d in docs])
    base_nll = np.concatenate([baseline.token_nll(np.asarray(d)) for d in docs])
    result = {"model": str(args.model), "data": str(args.data), "files": len(docs), "skipped": skipped,
              "tokens": int(model_nll.size), "model_nll": float(model_nll.mean()),
              "baseline_nll": float(base_nll.mean()), "baseline_order": baseline.max_order,
              "baseline_discount": baseline.discount}
    result["ratio"] = result["model_nll"] / result["baseline_nll"] if result["baseline_nll"] > 0 else math.inf
    if args.session:
        log("streaming each file through the model as a jam session hears it")
        streamed = SE.stream(lm, docs)
        searched = SE.grids(streamed)
        fitted = SE.fit(streamed, searched)
        result["session"] = {"nll_without_memory": SE.nll(streamed),
                             "nll_with_memory": SE.nll(streamed, *SE.shipped_constants()),
                             "memory_constants": dict(zip(("variant", "weight", "half_order", "top_weight"),
                                                          SE.shipped_constants())),
                             "best_constants_on_this_set": fitted,
                             "constants_by_the_shipping_rule": SE.rule(streamed, searched[SE.shipped_constants()[0]])}
    if args.phrases > 0:
        log(f"generating responses to up to {args.phrases} phrases")
        steers = Steers.of(args)
        result["sampling"] = dataclasses.asdict(steers)
        result["metrics"] = musical_metrics(lm, baseline, docs, args.phrases, args.seed, steers, args.rolls,
                                             [f"{n}, from {t} s" for n, t in phrase_names(names, docs, args.phrases)])
    if args.json:
        print(json.dumps(_finite(result), indent=2))
        return 0
    table = Table(title=f"{len(docs)} files, {result['tokens']:,} tokens (nats/token)")
    for col in ("model NLL", f"order-{baseline.max_order} Markov NLL", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['model_nll']:.3f}", f"{result['baseline_nll']:.3f}", f"{result['ratio']:.3f}")
    out = Console()
    out.print(table)
    if "session" in result:
        se = result["session"]
        out.print(f"streamed session NLL: {se['nll_without_memory']:.3f} without memory, "
                  f"{se['nll_with_memory']:.3f} with it; constants fitted on this set: {se['best_constants_on_this_set']}")
    if "metrics" in result:
        mt = Table(title=f"responses to {result['metrics']['phrases']} held-out 8 s calls (8 s each)")
        mt.add_column("metric")
        for name in ("model", "baseline", "truth", "model / truth"):
            mt.add_column(name, justify="right")
        for m in M.METRICS:
            mt.add_row(m, *(f"{result['metrics'][name][m]:.3f}" for name in ("model", "baseline", "truth")),
                       f"{result['metrics']['ratio_to_truth']['model'][m]:.2f}")
        out.print(mt)
    return 0
