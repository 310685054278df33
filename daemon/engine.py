"""The torch-free inference engine: an exported antiphon model on ONNX Runtime with a KV cache.

The engine owns one preallocated cache buffer per layer and kind, bound to the graph through IO
binding on raw pointers, so ORT reads and writes it in place: no per-token allocation, and
rolling back is just setting `length`. The token buffer doubles as the `input_ids` input.
Two graph layouts (see antiphon/export/onnx_export.py and export/gqa.py):

- "gqa/bhsd-v1" (default export): a (1, H, C, D) buffer is both `past` and `present` of
  ORT's GroupQueryAttention op, bound once; a step rebinds only input_ids and logits.
- "past-new/bthd-v1" (portable ONNX): a (1, C, H, D) buffer whose first P rows are `past`
  and whose rows P.. receive `new`; 2.5x slower at context 1024 (whole-cache copies per layer).

Create the Engine (it builds the ORT session) before any real-time thread starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from antiphon.daemon import vocab as V
from antiphon.daemon.errors import UserError

GQA, PORTABLE = "gqa/bhsd-v1", "past-new/bthd-v1"  # must match antiphon.export's layouts
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# Beside this module, not importlib.resources: its reader fails on setuptools editable installs
# of this package-dir mapping (NotADirectoryError from MultiplexedPath).
ASSETS = Path(__file__).resolve().parent / "assets"


def default_model_path(int8: bool = False) -> str:
    path = ASSETS / ("default.int8.onnx" if int8 else "default.onnx")
    if not path.is_file():
        raise UserError(f"no shipped model at {path}: pass --model MODEL.onnx "
                        "(make one with `antiphon train` then `antiphon export`)")
    return str(path)


def runtime_default_model() -> str:
    """What jam and continue run when no --model is given: int8 on CPU (held-out NLL within 0.001
    of fp32's, 2.8399 vs 2.8397 nats/token on valid_perf, and faster per token), fp32 where a GPU
    is present."""
    return default_model_path(int8=not cuda_device_present())


def cuda_device_present() -> bool:
    """Ask the CUDA driver directly: onnxruntime-gpu lists its CUDA EP even on machines without a GPU."""
    names = ["nvcuda.dll"] if os.name == "nt" else ["libcuda.so.1", ctypes.util.find_library("cuda") or ""]
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def _session(path: str, threads: int, providers: list[str] | None, log: Callable[[str], None]) -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Fatal only while probing: a GPU box without the CUDA libraries would otherwise print a
    # screenful before falling back; we say it in one line instead.
    opts.log_severity_level = 4
    if providers is None:
        want_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_present()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    if not Path(path).is_file():
        raise UserError(f"model file {path} does not exist")
    try:
        sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
        raise UserError(f"cannot load {path} as an ONNX model ({str(e).strip()[:300]}); "
                        "re-export it with `antiphon export CHECKPOINT -o MODEL.onnx`") from e
    used = sess.get_providers()[0]
    note = " (CUDA requested but unavailable)" if "CUDAExecutionProvider" in providers and used != "CUDAExecutionProvider" else ""
    log(f"engine: {Path(path).name} on {used.replace('ExecutionProvider', '')}, {threads} thread(s){note}")
    return sess


def _parse_meta(sess: Any, path: str) -> dict[str, Any]:
    raw = dict(sess.get_modelmeta().custom_metadata_map)
    if "model_config" not in raw:
        raise UserError(f"{path} is not an antiphon model (no model_config metadata); export it with `antiphon export`")
    V.check_compatible(raw.get("vocab"), int(raw["vocab_size"]) if "vocab_size" in raw else None, f"model {path}")
    if raw.get("kv_layout") not in (GQA, PORTABLE):
        raise UserError(f"{path} has cache layout {raw.get('kv_layout')!r}; this engine speaks {GQA!r} and "
                        f"{PORTABLE!r}: re-export it with this version of antiphon")
    meta: dict[str, Any] = dict(raw)
    meta["model_config"] = json.loads(raw["model_config"])
    meta["vocab"] = json.loads(raw["vocab"])
    meta["vocab_size"] = int(raw["vocab_size"])
    return meta


def io_names(n_layer: int, layout: str) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{k}" for i in range(n_layer) for k in ("key", "value")]
    if layout == GQA:
        return ["input_ids", "seqlens_k", "total_sequence_length"] + [f"past.{n}" for n in kv], \
            ["logits"] + [f"present.{n}" for n in kv]
    return ["input_ids"] + [f"past.{n}" for n in kv], ["logits"] + [f"new.{n}" for n in kv]


class Engine:
    """Incremental decoding with a rollback-able KV cache. Not thread-safe: one caller at a time.

    Logits come back in the graph's output type: float32, or float16 for an fp16 export.
    """

    def __init__(self, model_path: str | None = None, threads: int = 1, providers: list[str] | None = None,
                 log: Callable[[str], None] = print):
        self.model_path = model_path or runtime_default_model()
        self.session = _session(self.model_path, threads, providers, log)
        self.meta = _parse_meta(self.session, self.model_path)
        self.layout: str = self.meta["kv_layout"]
        cfg = self.meta["model_config"]
        self.context: int = int(cfg["context"])
        self.n_layer, self.vocab_size = int(cfg["n_layer"]), self.meta["vocab_size"]
        self.heads, self.head_dim = int(cfg["n_head"]), int(cfg["d_model"]) // int(cfg["n_head"])
        self._in_names, self._out_names = io_names(self.n_layer, self.layout)
        self._check_io()
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._kv_dtype = np.dtype(_DTYPES[types["past.0.key"]])
        self._device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        C, H, D = self.context, self.heads, self.head_dim
        self._shape = (1, H, C, D) if self.layout == GQA else (1, C, H, D)
        self._kv = [self._alloc(self._shape) for _ in range(2 * self.n_layer)]  # key, value per layer
        self._ptr = [self._pointer(buf) for buf in self._kv]
        self._row = H * D * self._kv_dtype.itemsize  # bytes per position (portable layout)
        self.tokens = np.zeros(C, np.int64)
        self.length = 0
        # Returned logits are views of this buffer: the next call overwrites them.
        out_type = {o.name: o.type for o in self.session.get_outputs()}["logits"]
        self._logits = np.zeros((1, C, self.vocab_size), _DTYPES[out_type])
        self._seqlens = np.zeros(1, np.int32)
        self._total = np.zeros((), np.int32)
        self._binding = self.session.io_binding()
        if self._device == "cuda" and self._kv_dtype == np.float32 and self.layout == GQA:
            log("engine: GroupQueryAttention has no fp32 CUDA kernel; use the fp16 export (--fp16) on a GPU")
        if self.layout == GQA:
            self._bind_static()

    def _alloc(self, shape: tuple[int, ...]) -> Any:
        if self._device == "cpu":
            return np.zeros(shape, self._kv_dtype)
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self._kv_dtype), "cuda", 0)

    @staticmethod
    def _pointer(buf: Any) -> int:
        return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()

    def _check_io(self) -> None:
        have_in = [i.name for i in self.session.get_inputs()]
        have_out = [o.name for o in self.session.get_outputs()]
        if have_in != self._in_names or have_out != self._out_names:
            raise UserError(f"{self.model_path}: graph inputs/outputs {have_in}/{have_out} are not the antiphon "
                            f"{self.layout} contract; re-export it with `antiphon export`")
        shape = next(i.shape for i in self.session.get_inputs() if i.name == "past.0.key")
        hd = [shape[1], shape[3]] if self.layout == GQA else shape[2:]
        if list(hd) != [self.heads, self.head_dim]:
            raise UserError(f"{self.model_path}: cache shape {shape} disagrees with its model_config")

    def _bind_static(self) -> None:
        """GQA: the cache buffers and the two length scalars never move, so bind them once."""
        b, elem = self._binding, self._kv_dtype.type
        b.bind_input("seqlens_k", "cpu", 0, np.int32, (1,), self._seqlens.ctypes.data)
        b.bind_input("total_sequence_length", "cpu", 0, np.int32, (), self._total.ctypes.data)
        for j, name in enumerate(self._in_names[3:]):
            b.bind_input(name, self._device, 0, elem, self._shape, self._ptr[j])
            b.bind_output(self._out_names[1 + j], self._device, 0, elem, self._shape, self._ptr[j])

    # ------------------------------------------------------------------ core step

    def _run(self, T: int) -> np.ndarray:
        """Run tokens[length:length+T] against the cache; returns a (T, vocab) view of the logits."""
        P = self.length
        if P + T > self.context:
            raise ValueError(f"cache full: {P} + {T} tokens exceed the context of {self.context}; slide() first")
        b = self._binding
        b.bind_input("input_ids", "cpu", 0, np.int64, (1, T), self.tokens.ctypes.data + 8 * P)
        if self.layout == GQA:
            self._seqlens[0] = P + T - 1
            self._total[...] = P + T
        else:
            elem, (_, _, H, D) = self._kv_dtype.type, self._shape
            for j, name in enumerate(self._in_names[1:]):
                b.bind_input(name, self._device, 0, elem, (1, P, H, D), self._ptr[j])
                b.bind_output(self._out_names[1 + j], self._device, 0, elem, (1, T, H, D), self._ptr[j] + self._row * P)
        b.bind_output("logits", "cpu", 0, self._logits.dtype.type, (1, T, self.vocab_size), self._logits.ctypes.data)
        self.session.run_with_iobinding(b)
        self.length = P + T
        return self._logits[0, :T]

    # ------------------------------------------------------------------ public API

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens; returns the logits (vocab,) after the last one (a view, overwritten by the next call)."""
        T = len(tokens)
        if T == 0:
            raise ValueError("prefill needs at least one token")
        if self.length + T > self.context:
            raise ValueError(f"cache full: {self.length} + {T} tokens exceed the context of {self.context}")
        self.tokens[self.length:self.length + T] = tokens
        return self._run(T)[T - 1]

    def decode(self, token: int) -> np.ndarray:
        """Append one token; returns its logits (vocab,) (a view, overwritten by the next call)."""
        if self.length >= self.context:
            raise ValueError(f"cache full ({self.context} positions); slide() first")
        self.tokens[self.length] = token
        return self._run(1)[0]

    def rollback(self, length: int) -> None:
        """Forget positions >= length. Nothing is copied: the buffers' tails are simply overwritten later."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} positions")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    def slide(self, keep: int) -> np.ndarray:
        """Keep the last `keep` tokens and re-prefill them from position 0; returns the last logits.

        Rotary positions make a window's attention independent of where it starts, so this
        equals a fresh prefill of that window. One prefill costs far more than a decode step:
        call it off the critical path (e.g. during the player's phrase, not the answer).
        """
        if not 0 < keep <= self.length:
            raise ValueError(f"cannot keep {keep} of {self.length} cached tokens")
        window = self.tokens[self.length - keep:self.length].copy()
        self.length = 0
        return self.prefill(window)

    def logits_for(self, tokens: Sequence[int]) -> np.ndarray:
        """(T, vocab) logits of a whole sequence from an empty cache, as a new array.

        Uses its own buffers, so the engine's cache, tokens and length are left as they were.
        """
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        if not 0 < ids.shape[1] <= self.context:
            raise ValueError(f"logits_for takes 1..{self.context} tokens, got {ids.shape[1]}")
        T = ids.shape[1]
        feed: dict[str, np.ndarray] = {"input_ids": ids}
        if self.layout == GQA:
            feed["seqlens_k"] = np.array([T - 1], np.int32)
            feed["total_sequence_length"] = np.array(T, np.int32)
            scratch = np.zeros((1, self.heads, T, self.head_dim), self._kv_dtype)
        else:
            scratch = np.zeros((1, 0, self.heads, self.head_dim), self._kv_dtype)
        feed.update({name: scratch for name in self._in_names if name.startswith("past.")})
        return self.session.run(["logits"], feed)[0][0].astype(np.float32, copy=False)
