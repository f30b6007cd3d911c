"""A long-range synthetic probe: retrieve a pass key planted far back in natural text.

``... The pass key is 48213. <filler> The pass key is 48213`` -> the model must copy the
digits. Scored teacher-forced (each digit given the previous correct ones), so no
sampling noise. Placing the key ``distance`` tokens before the question decides whether a
windowed model can reach it directly (distance < window) or only through depth or random
links. Chance is 10% per digit.
"""

from __future__ import annotations

import numpy as np
import torch

QUESTION = " The pass key is "


def passkey_examples(tokenizer, filler: np.ndarray, *, seq_len: int, distance: int,
                     trials: int, digits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """``trials`` sequences of exactly ``seq_len`` tokens and where each answer starts.

    filler: token ids of natural text (e.g. a validation split) to cut the padding from.
    distance: tokens from each planted key token to the answer token that copies it (for a
        windowed layer, the key is directly visible when distance < window).
    """
    rng = np.random.default_rng(seed)
    question = tokenizer.encode(QUESTION)
    examples = []
    for _ in range(trials):
        key = "".join(str(d) for d in rng.integers(0, 10, digits))
        answer = tokenizer.encode(key)
        needle = tokenizer.encode(f"{QUESTION}{key}.")
        tail = len(needle) - len(question) - len(answer)  # tokens after the key: "."
        gap = distance - len(answer) - tail - len(question)
        lead = seq_len - len(needle) - gap - len(question) - len(answer)
        if gap < 0 or lead < 0 or len(filler) <= seq_len:
            raise ValueError(f"distance={distance} does not fit in seq_len={seq_len} (or the "
                             f"filler is shorter than seq_len); use a distance between "
                             f"{distance - gap} and about seq_len - 64")
        starts = rng.integers(0, len(filler) - seq_len, 2)
        ids = np.concatenate([filler[starts[0]:starts[0] + lead], needle,
                              filler[starts[1]:starts[1] + gap], question, answer])
        examples.append((ids.astype(np.int64), seq_len - len(answer)))
    return examples


@torch.no_grad()
def passkey_accuracy(model, tokenizer, filler: np.ndarray, *, seq_len: int, distance: int,
                     trials: int = 32, digits: int = 5, seed: int = 0,
                     batch_size: int = 8) -> dict[str, float]:
    """Teacher-forced digit accuracy and exact-match rate of ``model`` over planted keys."""
    examples = passkey_examples(tokenizer, filler, seq_len=seq_len, distance=distance,
                                trials=trials, digits=digits, seed=seed)
    model.eval()
    device = next(model.parameters()).device
    correct, exact = [], []
    for i in range(0, trials, batch_size):
        chunk = examples[i:i + batch_size]
        batch = torch.from_numpy(np.stack([ids for ids, _ in chunk])).to(device)
        predicted = model(input_ids=batch, use_cache=False).logits.argmax(-1)
        for row, pred, (_, start) in zip(batch, predicted, chunk, strict=True):
            hits = (pred[start - 1:-1] == row[start:]).float()  # logits at t predict t + 1
            correct.append(hits.mean().item())
            exact.append(float(hits.all().item()))
    return {"digit_accuracy": float(np.mean(correct)), "exact_match": float(np.mean(exact))}
