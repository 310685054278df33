"""A decoder-only Transformer over performance-event tokens (nanoGPT-sized, one screen per idea).

One module trains and decodes. `forward(idx, cache)` takes the keys/values of everything
before `idx` (per layer, shape (B, P, H, D), position-major so that the first P rows of a
preallocated (B, C, H, D) buffer are a contiguous view) and returns logits plus only the new
keys/values for `idx`. The runtime writes those into its own buffer at position P, so
rolling back is setting P, and nothing is copied per token (gpt-fast's idea, with the buffer
owned by the caller so that the same graph exports to ONNX).

Positions are rotary (RoPE): attention depends only on the distance between tokens, so the
model behaves the same wherever its window starts. The daemon drops the oldest part of a full
context and re-prefills the rest from position 0; training on random windows matches that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from antiphon.daemon.config import ModelConfig

KV = tuple[torch.Tensor, torch.Tensor]


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = cfg.d_model // cfg.n_head
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(cfg.context, dtype=torch.float32), inv_freq)  # (C, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout, (C, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (T, D). Real arithmetic only, so it exports to ONNX."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(dim=2)  # (B, T, H, D) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        dropout = self.dropout if self.training else 0.0
        if past is None:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, dropout_p=dropout)
        else:
            # SDPA's is_causal is top-left aligned, wrong with a cache: query i sits at P + i
            # and may see keys 0..P+i, so build the mask with the past-length offset.
            P = past[0].shape[1]
            k_all, v_all = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
            mask = torch.arange(P + T, device=x.device)[None, :] <= (P + torch.arange(T, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                               attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.proj(y), dropout, self.training), new_kv


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), SelfAttention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, cos, sin, past: KV | None):
        a, new_kv = self.attn(self.ln1(x), cos, sin, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), new_kv


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0 and cfg.d_model % cfg.n_head == 0
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # weight tying, as in nanoGPT
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """idx: (B, T) tokens at positions P..P+T-1, where P is the cache length (0 without one).

        Returns logits (B, T, vocab) and, per layer, the new (keys, values) of shape (B, T, H, D).
        """
        T = idx.shape[1]
        P = 0 if cache is None else cache[0][0].shape[1]
        cos, sin = self.rope_cos[P:P + T], self.rope_sin[P:P + T]
        x = self.drop(self.embed(idx))
        new_cache: list[KV] = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = 0) -> torch.Tensor:
        """Mean cross-entropy in nats per token; PAD targets (0) are ignored."""
        logits, _ = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
