"""A long-range synthetic probe: retrieve a pass key planted far back in natural text.

``... The pass key is 48213. <filler> The pass key is 48213`` -> the model must copy the
digits. Scored teacher-forced (each digit given the previous correct ones), so no
sampling noise. Placing the key ``distance`` tokens before the question decides whether a
windowed model can reach it directly (distance < window) or only through depth or random
links. Chance is 10% per digit.

Small models may not copy exactly, so the probe also measures whether the planted key helps
at all: ``retrieval_gain`` is the answer's loss with a DIFFERENT key planted minus its loss
with the right one (nats per answer token; 0 = the model does not use the key).
"""

from __future__ import annotations

import numpy as np
import torch

QUESTION = " The pass key is "


def passkey_examples(
    tokenizer, filler: np.ndarray, *, seq_len: int, distance: int, trials: int,
    digits: int = 5, seed: int = 0,
) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """``trials`` (ids, answer start, control ids) of exactly ``seq_len`` tokens each.

    The control is the same sequence with every planted key digit changed (the answer stays).

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
        other = "".join(str((int(c) + s) % 10) for c, s in zip(key, rng.integers(1, 10, digits),
                                                                  strict=True))
        control = ids.copy()
        wrong = tokenizer.encode(other)
        if len(wrong) == len(answer):  # else the control would shift the text: keep it equal
            control[lead + len(question):lead + len(question) + len(answer)] = wrong
        examples.append((ids.astype(np.int64), seq_len - len(answer), control.astype(np.int64)))
    return examples


@torch.no_grad()
def passkey_accuracy(model, tokenizer, filler: np.ndarray, *, seq_len: int, distance: int,
                     trials: int = 32, digits: int = 5, seed: int = 0,
                     batch_size: int = 8) -> dict[str, float]:
    """Teacher-forced digit accuracy, exact-match rate and retrieval gain over planted keys."""
    examples = passkey_examples(tokenizer, filler, seq_len=seq_len, distance=distance,
                                trials=trials, digits=digits, seed=seed)
    model.eval()
    device = next(model.parameters()).device
    correct, exact, gain = [], [], []
    for i in range(0, trials, batch_size):
        chunk = examples[i:i + batch_size]
        batch = torch.from_numpy(np.stack([e[0] for e in chunk])).to(device)
        control = torch.from_numpy(np.stack([e[2] for e in chunk])).to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        control_logits = model(input_ids=control, use_cache=False).logits.float()
        for b, (_, start, _) in enumerate(chunk):
            target = batch[b, start:]
            hits = (logits[b, start - 1:-1].argmax(-1) == target).float()  # t predicts t + 1
            correct.append(hits.mean().item())
            exact.append(float(hits.all().item()))
            nll = torch.nn.functional.cross_entropy(logits[b, start - 1:-1], target)
            nll_control = torch.nn.functional.cross_entropy(control_logits[b, start - 1:-1],
                                                            target)
            gain.append((nll_control - nll).item())
    return {"digit_accuracy": float(np.mean(correct)), "exact_match": float(np.mean(exact)),
            "retrieval_gain": float(np.mean(gain))}
