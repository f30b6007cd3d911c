"""Evaluation tasks built reproducibly (seeded) from real text, and how each is scored.

- ``perplexity``: long passages (``ppl_length`` tokens) from several corpora; metric: perplexity.
- ``passkey``: a five-digit key hidden at a given depth in the classic repetitive filler; the
  model must produce it after the question (greedy decoding). Metric: accuracy.
- ``lastword`` (LAMBADA-like): a passage of a few hundred tokens whose final word already
  occurred earlier in it; the model must produce that word greedily. Metric: accuracy.
- ``nextline`` (HellaSwag-like): a passage and four candidate next sentences, the true one and
  three of similar length from other documents; pick the most likely (per-token log-likelihood).
  Metric: accuracy (chance 0.25).
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.sa_llama import cache_argument, output_cache

TASKS = ("perplexity", "passkey", "lastword", "nextline")
SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Task:
    name: str
    metric: str
    higher_is_better: bool
    length: int  # typical prompt length in tokens (for the budget)
    examples: list = field(default_factory=list)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE.split(" ".join(text.split())) if s.strip()]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens, from a HF tokenizer (callable) or any tokenizer with
    ``encode(text)`` such as the byte-level one used for pre-training."""
    if callable(tokenizer):
        return tokenizer(text, add_special_tokens=False).input_ids
    return list(tokenizer.encode(text))


def _passage(rng: random.Random, docs, tokenizer, n_tokens: int) -> list[int] | None:
    """n_tokens of one random document starting at a random sentence, or None if too short."""
    doc = rng.choice(docs)
    text = doc.text
    need = n_tokens * 8  # characters: generous for English BPE
    if len(text) < need // 2:
        return None
    start = rng.randrange(0, max(1, len(text) - need))
    start = text.find(". ", start) + 2 if text.find(". ", start) >= 0 else 0
    ids = _encode(tokenizer, text[start:start + need])
    return ids[:n_tokens] if len(ids) >= n_tokens else None


def perplexity_task(tokenizer, docs, *, count: int, length: int, seed: int) -> Task:
    rng = random.Random(seed)
    task = Task("perplexity", "perplexity", False, length)
    for _ in range(count * 50):
        if len(task.examples) == count:
            break
        ids = _passage(rng, docs, tokenizer, length)
        if ids is not None:
            task.examples.append(torch.tensor(ids))
    return task


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                 "and memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                  "back again. ")


def passkey_task(tokenizer, docs=None, *, lengths, depths, per_cell: int, seed: int) -> Task:
    """The classic passkey prompt (Mohtashami & Jaggi, 2023): repetitive filler, so retrieval,
    not reading comprehension, is what is measured (a 135M model fails with real-text filler
    even under full attention). ``docs`` is unused; kept for a uniform builder signature."""
    rng = random.Random(seed)
    task = Task("passkey", "accuracy", True, max(lengths))
    enc = lambda text: _encode(tokenizer, text)  # noqa: E731
    intro, filler_unit = enc(PASSKEY_INTRO), enc(PASSKEY_FILLER)
    question = enc("\nWhat is the pass key? The pass key is")
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                key = str(rng.randrange(10_000, 100_000))
                needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
                room = length - len(intro) - len(needle) - len(question)
                filler = (filler_unit * (room // len(filler_unit) + 1))[:max(room, 0)]
                at = int(len(filler) * depth)
                prompt = intro + filler[:at] + needle + filler[at:] + question
                task.examples.append({"ids": torch.tensor(prompt), "key": key,
                                      "length": length, "depth": depth})
    return task


def lastword_task(tokenizer, docs, *, count: int, context: int, seed: int) -> Task:
    rng = random.Random(seed)
    task = Task("lastword", "accuracy", True, context)
    for _ in range(count * 200):
        if len(task.examples) == count:
            break
        doc = rng.choice(docs)
        sents = _sentences(doc.text[: 200_000])
        if len(sents) < 10:
            continue
        end = rng.randrange(5, len(sents))
        words = sents[end].rstrip(".!?\"'").split()
        if len(words) < 4 or not re.fullmatch(r"[A-Za-z]{4,}", words[-1]):
            continue
        target = words[-1]
        body = " ".join(sents[max(0, end - 40):end] + [" ".join(words[:-1])])
        ctx_ids = _encode(tokenizer, body)[-context:]
        ctx_text = tokenizer.decode(ctx_ids)
        if re.search(rf"\b{target}\b", ctx_text) is None:  # the context must hold the answer
            continue
        tgt_ids = _encode(tokenizer, " " + target)
        task.examples.append({"context": torch.tensor(ctx_ids), "target": torch.tensor(tgt_ids)})
    return task


def nextline_task(tokenizer, docs, *, count: int, context: int, seed: int) -> Task:
    rng = random.Random(seed)
    task = Task("nextline", "accuracy", True, context)
    pool = [(i, s) for i, d in enumerate(docs) for s in _sentences(d.text[:20_000])
            if 6 <= len(s.split()) <= 40]
    for _ in range(count * 200):
        if len(task.examples) == count:
            break
        di = rng.randrange(len(docs))
        sents = _sentences(docs[di].text[:200_000])
        if len(sents) < 10:
            continue
        end = rng.randrange(5, len(sents))
        true = sents[end]
        n_words = len(true.split())
        if not 6 <= n_words <= 40:
            continue
        others = [s for i, s in rng.sample(pool, min(len(pool), 400))
                  if i != di and 0.7 <= len(s.split()) / n_words <= 1.4][:3]
        if len(others) < 3:
            continue
        ctx_ids = _encode(tokenizer, " ".join(sents[max(0, end - 40):end]))[-context:]
        choices = [true, *others]
        order = list(range(4))
        rng.shuffle(order)
        task.examples.append({
            "context": torch.tensor(ctx_ids),
            "choices": [torch.tensor(_encode(tokenizer, " " + choices[j])) for j in order],
            "label": order.index(0)})
    return task


# ---- scoring -------------------------------------------------------------------------------
# Prompts run through the patched method (prefill); answers are then read token by token with
# the KV cache (decoding), as in generation: the paper's protocol.

def _prefill(model, ids: torch.Tensor):
    """(log-probs of the next token after the prompt [V], KV cache)."""
    with torch.no_grad():
        out = model(ids[None], use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1].float(), -1), output_cache(out)


def _continuation_logprobs(model, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """[len(answer), V] log-probs predicting each answer token, prompt prefilled then cached."""
    first, cache = _prefill(model, ids)
    if len(answer) == 1:
        return first[None]
    with torch.no_grad():
        rest = model(answer[None, :-1], **cache_argument(cache), use_cache=True).logits[0]
    return torch.cat([first[None], torch.log_softmax(rest.float(), -1)])


def score_perplexity(model, task: Task, tokenizer=None) -> float:
    nll, count = 0.0, 0
    for ids in task.examples:
        with torch.no_grad():
            logits = model(ids[None]).logits[0, :-1].float()
        nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return float(torch.exp(torch.tensor(nll / count)))


def score_passkey(model, task: Task, tokenizer) -> float:
    hits = 0
    for ex in task.examples:
        with torch.no_grad():
            out = model.generate(ex["ids"][None], attention_mask=torch.ones_like(ex["ids"])[None],
                                 max_new_tokens=7, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        hits += ex["key"] in tokenizer.decode(out[0, len(ex["ids"]):])
    return hits / len(task.examples)


def score_lastword(model, task: Task, tokenizer=None) -> float:
    """Greedy decoding would produce the word: every answer token is the argmax."""
    hits = 0
    for ex in task.examples:
        logp = _continuation_logprobs(model, ex["context"], ex["target"])
        hits += bool(torch.equal(logp.argmax(-1), ex["target"]))
    return hits / len(task.examples)


def score_nextline(model, task: Task, tokenizer=None) -> float:
    """The choice with the highest mean log-probability per token (one prefill per example)."""
    hits = 0
    for ex in task.examples:
        first, cache = _prefill(model, ex["context"])
        scores = []
        for choice in ex["choices"]:
            logp = first[choice[0]]
            if len(choice) > 1:
                with torch.no_grad():
                    rest = model(choice[None, :-1], **cache_argument(copy.deepcopy(cache)),
                                 use_cache=True).logits[0].float()
                logp = logp + torch.log_softmax(rest, -1).gather(-1, choice[1:, None]).sum()
            scores.append(logp.item() / len(choice))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == ex["label"])
    return hits / len(task.examples)


SCORERS: dict[str, Callable] = {
    "perplexity": score_perplexity,
    "passkey": score_passkey,
    "lastword": score_lastword,
    "nextline": score_nextline,
}
