"""A small GPT (pre-LayerNorm, learned positions, causal SDPA) for teacher and student.

The LM head is kept apart from the body so that a student can hold only a contiguous
vocab shard of it, as a Megatron-style tensor-parallel rank would: ``hidden`` is
replicated, ``logits_shard = hidden @ W[vocab_start:vocab_end].T``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    context: int
    d_model: int
    layers: int
    heads: int

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """``cache`` (sampling only): this block's keys and values of the earlier positions,
        extended in place; ``x`` is then either the whole prompt (empty cache) or one token."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # One new token attends to every cached position; a whole prompt is causal.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Body + LM head. ``head_weight`` is the full [V, d] matrix, or rows
    ``[vocab_start, vocab_start + V_r)`` of it after :meth:`shard_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.vocab_start = 0
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        # GPT-2: scale the residual projections by depth.
        for blk in self.blocks:
            nn.init.normal_(blk.proj.weight, std=0.02 / (2 * cfg.layers) ** 0.5)
            nn.init.normal_(blk.out.weight, std=0.02 / (2 * cfg.layers) ** 0.5)

    def shard_head(self, vocab_start: int, vocab_end: int) -> None:
        """Keep only this rank's rows of the LM head (call right after init, so that
        every TP size starts from the same full matrix)."""
        self.head_weight = nn.Parameter(self.head_weight.detach()[vocab_start:vocab_end].clone())
        self.vocab_start = vocab_start

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        return self.ln_f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over this model's (shard of the) vocab."""
        return self.hidden(x) @ self.head_weight.T

    def next_logits(self, x: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Sampling with a key/value cache: ``x`` [B, t] continues the positions cached in
        ``caches`` (one dict per block, empty at the start; ``x`` is then the prompt, else one
        token); returns the logits [B, V] of the last position."""
        start = caches[0]["k"].shape[2] if caches[0] else 0
        h = self.tok(x) + self.pos(torch.arange(start, start + x.shape[1], device=x.device))
        for blk, cache in zip(self.blocks, caches):
            h = blk(h, cache)
        return self.ln_f(h[:, -1]) @ self.head_weight.T


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's ``f``: identity forward; backward all-reduces (sums) the gradient,
    since each rank's head shard contributes a part of d loss / d hidden."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def full_head_weight(model: TinyGPT, group=None) -> torch.Tensor:
    """The whole [V, d] head: the local matrix, or the shards all-gathered in rank order."""
    w = model.head_weight.detach()
    if group is None:
        return w
    parts = [torch.empty_like(w) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, w.contiguous(), group=group)
    return torch.cat(parts, 0)
