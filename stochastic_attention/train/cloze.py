"""Zero-shot cloze accuracy of a pre-trained model on held-out documents of its own corpora.

The ``lastword`` (LAMBADA-like) and ``nextline`` (HellaSwag-like) tasks of
:mod:`stochastic_attention.eval.tasks`, built from the validation documents of the run's
sources (never seen in training) with the model's own tokenizer. The same seed gives every
model the same examples, so accuracies are comparable across runs.
"""

from __future__ import annotations

from ..data import parse_source
from ..data.corpora import Document
from ..data.dataset import split_documents
from ..eval.tasks import lastword_task, nextline_task, score_lastword, score_nextline
from .config import ExperimentConfig

CLOZE_TASKS = {"lastword": (lastword_task, score_lastword),
               "nextline": (nextline_task, score_nextline)}


def heldout_documents(cfg: ExperimentConfig) -> list[Document]:
    """The validation documents of every source, split exactly as for training."""
    docs = []
    for entry in cfg.data.sources:
        source = parse_source(entry)
        texts = source.load()
        _, val = split_documents(texts, cfg.data.val_fraction, cfg.data.split_seed)
        docs += [Document(f"{source.name}[{i}]", texts[i], source.name) for i in val]
    return docs


def cloze_accuracy(model, tokenizer, docs: list[Document], *, examples: int, context: int,
                   seed: int) -> dict:
    """{task: {"accuracy": float | None, "examples": int}} for ``lastword`` and ``nextline``.

    ``examples`` is the number asked for; fewer are built when the documents hold too few
    suitable sentences (accuracy None when there are none).
    """
    if examples < 1 or context < 1:
        raise ValueError(f"cloze examples and context must be >= 1, got {examples}, {context}")
    scores = {}
    for name, (build, score) in CLOZE_TASKS.items():
        task = build(tokenizer, docs, count=examples, context=context, seed=seed)
        accuracy = score(model, task) if task.examples else None
        scores[name] = {"accuracy": accuracy, "examples": len(task.examples)}
    return scores
