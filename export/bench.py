"""`antiphon bench`: per-token decode latency of the engine against its alternatives, side by side.

Rows: ort_kv (the daemon's Engine), ort_full (same graph, whole window recomputed per token),
torch_kv (eager GPT with its cache), torch_full (eager, no cache), ort_int8_kv (int8 Engine),
each at 1 and 2 intra-op threads and at several contexts. "Context N" means the new token
attends to N positions (N - 1 cached). `--live` belongs to the daemon: antiphon.daemon.rigs.bench_live.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from antiphon.daemon import vocab as V
from antiphon.daemon.config import ModelConfig
from antiphon.daemon.engine import Engine, default_model_path
from antiphon.daemon.errors import UserError

if TYPE_CHECKING:
    from antiphon.models.gpt import GPT

# torch is imported inside the functions that need it: `antiphon bench --live` (the daemon's)
# must work on an install without the training extras.

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "assets" / "default.pt"
ENGINES = ("ort_kv", "ort_full", "torch_kv", "torch_full", "ort_int8_kv")


def _times(step: Callable[[], None], reps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    ts = np.empty(reps)
    for i in range(reps):
        t0 = time.perf_counter()
        step()
        ts[i] = time.perf_counter() - t0
    return float(np.median(ts) * 1e3), float(np.percentile(ts, 99) * 1e3)


def _ort_kv(engine: Engine, tokens: np.ndarray, ctx: int) -> Callable[[], None]:
    engine.reset()
    engine.prefill(tokens[:ctx - 1])
    tok = int(tokens[ctx - 1])

    def step() -> None:
        engine.decode(tok)
        engine.rollback(ctx - 1)
    return step


def _ort_full(engine: Engine, tokens: np.ndarray, ctx: int) -> Callable[[], None]:
    window = tokens[:ctx]

    def step() -> None:
        engine.reset()
        engine.prefill(window)
    return step


def _torch_kv(model: GPT, tokens: np.ndarray, ctx: int) -> Callable[[], None]:
    import torch

    with torch.no_grad():
        _, cache = model(torch.tensor(tokens[None, :ctx - 1]))
    idx = torch.tensor(tokens[None, ctx - 1:ctx])

    def step() -> None:
        with torch.no_grad():
            _, new = model(idx, cache)
            # A torch decode loop must append the new keys to its cache: count that too.
            [(torch.cat([k, nk], 1), torch.cat([v, nv], 1)) for (k, v), (nk, nv) in zip(cache, new)]
    return step


def _torch_full(model: GPT, tokens: np.ndarray, ctx: int) -> Callable[[], None]:
    import torch

    idx = torch.tensor(tokens[None, :ctx])

    def step() -> None:
        with torch.no_grad():
            model(idx)
    return step


def resolve_models(args: argparse.Namespace, workdir: Path) -> tuple[str, GPT, str]:
    """(fp32 onnx path, torch model, int8 onnx path): shipped, given, or a random default-shaped model."""
    import torch

    from antiphon.export.onnx_export import export_model
    from antiphon.export.quantize import quantize_int8
    from antiphon.models.checkpoint import load_model
    from antiphon.models.gpt import GPT

    if getattr(args, "random", False):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=V.VOCAB_SIZE)  # the default shape: the planned shipped model
        model = GPT(cfg).eval()
        onnx_path = str(export_model(model, cfg, workdir / "random.onnx", "random-init"))
    else:
        checkpoint = args.checkpoint or (str(SHIPPED_CHECKPOINT) if SHIPPED_CHECKPOINT.is_file() else "")
        if not checkpoint:
            raise UserError("no shipped checkpoint yet: pass --checkpoint RUN.pt (and --model MODEL.onnx), "
                            "or --random to measure a randomly initialised model of the default shape")
        model, cfg, meta = load_model(checkpoint)
        if args.model:
            onnx_path = args.model
        elif args.checkpoint:
            onnx_path = str(export_model(model, cfg, workdir / "model.onnx", str(meta.get("run_id", ""))))
        else:
            onnx_path = default_model_path()
    int8 = Path(onnx_path).with_name(Path(onnx_path).stem + ".int8.onnx")
    if not int8.is_file():
        int8 = quantize_int8(onnx_path, workdir / "model.int8.onnx")
    return onnx_path, model, str(int8)


def run_bench(onnx_path: str, model: GPT, int8_path: str, quick: bool, log=print) -> dict[str, Any]:
    import torch

    from antiphon.export.verify import demo_tokens

    max_ctx = model.cfg.context
    contexts = sorted({c for c in (64, 512, 1024, max_ctx) if c <= max_ctx})
    tokens = np.asarray((demo_tokens(max_ctx, seed=1) * 2)[:max_ctx], np.int64)
    kv_reps, full_reps = (30, 3) if quick else (300, 10)
    rows, prefill_ms, torch_threads = [], None, torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            engines = {"ort": Engine(onnx_path, threads, log=lambda s: None),
                       "int8": Engine(int8_path, threads, log=lambda s: None)}
            makers = {"ort_kv": (_ort_kv, engines["ort"]), "ort_full": (_ort_full, engines["ort"]),
                      "torch_kv": (_torch_kv, model), "torch_full": (_torch_full, model),
                      "ort_int8_kv": (_ort_kv, engines["int8"])}
            for ctx in contexts:
                for name in ENGINES:
                    make, target = makers[name]
                    reps = kv_reps if name.endswith("kv") else full_reps
                    p50, p99 = _times(make(target, tokens, ctx), reps, warmup=max(2, reps // 10))
                    rows.append({"engine": name, "threads": threads, "context": ctx, "p50_ms": round(p50, 4),
                                 "p99_ms": round(p99, 4), "reps": reps})
                    log(f"  {name:<12} threads {threads} context {ctx:>5}: p50 {p50:8.3f} ms  p99 {p99:8.3f} ms")
            if threads == 1 and max_ctx >= 512:
                eng = engines["ort"]
                prefill_ms = _times(_ort_full(eng, tokens, 512), full_reps, 1)[0]
    finally:
        torch.set_num_threads(torch_threads)
    return {"model": onnx_path, "int8_model": int8_path, "model_config": model.cfg.__dict__,
            "decode": rows, "prefill_512_ms": None if prefill_ms is None else round(prefill_ms, 3),
            **summary(rows)}


def summary(rows: list[dict]) -> dict:
    p50 = {(r["engine"], r["threads"], r["context"]): r["p50_ms"] for r in rows}
    tokens_per_s, ratios = {}, {}
    for (name, threads, ctx), ms in p50.items():
        if name == "ort_kv":
            key = f"threads{threads}_context{ctx}"
            tokens_per_s[key] = round(1000.0 / ms, 1)
            ratios[key] = {"ort_full/ort_kv": round(p50[("ort_full", threads, ctx)] / ms, 2),
                           "torch_kv/ort_kv": round(p50[("torch_kv", threads, ctx)] / ms, 2),
                           "torch_full/ort_kv": round(p50[("torch_full", threads, ctx)] / ms, 2),
                           "ort_kv/ort_int8_kv": round(ms / p50[("ort_int8_kv", threads, ctx)], 2)}
    return {"ort_kv_tokens_per_s": tokens_per_s, "ratios": ratios}


def table(result: dict) -> str:
    rows = result["decode"]
    contexts = sorted({r["context"] for r in rows})
    head = f"{'engine':<12} {'thr':>3} " + " ".join(f"{'ctx ' + str(c) + ' p50/p99 ms':>22}" for c in contexts)
    lines = [head]
    cell = {(r["engine"], r["threads"], r["context"]): r for r in rows}
    for threads in (1, 2):
        for name in ENGINES:
            vals = [cell[(name, threads, c)] for c in contexts]
            lines.append(f"{name:<12} {threads:>3} " + " ".join(f"{v['p50_ms']:>10.3f} / {v['p99_ms']:<9.3f}" for v in vals))
    lines.append(f"prefill of 512 tokens (ort, 1 thread): {result['prefill_512_ms']} ms")
    for key, r in result["ratios"].items():
        lines.append(f"{key}: {result['ort_kv_tokens_per_s'][key]} tokens/s; " +
                     ", ".join(f"{k} {v}x" for k, v in r.items()))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.live:
        import importlib

        try:
            bench_live = importlib.import_module("antiphon.daemon.rigs.bench_live")
        except ModuleNotFoundError as e:
            if e.name != "antiphon.daemon.rigs.bench_live":
                raise
            raise UserError("`antiphon bench --live` is not available in this version (no antiphon.daemon.rigs.bench_live)") from e
        return int(bench_live.main(args) or 0)
    from antiphon.export.cli import _quiet_exporter

    _quiet_exporter()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, model, int8 = resolve_models(args, Path(tmp))
        log = (lambda s: None) if args.json else print
        result = run_bench(onnx_path, model, int8, args.quick, log)
    print(json.dumps(result) if args.json else table(result))
    return 0
