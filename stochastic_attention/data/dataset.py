"""Tokenised pre-training data: document-level split, memmap cache, deterministic order.

Each source is split into train / validation BY DOCUMENT (a document never straddles the
split), tokenised once with an end-of-document token after every document, and cached as two
flat arrays (``train.bin``, ``val.bin``) that later runs memory-map instantly. The cache key
covers the source, the tokenizer and the split, so changing any of them re-tokenises.

Training samples are non-overlapping chunks of ``seq_len + 1`` tokens (inputs and shifted
targets). Global sample ``g`` is a pure function of (seed, g): epochs are permutations of
all chunks of all sources, so a run resumed at sample ``g`` sees exactly the same data, and
ranks of a distributed run can each take their slice of the same global batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..progress import tqdm
from .sources import DataError, Source

CACHE_VERSION = 1


@dataclass
class TokenSplits:
    name: str
    train: np.ndarray
    val: np.ndarray


def split_documents(
    texts: list[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of the (train, validation) documents: a seeded shuffle, at least one of each."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(texts) < 2:
        raise DataError(f"a source needs at least 2 documents to split by document, got "
                         f"{len(texts)}; give several files (one document per file)")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _write_tokens(path: Path, docs: list[str], tokenizer, desc: str) -> int:
    dtype = _dtype(tokenizer.vocab_size)
    tmp = path.with_suffix(".tmp")
    total = 0
    with open(tmp, "wb") as f:
        for text in tqdm(docs, desc=desc, unit="doc", leave=False):
            ids = np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype=dtype)
            f.write(ids.tobytes())
            total += len(ids)
    os.replace(tmp, path)
    return total


def prepare_source(source: Source, tokenizer, cache_dir: str | Path, *, val_fraction: float = 0.05,
                   split_seed: int = 0) -> TokenSplits:
    """Tokenise ``source`` into cached train / val arrays (or map the existing cache)."""
    key = f"{source.name}-{source.fingerprint()}-{tokenizer.name.replace('/', '_')}-" \
          f"v{val_fraction}-s{split_seed}-c{CACHE_VERSION}"
    directory = Path(cache_dir).expanduser() / key
    meta_path = directory / "meta.json"
    if not meta_path.exists():  # meta.json is written last: its presence means complete
        directory.mkdir(parents=True, exist_ok=True)
        texts = source.load()
        train_idx, val_idx = split_documents(texts, val_fraction, split_seed)
        meta = {
            "source": source.name, "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(_dtype(tokenizer.vocab_size)).name,
            "train_documents": len(train_idx), "val_documents": len(val_idx),
            "train_tokens": _write_tokens(directory / "train.bin", [texts[i] for i in train_idx],
                                          tokenizer, f"tokenising {source.name} (train)"),
            "val_tokens": _write_tokens(directory / "val.bin", [texts[i] for i in val_idx],
                                        tokenizer, f"tokenising {source.name} (val)"),
        }
        meta_path.write_text(json.dumps(meta, indent=1))
    meta = json.loads(meta_path.read_text())
    if meta["vocab_size"] != tokenizer.vocab_size:
        raise DataError(f"token cache {directory} was built for vocab {meta['vocab_size']}, "
                         f"tokenizer has {tokenizer.vocab_size}; delete the directory")
    arrays = [np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r")
              for split in ("train", "val")]
    return TokenSplits(source.name, *arrays)


class ChunkSampler:
    """Non-overlapping (seq_len + 1)-token chunks over several arrays, in seeded epoch order."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, seed: int = 0) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.arrays, self.seq_len, self.seed = arrays, seq_len, seed
        counts = [max(0, (len(a) - 1) // seq_len) for a in arrays]
        self.offsets = np.cumsum([0] + counts)
        if self.num_chunks == 0:
            raise DataError(f"not enough tokens for one sequence of seq_len={seq_len}")
        self._epoch, self._order = -1, None

    @property
    def num_chunks(self) -> int:
        return int(self.offsets[-1])

    def chunk(self, index: int) -> np.ndarray:
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[source])) * self.seq_len
        return self.arrays[source][start:start + self.seq_len + 1]

    def sample_index(self, g: int) -> int:
        """The chunk that global sample ``g`` reads."""
        epoch, within = divmod(g, self.num_chunks)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
        return int(self._order[within])

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Global samples [start, start + size) as a LongTensor [size, seq_len + 1]."""
        rows = [self.chunk(self.sample_index(g)) for g in range(start, start + size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def sequential(self, max_chunks: int | None = None) -> list[int]:
        """Chunk indices in order (validation), at most ``max_chunks``."""
        n = self.num_chunks if max_chunks is None else min(max_chunks, self.num_chunks)
        return list(range(n))
