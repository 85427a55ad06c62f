"""The demo's corpus and tokenizer: Python standard-library source, byte-level BPE.

Every machine that runs the demo has this text (it is the interpreter's own
``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded. The result is
deterministic for a given stdlib: files in sorted order, fixed byte caps, every
tenth file held out, and a BPE whose merges are ranked by count with ties broken
by the smaller pair.
"""
from __future__ import annotations

import heapq
import os
import re
import sysconfig
from collections import Counter, defaultdict

# Directories that are tests, third-party, bytecode or generated data tables (codec maps,
# pydoc's topic dump), and files that differ per machine.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "encodings", "pydoc_data"}
_SKIP_FILE_PREFIXES = ("_sysconfigdata",)

# GPT-2-style pre-tokenisation, ASCII-only so that it needs no third-party regex:
# words with an optional leading space, numbers, runs of punctuation, and whitespace
# (a run of spaces before a word leaves its last space to the word, so indentation
# becomes its own token). Every byte matches one alternative, so the split is lossless.
_CHUNK_RE = re.compile(rb" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+(?!\S)|\s+")


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """(relative posix path, absolute path) of the stdlib's .py files, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_SKIP_FILE_PREFIXES):
                full = os.path.join(dirpath, name)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    out.sort()
    return out


def read_corpus(max_bytes: int, max_file_bytes: int, heldout_every: int = 10,
                ) -> tuple[bytes, bytes, dict]:
    """Concatenate stdlib sources, in path order, each cut at ``max_file_bytes`` (so that
    a few big modules do not crowd out the rest), until ``max_bytes`` in all.

    Every ``heldout_every``-th file taken goes to the held-out split, the rest to training.
    Returns (train bytes, held-out bytes, info).
    """
    train, held = [], []
    total = n_files = 0
    for rel, full in stdlib_files():
        if total >= max_bytes:
            break
        with open(full, "rb") as f:
            data = f.read(min(max_file_bytes, max_bytes - total))
        if not data:
            continue
        total += len(data)
        n_files += 1
        (held if n_files % heldout_every == 0 else train).append(data)
    info = {"stdlib": sysconfig.get_paths()["stdlib"], "files": n_files, "bytes": total}
    return b"".join(train), b"".join(held), info


class BytePairTokenizer:
    """Byte-level BPE: ids 0..255 are bytes, id 256 + i is merge i."""

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.vocab_size = 256 + len(self.merges)
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def train(cls, text: bytes, vocab_size: int) -> "BytePairTokenizer":
        """Learn ``vocab_size - 256`` merges on ``text``, most frequent pair first."""
        counts = Counter(_CHUNK_RE.findall(text))
        words = [list(chunk) for chunk in counts]
        freqs = list(counts.values())
        pair_count: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for wi, w in enumerate(words):
            for p in zip(w, w[1:]):
                pair_count[p] += freqs[wi]
                where[p].add(wi)
        # Max-heap of (count, pair) with lazy invalidation; ties go to the smaller pair.
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < vocab_size - 256 and heap:
            negc, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -negc or negc == 0:
                continue  # stale entry
            new = 256 + len(merges)
            merges.append(pair)
            touched = set()
            for wi in where.pop(pair):
                w, f = words[wi], freqs[wi]
                if not any(a == pair[0] and b == pair[1] for a, b in zip(w, w[1:])):
                    continue  # stale membership
                for p in zip(w, w[1:]):
                    pair_count[p] -= f
                    touched.add(p)
                w = _merge(w, pair, new)
                words[wi] = w
                for p in zip(w, w[1:]):
                    pair_count[p] += f
                    where[p].add(wi)
                    touched.add(p)
            for p in touched:
                c = pair_count[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    del pair_count[p]
        return cls(merges)

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        ids = self._cache.get(chunk)
        if ids is None:
            ids = list(chunk)
            while len(ids) > 1:
                rank = min((self.ranks.get(p, 1 << 30) for p in zip(ids, ids[1:])))
                if rank == 1 << 30:
                    break
                ids = _merge(ids, self.merges[rank], 256 + rank)
            self._cache[chunk] = ids
        return ids

    def encode(self, text: bytes) -> list[int]:
        out: list[int] = []
        for chunk in _CHUNK_RE.findall(text):
            out.extend(self._encode_chunk(chunk))
        return out

    def token_bytes(self) -> list[bytes]:
        table = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            table.append(table[a] + table[b])
        return table

    def decode(self, ids) -> bytes:
        table = self.token_bytes()
        return b"".join(table[i] for i in ids)


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
