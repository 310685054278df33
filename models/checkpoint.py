"""Training checkpoints: one atomic file that carries weights, model shape and vocabulary.

The file is a plain dict of tensors and primitive containers, so `torch.load(weights_only=True)`
reads it without unpickling arbitrary objects. Loading refuses a checkpoint trained on another
token vocabulary, because its weights would be silently meaningless with this code's tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from antiphon.daemon import vocab as V
from antiphon.daemon.config import ModelConfig, VocabConfig, from_dict, to_dict
from antiphon.daemon.errors import UserError
from antiphon.models.gpt import GPT

RESERVED = ("model", "model_config", "vocab", "vocab_size", "run_id")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used; the message says which and why."""


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Unwrap torch.compile / DDP wrappers so the keys match a plain GPT.
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_cfg: ModelConfig,
                    extra: dict[str, Any] | None = None) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact.

    `extra` holds anything JSON-like the trainer wants back (step, optimizer state dict,
    train config dict, losses...); it may set "run_id", otherwise a fresh one is made.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED) - {"run_id"})
    if clash:
        raise ValueError(f"extra may not override reserved checkpoint keys: {', '.join(clash)}")
    cfg = dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or V.VOCAB_SIZE)
    payload: dict[str, Any] = {
        **extra,
        "model": _state_dict(model),
        "model_config": to_dict(cfg),
        "vocab": to_dict(V.VOCAB),
        "vocab_size": V.VOCAB_SIZE,
        "run_id": str(extra.get("run_id") or uuid.uuid4().hex[:12]),
    }
    write_atomic(payload, path)


def write_atomic(payload: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_half(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """A checkpoint's weights stored in fp16, everything but the optimizer kept: half the bytes of
    a shipped model in the repository's history. Loading casts them back to fp32 (load_state_dict
    copies into the model's own dtype), so export, eval, tune and --init read it unchanged."""
    data = load_checkpoint(src)
    data = {k: v for k, v in data.items() if k != "optimizer"}
    data["model"] = {k: v.half() if v.is_floating_point() else v for k, v in data["model"].items()}
    write_atomic(data, dst)
    return data


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, vocabulary-checked. Tensors are on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle/zip/runtime errors on foreign or truncated files
        raise CheckpointError(f"{path}: not a readable antiphon checkpoint ({e})") from e
    if not isinstance(data, dict) or "model" not in data or "model_config" not in data:
        raise CheckpointError(f"{path}: not an antiphon checkpoint (no 'model'/'model_config' entries)")
    V.check_compatible(data.get("vocab"), data.get("vocab_size"), f"checkpoint {path}")
    return data


def model_config_of(data: dict[str, Any]) -> ModelConfig:
    try:
        return from_dict(ModelConfig, data["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint model_config is invalid: {e}") from e


def load_model(path: str | Path) -> tuple[GPT, ModelConfig, dict[str, Any]]:
    """(model in eval mode on the CPU, its config, every other checkpoint entry)."""
    data = load_checkpoint(path)
    cfg = model_config_of(data)
    model = GPT(cfg)
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its model_config ({e})") from e
    model.eval()
    meta = {k: v for k, v in data.items() if k != "model"}
    return model, cfg, meta


def vocab_config_of(meta: dict[str, Any]) -> VocabConfig:
    return from_dict(VocabConfig, meta["vocab"])


def describe(meta: dict[str, Any]) -> str:
    """One line for logs: run id and shape."""
    return f"run {meta.get('run_id', '?')} {json.dumps(meta.get('model_config', {}), sort_keys=True)}"
