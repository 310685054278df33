"""`antiphon export`: checkpoint → verified ONNX (fp32, optionally int8 and fp16 beside it)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import onnx

from antiphon.daemon.errors import UserError
from antiphon.export.onnx_export import export_model, read_metadata
from antiphon.export.quantize import convert_fp16, quantize_int8
from antiphon.export.verify import tokens_from, verify
from antiphon.models.checkpoint import load_model


def variant_path(out: Path, precision: str) -> Path:
    return out.with_name(f"{out.stem}.{precision}{out.suffix}")


def _quiet_exporter() -> None:
    # The dynamo exporter logs one warning per missing torchvision op; none of them apply here.
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _verify_file(model_path: str, checkpoint: str, midi: str | None) -> None:
    model, cfg, meta = load_model(checkpoint)
    props = read_metadata(onnx.load(model_path, load_external_data=False))
    precision = props.get("precision", "fp32")
    verify(model_path, model, cfg, tokens_from(midi, cfg.context), precision=precision, run_id=meta.get("run_id"))


def main(args: argparse.Namespace) -> int:
    _quiet_exporter()
    midi = getattr(args, "midi", None)
    if args.verify:
        _verify_file(args.verify[0], args.verify[1], midi)
        return 0
    if not args.checkpoint:
        raise UserError("give a checkpoint to export (antiphon export CHECKPOINT -o MODEL.onnx) or --verify MODEL CHECKPOINT")
    model, cfg, meta = load_model(args.checkpoint)
    out = Path(args.output or Path(args.checkpoint).with_suffix(".onnx"))
    run_id = str(meta.get("run_id", ""))
    t0 = time.perf_counter()
    export_model(model, cfg, out, run_id, layout=getattr(args, "layout", "gqa"),
                 exporter=getattr(args, "exporter", "dynamo"))
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB, {model.num_params() / 1e6:.2f}M parameters, "
          f"run {run_id}) in {time.perf_counter() - t0:.1f} s")
    tokens = tokens_from(midi, cfg.context)
    verify(str(out), model, cfg, tokens, "fp32", run_id)
    if args.int8:
        q = quantize_int8(out, variant_path(out, "int8"))
        print(f"wrote {q} ({q.stat().st_size / 1e6:.1f} MB)")
        verify(str(q), model, cfg, tokens, "int8", run_id, fp32_path=str(out))
    if args.fp16:
        h = convert_fp16(out, variant_path(out, "fp16"))
        print(f"wrote {h} ({h.stat().st_size / 1e6:.1f} MB)")
        verify(str(h), model, cfg, tokens, "fp16", run_id, fp32_path=str(out))
    return 0
