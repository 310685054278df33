"""Export the training GPT to ONNX with its KV cache as graph inputs and outputs.

Two cache layouts, both one graph for prefill and decode, both with the cache owned by the
engine as preallocated buffers bound through IO binding (no per-token allocation; rolling back
is setting a length):

- "gqa" (default, the fast one): see export/gqa.py. ORT-specific (com.microsoft contrib op).
- "portable" (KV layout "past-new/bthd-v1"), plain ONNX ops, exports `GPT.forward` unchanged:
    inputs   input_ids (1, T) int64, past.{i}.key / past.{i}.value (1, P, H, D) float
    outputs  logits (1, T, V), new.{i}.key / new.{i}.value (1, T, H, D)
  P may be 0. Only the new rows come out, so the engine binds row P of its (1, C, H, D) buffer
  as their destination and the buffer's prefix as the next `past`. The graph still concatenates
  and transposes the cache inside every layer, which makes it 2.5x slower at context 1024.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from antiphon.daemon import vocab as V
from antiphon.daemon.config import ModelConfig, to_dict
from antiphon.export import gqa
from antiphon.models.gpt import GPT

PORTABLE = "past-new/bthd-v1"
LAYOUTS = {"gqa": gqa.LAYOUT, "portable": PORTABLE}
OPSET = 20  # Gelu is a single op from opset 20 (the dynamo graph otherwise spells out erf)


def past_name(i: int, kind: str) -> str:
    return f"past.{i}.{kind}"


def new_name(i: int, kind: str) -> str:
    return f"new.{i}.{kind}"


def io_names(n_layer: int, layout: str = gqa.LAYOUT) -> tuple[list[str], list[str]]:
    if layout == gqa.LAYOUT:
        return gqa.io_names(n_layer)
    kinds = ("key", "value")
    inputs = ["input_ids"] + [past_name(i, k) for i in range(n_layer) for k in kinds]
    outputs = ["logits"] + [new_name(i, k) for i in range(n_layer) for k in kinds]
    return inputs, outputs


class _CacheIO(torch.nn.Module):
    """Flattens GPT.forward's list-of-pairs cache into positional tensors for the exporter."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, new = self.gpt(input_ids, cache)
        return (logits, *[t for kv in new for t in kv])


def example_inputs(cfg: ModelConfig, T: int = 3, P: int = 5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # Dynamic dims need examples >= 2: torch.export specialises a dim whose example is 0 or 1.
    H, D = cfg.n_head, cfg.d_model // cfg.n_head
    ids = torch.randint(3, cfg.vocab_size, (1, T))
    past = [torch.randn(1, P, H, D) * 0.5 for _ in range(2 * cfg.n_layer)]
    return ids, past


def metadata(cfg: ModelConfig, run_id: str, layout: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    props = {
        **V.metadata(),
        "model_config": json.dumps(to_dict(cfg), sort_keys=True),
        "run_id": run_id,
        "kv_layout": layout,
        "precision": "fp32",
        "producer": "antiphon.export",
    }
    props.update({k: str(v) for k, v in (extra or {}).items()})
    return props


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _export_dynamo(wrapper: _CacheIO, cfg: ModelConfig, names: tuple[list[str], list[str]]) -> onnx.ModelProto:
    T = torch.export.Dim("T", min=1, max=cfg.context)
    P = torch.export.Dim("P", min=0, max=cfg.context - 1)
    shapes = {"input_ids": {1: T}, "past": [{1: P} for _ in range(2 * cfg.n_layer)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, example_inputs(cfg), dynamo=True, dynamic_shapes=shapes,
                                    input_names=names[0], output_names=names[1], opset_version=OPSET,
                                    optimize=True, verbose=False)
    return program.model_proto


def _export_torchscript(wrapper: _CacheIO, cfg: ModelConfig, names: tuple[list[str], list[str]]) -> onnx.ModelProto:
    axes = {"input_ids": {1: "T"}, "logits": {1: "T"}}
    axes.update({n: {1: "P"} for n in names[0][1:]})
    axes.update({n: {1: "T"} for n in names[1][1:]})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example_inputs(cfg), buf, dynamo=False, input_names=names[0],
                          output_names=names[1], dynamic_axes=axes, opset_version=OPSET)
    proto = onnx.load_from_string(buf.getvalue())
    # TorchScript's shape inference names the head dims of outputs symbolically; pin them.
    H, D = cfg.n_head, cfg.d_model // cfg.n_head
    for out in proto.graph.output[1:]:
        for dim, value in zip(out.type.tensor_type.shape.dim[2:], (H, D)):
            dim.Clear()
            dim.dim_value = value
    return proto


def _export_gqa(model: GPT, cfg: ModelConfig) -> onnx.ModelProto:
    names = gqa.io_names(cfg.n_layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(gqa.GQAGraph(model).eval(), gqa.example_inputs(model), dynamo=True,
                                    dynamic_shapes=gqa.dynamic_shapes(model), input_names=names[0],
                                    output_names=names[1], opset_version=OPSET, optimize=True, verbose=False)
    return program.model_proto


def export_model(model: GPT, cfg: ModelConfig, out: str | Path, run_id: str, layout: str = "gqa",
                 exporter: str = "dynamo", extra_meta: dict[str, Any] | None = None) -> Path:
    """Write `out` (fp32) and return its path.

    layout: "gqa" or "portable"; exporter ("dynamo" or "torchscript") applies to "portable" only:
    both exporters handle P = 0 and give the same graph, dynamo is the default because TorchScript
    export is deprecated in torch 2.x.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or V.VOCAB_SIZE)
    model = model.eval()
    with torch.no_grad():
        if layout == "gqa":
            proto, exporter = _export_gqa(model, cfg), "dynamo"
        else:
            names = io_names(cfg.n_layer, PORTABLE)
            export = _export_dynamo if exporter == "dynamo" else _export_torchscript
            proto = export(_CacheIO(model).eval(), cfg, names)
    set_metadata(proto, metadata(cfg, run_id, LAYOUTS[layout], {"exporter": exporter, **(extra_meta or {})}))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # Single file: the shipped model is package data, an external-data sidecar would get lost.
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    tmp.replace(out)
    return out
