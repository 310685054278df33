"""PyTorch weights rebuilt from an exported fp32 ONNX model (the inverse of onnx_export).

Why: the wheel ships the ONNX models, not the training checkpoint, yet fine-tuning
(`antiphon tune`) needs the PyTorch module. Every weight of the GPT is an initializer of the
fp32 graph, so the module can be rebuilt exactly; `verify` then proves the rebuild by running
the graph against it (logits within fp32 tolerance, greedy decoding identical).

How the initializers map back: LayerNorm gains and biases and the tied embedding keep their
module names (prefixed by the export wrapper's attribute, "gpt."). The exporter folds each
Linear's transpose into a constant, so those appear under generated names as W^T, consumed by
MatMul nodes. Data flow fixes their order in any topological node order (qkv, attention proj,
mlp fc, mlp proj, block after block), which is the order of the GPT's own Linear weights;
shapes are checked one by one, so a graph of another architecture is refused, not guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from antiphon.daemon import vocab as V
from antiphon.daemon.config import ModelConfig, from_dict
from antiphon.daemon.errors import UserError
from antiphon.export.onnx_export import read_metadata
from antiphon.models.gpt import GPT

PREFIXES = ("gpt.", "")  # the export wrappers hold the GPT as `self.gpt`


class RebuildError(UserError):
    """An ONNX file whose weights cannot be turned back into a GPT; the message says why."""


def fp32_sibling(path: Path) -> Path | None:
    """The fp32 file written beside a reduced-precision one, by `export` (X.onnx beside
    X.int8.onnx) or by `tune` (X.fp32.onnx beside X.onnx); None if there is none."""
    name = path.name
    candidates = [path.with_name(name[:-len(".onnx")] + ".fp32.onnx")]
    for precision in (".int8.onnx", ".fp16.onnx"):
        if name.endswith(precision):
            candidates.append(path.with_name(name[:-len(precision)] + ".onnx"))
    return next((c for c in candidates if c.is_file()), None)


def read_model_config(meta: dict[str, str], path: Path) -> ModelConfig:
    if "model_config" not in meta:
        raise RebuildError(f"{path} is not an antiphon model (no model_config metadata)")
    V.check_compatible(meta.get("vocab"), int(meta["vocab_size"]) if "vocab_size" in meta else None, f"model {path}")
    try:
        return from_dict(ModelConfig, json.loads(meta["model_config"]))
    except (TypeError, ValueError) as e:
        raise RebuildError(f"{path}: model_config metadata is invalid ({e})") from e


def gpt_from_onnx(path: str | Path) -> tuple[GPT, ModelConfig, dict[str, str]]:
    """(GPT in eval mode with the graph's weights, its config, the file's metadata).

    Refuses a file of another vocabulary (naming both) and a reduced-precision file, whose
    weights are no longer the trained ones (pointing at its fp32 sibling when one exists).
    """
    path = Path(path)
    if not path.is_file():
        raise RebuildError(f"{path}: no such model file")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and friends on foreign files
        raise RebuildError(f"{path}: not a readable ONNX model ({str(e)[:200]})") from e
    meta = read_metadata(proto)
    cfg = read_model_config(meta, path)
    precision = meta.get("precision", "fp32")
    if precision != "fp32":
        sibling = fp32_sibling(path)
        hint = f"use {sibling}" if sibling else "use the fp32 model it was made from (`antiphon tune --fp32` keeps one)"
        raise RebuildError(f"{path} is a {precision} model: its weights are rounded, so the PyTorch weights "
                           f"cannot be rebuilt from it; {hint}")
    model = GPT(cfg)
    model.load_state_dict(_state_dict(proto, model, path), strict=True)
    model.eval()
    return model, cfg, meta


def _state_dict(proto: onnx.ModelProto, model: GPT, path: Path) -> dict[str, torch.Tensor]:
    want = model.state_dict()
    inits = {t.name: t for t in proto.graph.initializer}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str, array: np.ndarray, name: str) -> None:
        if tuple(array.shape) != tuple(want[key].shape):
            raise RebuildError(f"{path}: initializer {name} has shape {tuple(array.shape)}, "
                               f"{key} needs {tuple(want[key].shape)}")
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32))
        used.add(name)

    for key in want:
        for prefix in PREFIXES:
            if prefix + key in inits:
                take(key, numpy_helper.to_array(inits[prefix + key]), prefix + key)
                break
    tied = ("embed.weight", "head.weight")  # one tensor; the graph names it once
    for a, b in (tied, tied[::-1]):
        if a in out and b not in out:
            out[b] = out[a]

    linears = [k for k in want if k not in out]
    matmul_weights = []
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            name = node.input[1]
            if name in inits and name not in used:
                matmul_weights.append(name)
    if len(matmul_weights) != len(linears):
        raise RebuildError(f"{path}: found {len(matmul_weights)} unnamed matrix weights for {len(linears)} "
                           f"missing parameters ({', '.join(linears[:4])}...); not a graph this version exports")
    for key, name in zip(linears, matmul_weights):
        take(key, numpy_helper.to_array(inits[name]).T, name)  # MatMul computes x @ W^T
    return out


def weights_identical(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of parameters that differ between two modules (empty: identical)."""
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])]


def rebuild_and_verify(path: str | Path, log=print, **verify_kw: Any) -> tuple[GPT, ModelConfig, dict[str, str]]:
    """gpt_from_onnx, then the export check against the same file: a rebuild that does not
    reproduce the graph's logits raises export.verify's error instead of being used."""
    from antiphon.export.verify import demo_tokens, verify

    model, cfg, meta = gpt_from_onnx(path)
    verify(str(path), model, cfg, demo_tokens(min(cfg.context, 600)), "fp32", meta.get("run_id"), log=log,
           **verify_kw)
    return model, cfg, meta
