"""`antiphon tune DIR...`: fine-tune the model on the player's own recordings.

1. Read every .mid/.midi under the folders through the daemon's codec (models/recordings.py). A `jam --record` session
   (or a `continue` output) has a track named "antiphon": that track is dropped, so antiphon's
   own answers are never learnt, only the player's. Unreadable files are skipped and listed.
2. Hold out whole recordings, newest first, until they hold `holdout` of the playing time;
   they are only ever scored, never trained on.
3. Start from the parent model's weights: a .pt checkpoint, or the fp32 ONNX file rebuilt into
   PyTorch (export/weights.py; the shipped model is one), checked against the graph.
4. Train with `antiphon train`'s own loop (models/train.py) on a throwaway corpus whose
   "performance" part is the player's recordings and whose other part is the replay shard
   (models/replay.py: excerpts of the original training split's HANNDs performances and
   music21 scores, shipped as package data). TrainConfig.perf_share is then the player's share of windows, 1 - `replay`; the
   player's windows get train's performance variation (tempo, velocity, timing) and every
   window a transposition. The step count is sized to `minutes` by timing steps first.
5. Export fp32, verify it against PyTorch, quantize to int8, verify that (as `antiphon export`),
   and write the int8 model (plus the fp32 one where asked) with its lineage in the metadata.
6. Score parent and tuned model on the held-out recordings (NLL, and the musical metrics of
   `antiphon eval` against the player's real continuations) and on the replay shard's own
   held-out part (forgetting); print and save the report beside the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from antiphon.daemon import cli
from antiphon.daemon import vocab as V
from antiphon.daemon.config import JamConfig, ModelConfig, Steers, TrainConfig, TuneConfig, to_dict
from antiphon.daemon.engine import ASSETS, default_model_path
from antiphon.daemon.errors import UserError
from antiphon.export.cli import _quiet_exporter
from antiphon.export.onnx_export import export_model
from antiphon.export.quantize import quantize_int8
from antiphon.export.verify import demo_tokens, verify
from antiphon.export.weights import rebuild_and_verify
from antiphon.models import data as D
from antiphon.models import evaluate as E
from antiphon.models import replay as R
from antiphon.models import shards
from antiphon.models import train as T
from antiphon.models.checkpoint import load_checkpoint, load_model, model_config_of, save_checkpoint
from antiphon.models.gpt import GPT
from antiphon.models.markov import MarkovModel
from antiphon.models.recordings import Recording, collect, split_holdout

# --------------------------------------------------------------------------- replay

def tuning_corpus(out: Path, tune: list[Recording], held: list[Recording], replay: dict[str, Any] | None) -> None:
    """The corpus `antiphon train` reads: train = the player's recordings ("performance") and the
    replay (kind "score", whatever it was, so that perf_share is exactly the player's share);
    valid_perf = the held-out recordings; valid_score = the replay's own held-out part."""
    player = [r.tokens for r in tune]
    rest = [d[1:-1].tolist() for d in replay["train"]] if replay else []
    shards.write_split(out, "train", player + rest, ["performance"] * len(player) + ["score"] * len(rest))
    shards.write_split(out, "valid_perf", [r.tokens for r in held], ["performance"] * len(held))
    check = [d[1:-1].tolist() for d in replay["check"]] if replay else [r.tokens for r in held]
    shards.write_split(out, "valid_score", check, ["score"] * len(check))


# --------------------------------------------------------------------------- the parent model

def load_parent(path: str, log) -> tuple[GPT, ModelConfig, str, Path | None]:
    """(model, config, run id, its fp32 ONNX file if it has one) of the model to start from."""
    if not path or path.endswith(".onnx"):
        onnx_path = Path(path or default_model_path())
        log(f"rebuilding PyTorch weights from {onnx_path}")
        model, cfg, meta = rebuild_and_verify(onnx_path, log=log, greedy_steps=32)
        return model, cfg, meta.get("run_id", ""), onnx_path
    model, cfg, meta = load_model(path)
    return model, cfg, str(meta.get("run_id", "")), None


# --------------------------------------------------------------------------- output

def default_output() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "antiphon" / "tuned" / f"tuned-{time.strftime('%Y%m%d-%H%M%S')}.onnx"


def fp32_path(out: Path) -> Path:
    return out.with_name(out.name[:-len(".onnx")] + ".fp32.onnx")


def report_path(out: Path) -> Path:
    return out.with_name(out.name[:-len(".onnx")] + ".report.json")


def check_output(cfg: TuneConfig, parent: str) -> Path:
    """The output path, refused before any work if it would overwrite the shipped model, the
    parent, or (without --force) anything else."""
    out = Path(cfg.output).expanduser() if cfg.output else default_output()
    if out.suffix != ".onnx":
        raise UserError(f"-o {out}: give a file name ending in .onnx")
    written = [out, report_path(out)] + ([fp32_path(out)] if cfg.fp32 else [])
    protected = {p.resolve() for p in ASSETS.glob("*")} | ({Path(parent).resolve()} if parent else set())
    for p in written:
        if p.resolve() in protected or p.resolve().parent == ASSETS.resolve():
            raise UserError(f"-o {out}: would overwrite {p}, a model tune starts from; choose another file")
        if p.exists() and not cfg.force:
            raise UserError(f"-o {out}: {p} already exists; choose another file or pass --force")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"-o {out}: cannot create its folder ({e})") from e
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"-o {out}: cannot write into {out.parent}")
    return out


# --------------------------------------------------------------------------- measuring

def score(model_path: str, held: list[list[int]], check: list[list[int]], baseline: MarkovModel | None,
          phrases: int, seed: int) -> dict[str, Any]:
    """NLL on the held-out recordings and the replay check, and the musical metrics."""
    lm = E.load_lm(model_path)
    out: dict[str, Any] = {"model": model_path,
                           "heldout_nll": float(np.concatenate([E.sliding_nll(lm, d) for d in held]).mean())}
    if check:
        out["replay_check_nll"] = float(np.concatenate([E.sliding_nll(lm, d) for d in check]).mean())
    if phrases > 0 and baseline is not None:
        out["metrics"] = E.musical_metrics(lm, baseline, held, phrases, seed, Steers.of(JamConfig()))
    return out


def calibrate(m: ModelConfig, t: TrainConfig, x: np.ndarray, y: np.ndarray) -> float:
    """Seconds per training step of this shape on this machine now."""
    model = GPT(m)
    opt = T.make_optimizer(model, t, torch.device("cpu"))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for _ in range(2):  # the first pays for allocation; the second is the measure
        t0 = time.perf_counter()
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[-1]


def toward_truth(before: dict, after: dict) -> dict[str, dict[str, float | bool | None]]:
    """Per metric: before, after, the player's truth, and whether after is the closer."""
    rows = {}
    for m in after["truth"]:
        b, a, t = before["model"].get(m), after["model"].get(m), after["truth"][m]
        ok = all(isinstance(v, float) and math.isfinite(v) for v in (a, b, t))
        rows[m] = {"before": b, "after": a, "truth": t,
                   "closer": (abs(a - t) < abs(b - t)) if ok else None}
    return rows


# --------------------------------------------------------------------------- the command

def main(args) -> int:
    from rich.console import Console

    (cfg,) = cli.configs(args, TuneConfig)
    console = Console(stderr=True)
    log = lambda msg: console.print(f"[dim]{msg}[/]", highlight=False)
    result = tune(cfg, list(args.dirs), log)
    print_report(result, Console())
    return 0


def tune(cfg: TuneConfig, dirs: list[str], log) -> dict[str, Any]:
    if not 0.0 <= cfg.replay < 1.0:
        raise UserError(f"--replay must be in [0, 1): the share of windows from the replay shard, got {cfg.replay}")
    if cfg.minutes <= 0:
        raise UserError(f"--minutes must be positive, got {cfg.minutes}")
    if cfg.steps < 0:
        raise UserError(f"--steps must be 0 (size to --minutes) or more, got {cfg.steps}")
    if not 0.0 < cfg.mix <= 1.0:
        raise UserError(f"--mix must be in (0, 1]: how far the weights move toward the fine-tuned ones, got {cfg.mix}")
    out = check_output(cfg, cfg.model)
    t_start = time.perf_counter()
    recs, skipped = collect(dirs, log)
    tune_recs, held = split_holdout(recs, cfg.holdout)
    log(f"{len(recs)} recordings, {sum(r.seconds for r in recs) / 60:.1f} min of playing: learning from "
        f"{len(tune_recs)}, holding out the newest {len(held)} ({', '.join(r.path.name for r in held)})")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    parent, pcfg, parent_id, parent_onnx = load_parent(cfg.model, log)
    replay = R.load() if cfg.replay > 0 else None
    seq_len = min(cfg.seq_len, pcfg.context)
    held_docs = [[V.BOS] + r.tokens for r in held]
    check_docs = [d.tolist() for d in replay["check"]] if replay else []
    baseline = MarkovModel.fit(np.concatenate([[V.BOS] + r.tokens for r in tune_recs]), 4, 0.95)

    with tempfile.TemporaryDirectory(prefix="antiphon-tune-") as tmp:
        work = Path(tmp)
        if parent_onnx is None:  # a .pt parent: export it so that both sides are scored the same way
            parent_onnx = export_model(parent, pcfg, work / "parent.onnx", parent_id)
        log("scoring the starting model on your held-out playing")
        before = score(str(parent_onnx), held_docs, check_docs, baseline, cfg.phrases, cfg.seed)

        corpus = work / "corpus"
        tuning_corpus(corpus, tune_recs, held, replay)
        save_checkpoint(work / "parent.pt", parent, pcfg, {"run_id": parent_id})
        m = dataclasses.replace(pcfg, dropout=cfg.dropout)
        t = TrainConfig(data=str(corpus), out=str(work / "run"), seq_len=seq_len, batch_size=cfg.batch_size,
                        steps=1, lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=cfg.warmup_steps, weight_decay=0.0,
                        grad_clip=1.0, eval_every=1, eval_batches=1, augment=True, perf_share=1.0 - cfg.replay,
                        init=str(work / "parent.pt"), seed=cfg.seed, device="cpu", threads=cfg.threads)
        sampler = D.WindowSampler(D.load_split(str(corpus), "train", seq_len + 1, with_kinds=True), seq_len)
        step_s = calibrate(m, t, *sampler.batch(cfg.batch_size, D.step_rng(0, 0, 0)))
        # Two steps' worth of the time go to train's own two evaluations.
        steps = cfg.steps if cfg.steps > 0 else max(1, int(cfg.minutes * 60 / step_s) - 2)
        t = dataclasses.replace(t, steps=steps, eval_every=steps, warmup_steps=min(cfg.warmup_steps, steps // 4))
        log(f"fine-tuning {steps} steps of {cfg.batch_size} x {seq_len} tokens ({step_s:.2f} s each here, now), "
            f"{1 - cfg.replay:.0%} of windows from your recordings, {cfg.replay:.0%} replay"
            " (in train's lines, valid_perf is your held-out playing, valid_score the replay check)")
        t0, cpu0 = time.perf_counter(), time.process_time()
        T.train(t, m, T.setup(t), None)
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0

        ck = load_checkpoint(work / "run" / "best.pt")
        ecfg = dataclasses.replace(model_config_of(ck), dropout=pcfg.dropout)
        tuned = GPT(ecfg)
        tuned.load_state_dict(interpolate(parent.state_dict(), ck["model"], cfg.mix))
        tuned.eval()
        run_id = str(ck["run_id"])
        lineage = {"parent_run_id": parent_id, "parent_model": cfg.model or "shipped " + Path(parent_onnx).name,
                   "recordings": [r.describe("tune") for r in tune_recs] + [r.describe("heldout") for r in held],
                   "replay": {"share": cfg.replay, **({"sha256": replay["meta"].get("sha256", "")} if replay else {})},
                   "tune_config": to_dict(cfg), "steps": steps}
        exported = export_verified(tuned, ecfg, work, run_id, lineage, log)
        log("scoring the tuned model on your held-out playing")
        after = score(str(exported["fp32"]), held_docs, check_docs, baseline, cfg.phrases, cfg.seed)
        lm8 = E.load_lm(str(exported["int8"]))
        after["heldout_nll_int8"] = float(np.concatenate([E.sliding_nll(lm8, d) for d in held_docs]).mean())

        shutil.copyfile(exported["int8"], out.with_name(out.name + ".tmp"))
        out.with_name(out.name + ".tmp").replace(out)
        written = [str(out)]
        if cfg.fp32:
            shutil.copyfile(exported["fp32"], fp32_path(out))
            written.append(str(fp32_path(out)))
    result = {"model": str(out), "written": written, "run_id": run_id, "parent_run_id": parent_id,
              "recordings": lineage["recordings"], "skipped": skipped, "replay": lineage["replay"],
              "steps": steps, "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1),
              "step_s_calibrated": round(step_s, 3),
              "tokens_per_step": cfg.batch_size * seq_len, "wall_s": round(time.perf_counter() - t_start, 1),
              "threads": torch.get_num_threads(), "verify": exported["reports"],
              "before": before, "after": after,
              "heldout_nll_change": after["heldout_nll"] - before["heldout_nll"]}
    if "replay_check_nll" in before:
        result["replay_check_nll_change"] = after["replay_check_nll"] - before["replay_check_nll"]
    if "metrics" in before:
        result["metrics"] = toward_truth(before["metrics"], after["metrics"])
    report_path(out).write_text(json.dumps(E._finite(result), indent=2))
    result["written"].append(str(report_path(out)))
    return result


def interpolate(parent: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], mix: float) -> dict[str, torch.Tensor]:
    """parent + mix * (tuned - parent), tensor by tensor (WiSE-FT, Wortsman et al. 2022): fine-tuned
    and parent weights lie in one basin: halfway, both the held-out playing and what was forgotten
    scored better than after fewer steps (docs/tune.md)."""
    if mix >= 1.0:
        return tuned
    return {k: (parent[k] + mix * (v - parent[k])) if v.is_floating_point() else v for k, v in tuned.items()}


def export_verified(model: GPT, cfg: ModelConfig, work: Path, run_id: str, lineage: dict[str, Any], log) -> dict:
    """fp32 and int8 ONNX in `work`, each verified against the PyTorch model as `antiphon export` does."""
    _quiet_exporter()
    meta = {"parent_run_id": lineage["parent_run_id"], "tuned_from": lineage["parent_model"],
            "tuned_on": json.dumps(lineage["recordings"]), "tune": json.dumps(
                {k: lineage[k] for k in ("replay", "tune_config", "steps")}), "producer": "antiphon.tune"}
    fp32 = export_model(model, cfg, work / "tuned.onnx", run_id, extra_meta=meta)
    tokens = demo_tokens(min(cfg.context, 600))
    r32 = verify(str(fp32), model, cfg, tokens, "fp32", run_id, log=log)
    int8 = quantize_int8(fp32, work / "tuned.int8.onnx")
    r8 = verify(str(int8), model, cfg, tokens, "int8", run_id, fp32_path=str(fp32), log=log)
    return {"fp32": fp32, "int8": int8, "reports": {"fp32": r32.as_dict(), "int8": r8.as_dict()}}


def print_report(result: dict[str, Any], console) -> None:
    from rich.table import Table

    b, a = result["before"], result["after"]
    held = [r for r in result["recordings"] if r["role"] == "heldout"]
    table = Table(title=f"held out: {', '.join(r['file'] for r in held)} "
                        f"({sum(r['tokens'] for r in held):,} tokens) - nats/token, lower is better")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("your held-out playing", f"{b['heldout_nll']:.3f}", f"{a['heldout_nll']:.3f}",
                  f"{result['heldout_nll_change']:+.3f}")
    if "replay_check_nll" in b:
        table.add_row("replay check (forgetting)", f"{b['replay_check_nll']:.3f}", f"{a['replay_check_nll']:.3f}",
                      f"{result['replay_check_nll_change']:+.3f}")
    table.add_row("your held-out playing, int8 (as jam runs it)", "", f"{a['heldout_nll_int8']:.3f}", "")
    console.print(table)
    if "metrics" in result:
        mt = Table(title=f"answers to {a['metrics']['phrases']} held-out 8 s calls vs what you played next")
        for col in ("metric", "before", "after", "you", "closer to you"):
            mt.add_column(col, justify="left" if col == "metric" else "right")
        fmt = lambda v: "-" if v is None or not math.isfinite(v) else f"{v:.3f}"
        for m, row in result["metrics"].items():
            mt.add_row(m, fmt(row["before"]), fmt(row["after"]), fmt(row["truth"]),
                       "-" if row["closer"] is None else "same" if row["before"] == row["after"] else
                       "yes" if row["closer"] else "no")
        console.print(mt)
    console.print(f"{result['steps']} steps in {result['train_s'] / 60:.1f} min of fine-tuning "
                  f"({result['train_cpu_s'] / 60:.1f} CPU-min; {result['wall_s'] / 60:.1f} min in all, "
                  f"{result['threads']} threads); parent run "
                  f"{result['parent_run_id']}, tuned run {result['run_id']}")
    for p in result["written"]:
        console.print(f"wrote {p}")
    console.print(f"play with it:  antiphon jam --model {result['model']}\n"
                  "back to the shipped model:  antiphon jam (without --model)")
