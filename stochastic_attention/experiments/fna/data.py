"""Passage classification data: which corpus (or work) a character passage comes from.

Texts are lower-cased and reduced to letters, space and basic punctuation, so that markup,
digits and capitalisation (verse numbers, wiki syntax, speaker names in capitals) cannot give
the answer away; a token is one character. Documents are split between train and test by a
seeded shuffle, so a test passage never comes from a document seen in training. Training
passages are fresh random crops every step; test passages are a fixed, seeded sample.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;:!?'-"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
_OUTSIDE = re.compile(f"[^{re.escape(ALPHABET)}]+")
_SPACES = re.compile(r"\s+")


@dataclass
class TextDoc:
    """A document as the corpus loaders return it (title, text, source)."""

    title: str
    text: str
    source: str = ""


def normalise(text: str) -> str:
    """Lower-case; anything outside ALPHABET becomes a space; runs of spaces collapse."""
    return _SPACES.sub(" ", _OUTSIDE.sub(" ", text.lower())).strip()


def encode(text: str) -> torch.Tensor:
    """Normalised text -> LongTensor of indices into ALPHABET."""
    return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)


@dataclass
class _Pool:
    """The token streams of some documents, for cropping passages that stay inside one."""

    tokens: torch.Tensor  # all documents concatenated
    starts: torch.Tensor  # first token of each document
    lengths: torch.Tensor

    def crops(self, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
        room = (self.lengths - length + 1).clamp(min=0).double()
        doc = torch.multinomial(room, count, replacement=True, generator=generator)
        offset = (torch.rand(count, generator=generator, dtype=torch.float64) * room[doc]).long()
        first = self.starts[doc] + offset
        return self.tokens[first[:, None] + torch.arange(length)]


def _pool(docs: Sequence[TextDoc], length: int) -> _Pool | None:
    encoded = [encode(normalise(d.text)) for d in docs]
    encoded = [e for e in encoded if len(e) >= length]
    if not encoded:
        return None
    lengths = torch.tensor([len(e) for e in encoded])
    starts = torch.cumsum(lengths, 0) - lengths
    return _Pool(torch.cat(encoded), starts, lengths)


@dataclass
class PassageTask:
    labels: list[str]
    passage_len: int
    train: list[_Pool]  # one per label
    test_tokens: torch.Tensor  # [N, passage_len]
    test_labels: torch.Tensor  # [N]
    split: dict[str, dict[str, list[str]]]  # label -> {"train": titles, "test": titles}

    @property
    def vocab_size(self) -> int:
        return len(ALPHABET)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A balanced-in-expectation batch of fresh training crops: (tokens [B, n], labels [B])."""
        labels = torch.randint(len(self.labels), (batch,), generator=generator)
        tokens = torch.empty(batch, self.passage_len, dtype=torch.long)
        for c, pool in enumerate(self.train):
            rows = (labels == c).nonzero().flatten()
            if len(rows):
                tokens[rows] = pool.crops(len(rows), self.passage_len, generator)
        return tokens, labels


def build_task(
    corpora: Mapping[str, Sequence[TextDoc]],
    *,
    passage_len: int,
    test_per_class: int,
    test_fraction: float,
    seed: int,
) -> PassageTask:
    """Split each label's documents into train / test (seeded) and draw the fixed test set.

    ``corpora`` maps a label to its documents (anything with ``title`` and ``text``).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    train, test_x, test_y, split = [], [], [], {}
    for c, (label, docs) in enumerate(corpora.items()):
        docs = [d for d in docs if len(d.text) >= passage_len]
        if len(docs) < 2:
            raise ValueError(f"label {label!r} needs at least 2 documents of >= {passage_len}"
                             f" characters to split into train and test, got {len(docs)}")
        docs = sorted(docs, key=lambda d: d.title)
        rng.shuffle(docs)
        n_test = min(len(docs) - 1, max(1, round(test_fraction * len(docs))))
        test_docs, train_docs = docs[:n_test], docs[n_test:]
        train_pool, test_pool = _pool(train_docs, passage_len), _pool(test_docs, passage_len)
        if train_pool is None or test_pool is None:
            raise ValueError(f"label {label!r}: too little text after normalisation")
        train.append(train_pool)
        test_x.append(test_pool.crops(test_per_class, passage_len, gen))
        test_y.append(torch.full((test_per_class,), c, dtype=torch.long))
        split[label] = {"train": [d.title for d in train_docs],
                        "test": [d.title for d in test_docs]}
    return PassageTask(list(corpora), passage_len, train, torch.cat(test_x), torch.cat(test_y),
                       split)


def synthetic_corpora(n_labels: int = 3, docs_per_label: int = 6, doc_words: int = 400,
                      seed: int = 0) -> dict[str, list[TextDoc]]:
    """Label-specific word distributions over a shared vocabulary: a small learnable stand-in
    for real corpora (tests, and runs without the shipped texts)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "re", "su", "ta", "ne", "vo", "pi", "da", "go", "ze"]
    vocab = sorted({rng.choice(syllables) + rng.choice(syllables) + rng.choice(syllables)
                    for _ in range(400)})
    corpora = {}
    for c in range(n_labels):
        favourite = rng.sample(vocab, len(vocab) // 4)
        docs = []
        for i in range(docs_per_label):
            words = [rng.choice(favourite) if rng.random() < 0.4 else rng.choice(vocab)
                     for _ in range(doc_words)]
            docs.append(TextDoc(f"{c}-{i}", " ".join(words), f"synthetic-{c}"))
        corpora[f"class{c}"] = docs
    return corpora
