"""Data, teacher and the teacher's top-k, each cached under ``<out>/cache``.

Cache keys hash everything that determines the artefact (corpus bytes, sizes, seed),
so a changed stdlib or setting retrains instead of reusing a stale file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .corpus import BytePairTokenizer, read_corpus
from .model import ModelConfig, TinyGPT


@dataclass(frozen=True)
class DemoSizes:
    """Everything about a demo run's scale (the full default and ``--tiny``)."""

    corpus_bytes: int
    file_bytes: int        # at most this much of each stdlib file
    vocab_size: int
    context: int
    teacher_d: int
    teacher_layers: int
    teacher_heads: int
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    student_d: int
    student_layers: int
    student_heads: int
    student_steps: int
    student_batch: int
    student_lr: float
    pool_windows: int      # training windows whose teacher top-k is extracted and stored
    eval_windows: int      # held-out windows for the final table
    curve_windows: int     # held-out windows for the KL curve during training
    eval_every: int

    def teacher_cfg(self) -> ModelConfig:
        return ModelConfig(self.vocab_size, self.context, self.teacher_d, self.teacher_layers,
                           self.teacher_heads)

    def student_cfg(self) -> ModelConfig:
        return ModelConfig(self.vocab_size, self.context, self.student_d, self.student_layers,
                           self.student_heads)


# FULL is sized for `make demo` on a 2-core CPU: about 3 minutes from an empty cache (BPE
# ~10 s, teacher ~1-1.5 min, top-k ~10 s, six students ~10 s each), seconds once cached.
FULL = DemoSizes(
    corpus_bytes=4_000_000, file_bytes=32_768, vocab_size=1024, context=64,
    teacher_d=128, teacher_layers=3, teacher_heads=4, teacher_steps=500, teacher_batch=16,
    teacher_lr=3e-3,
    student_d=64, student_layers=2, student_heads=4, student_steps=300, student_batch=16,
    student_lr=3e-3,
    pool_windows=2048, eval_windows=64, curve_windows=16, eval_every=10,
)

# TINY (`--tiny` / `--smoke`, used by tests/test_demo.py): every stage, in seconds.
TINY = DemoSizes(
    corpus_bytes=120_000, file_bytes=4_096, vocab_size=320, context=32,
    teacher_d=64, teacher_layers=2, teacher_heads=2, teacher_steps=200, teacher_batch=16,
    teacher_lr=3e-3,
    student_d=32, student_layers=1, student_heads=2, student_steps=40, student_batch=8,
    student_lr=3e-3,
    pool_windows=64, eval_windows=8, curve_windows=4, eval_every=5,
)


def _key(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:12]


def id_dtype(vocab_size: int):
    """The narrowest integer dtype that holds every token id (int16 up to 32767 ids)."""
    return (np.int16, torch.int16) if vocab_size <= 2 ** 15 - 1 else (np.int32, torch.int32)


def progress_bar(iterable, desc: str, enabled: bool):
    """tqdm that redraws at most every 0.5 s on a terminal and every 20 s in a log file."""
    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=tty,
                mininterval=0.5 if tty else 20.0, file=sys.stderr)


def _savez(path: str, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


@dataclass
class Data:
    key: str
    tokenizer: BytePairTokenizer
    train: np.ndarray     # token ids (int16, or int32 for a vocab over 32767)
    heldout: np.ndarray
    info: dict


def prepare_data(sizes: DemoSizes, cache: str, log=print) -> Data:
    train_b, held_b, info = read_corpus(sizes.corpus_bytes, sizes.file_bytes)
    key = _key("data-v1", sizes.vocab_size, train_b, held_b)
    path = os.path.join(cache, f"data-{key}.npz")
    if os.path.exists(path):
        z = np.load(path)
        tok = BytePairTokenizer(z["merges"].tolist())
        log(f"data: cached {path}")
        train, held = z["train"], z["heldout"]
    else:
        t0 = time.time()
        tok = BytePairTokenizer.train(train_b, sizes.vocab_size)
        np_ids = id_dtype(sizes.vocab_size)[0]
        train = np.asarray(tok.encode(train_b), dtype=np_ids)
        held = np.asarray(tok.encode(held_b), dtype=np_ids)
        merges = np.asarray(tok.merges, dtype=np_ids).reshape(-1, 2)
        _atomic(path, lambda p: _savez(p, merges=merges, train=train, heldout=held))
        log(f"data: BPE with {sizes.vocab_size} tokens trained and applied in {time.time() - t0:.1f}s")
    info = dict(info, train_bytes=len(train_b), heldout_bytes=len(held_b), train_tokens=len(train),
                heldout_tokens=len(held), bytes_per_token=round(len(train_b) / len(train), 3))
    log(f"data: {info['files']} stdlib files, {info['bytes']:,} bytes -> {len(train):,} train / "
        f"{len(held):,} held-out tokens ({info['bytes_per_token']} bytes/token)")
    return Data(key, tok, train, held, info)


def windows(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``length`` tokens from the start of ``tokens``."""
    count = min(count, len(tokens) // length)
    return torch.from_numpy(tokens[: count * length].astype(np.int64)).view(count, length)


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, lr: float, steps: int):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, steps, lr) / lr)
    return opt, sched


@torch.no_grad()
def heldout_nll(model: TinyGPT, win: torch.Tensor, device, batch: int = 16) -> float:
    total, n = 0.0, 0
    for i in range(0, len(win), batch):
        x = win[i:i + batch].to(device)
        logits = model(x[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        n += x[:, 1:].numel()
    return total / n


def get_teacher(sizes: DemoSizes, data: Data, seed: int, device, cache: str, progress=True,
                log=print) -> tuple[TinyGPT, dict]:
    cfg = sizes.teacher_cfg()
    key = _key("teacher-v2", data.key, cfg.to_dict(), sizes.teacher_steps, sizes.teacher_batch,
               sizes.teacher_lr, seed)
    path = os.path.join(cache, f"teacher-{key}.pt")
    model = TinyGPT(cfg)
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state"])
        meta = json.loads(saved["meta"])
        meta.update(cached=True, key=key)
        log(f"teacher: cached {path} (trained in {meta['train_s']:.0f}s, "
            f"held-out ppl {meta['heldout_ppl']:.2f})")
        return model.to(device).eval(), meta
    torch.manual_seed(seed)
    model = TinyGPT(cfg).to(device)
    opt, sched = make_optimizer(model, sizes.teacher_lr, sizes.teacher_steps)
    gen = torch.Generator().manual_seed(seed)
    train = torch.from_numpy(data.train.astype(np.int64))
    span = sizes.context + 1
    t0 = time.time()
    bar = progress_bar(range(sizes.teacher_steps), "teacher", progress)
    for step in bar:
        starts = torch.randint(0, len(train) - span, (sizes.teacher_batch,), generator=gen)
        x = torch.stack([train[s:s + span] for s in starts.tolist()]).to(device)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == sizes.teacher_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    train_s = time.time() - t0
    model.eval()
    held = windows(data.heldout, span, sizes.eval_windows)   # the final table's windows
    nll = heldout_nll(model, held, device)
    meta = {"train_s": train_s, "final_train_loss": loss.item(), "heldout_nll": nll,
            "heldout_ppl": math.exp(nll), "params": sum(p.numel() for p in model.parameters()),
            "config": cfg.to_dict(), "steps": sizes.teacher_steps}
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    _atomic(path, lambda p: torch.save({"state": state, "meta": json.dumps(meta)}, p))
    meta.update(cached=False, key=key)
    log(f"teacher: trained in {train_s:.0f}s, held-out ppl {meta['heldout_ppl']:.2f} -> {path}")
    return model, meta


@dataclass
class TopK:
    path: str
    windows: torch.Tensor    # [P, T + 1] int64 token ids (input = [:, :-1], next token = [:, 1:])
    ids: torch.Tensor        # [P, T, K] teacher top-k ids (int16; int32 if V > 32767), best first
    logprobs: torch.Tensor   # [P, T, K] fp16 teacher log-probs over the full vocab


@torch.no_grad()
def get_topk(sizes: DemoSizes, data: Data, teacher: TinyGPT, teacher_key: str, k: int, seed: int,
             device, cache: str, log=print) -> TopK:
    """What a vLLM server returns for ``prompt_logprobs=k``: at every prompt position,
    log_softmax over the full vocab of the next-token logits, then its top k."""
    key = _key("topk-v1", teacher_key, k, sizes.pool_windows, sizes.context, seed)
    path = os.path.join(cache, f"topk-K{k}-{key}.npz")
    if os.path.exists(path):
        z = np.load(path)
        log(f"top-k: cached {path}")
        return TopK(path, torch.from_numpy(z["windows"].astype(np.int64)),
                    torch.from_numpy(z["ids"]), torch.from_numpy(z["logprobs"]))
    t0 = time.time()
    win = windows(data.train, sizes.context + 1, len(data.train))
    perm = torch.randperm(len(win), generator=torch.Generator().manual_seed(seed))
    win = win[perm[: sizes.pool_windows]]
    ids, lps = [], []
    for i in range(0, len(win), 32):
        logits = teacher(win[i:i + 32, :-1].to(device)).float()
        v, j = torch.log_softmax(logits, -1).topk(k, dim=-1)
        ids.append(j.to(id_dtype(sizes.vocab_size)[1]).cpu())
        lps.append(v.to(torch.float16).cpu())
    ids, lps = torch.cat(ids), torch.cat(lps)
    np_ids = id_dtype(sizes.vocab_size)[0]
    _atomic(path, lambda p: _savez(p, windows=win.numpy().astype(np_ids), ids=ids.numpy(),
                                   logprobs=lps.numpy()))
    mb = os.path.getsize(path) / 2 ** 20
    log(f"top-k: teacher top-{k} of {ids.shape[0] * ids.shape[1]:,} positions in "
        f"{time.time() - t0:.1f}s -> {path} ({mb:.1f} MiB, {ids.dtype} ids + fp16 log-probs)".replace("torch.", ""))
    return TopK(path, win, ids, lps)
