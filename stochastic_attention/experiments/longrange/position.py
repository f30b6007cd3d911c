"""Mean next-token loss as a function of position in real long documents.

The loss at position ``p`` is the loss of predicting token ``p`` from the ``p`` tokens before
it (so positions run 1..n-1 for an n-token document). Positions are grouped into buckets on a
log2 axis, ``[1, 2), [2, 4), ..., [1024, 2048)``. A curve that keeps falling with position means
the model uses distant context; a model that only sees its last ``w`` tokens flattens beyond
``w``. Documents are the held-out split of the offline corpora that ``sattn train`` uses, cut
at their start, so position ``p`` is also the position in the document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...data.dataset import split_documents
from ...data.sources import parse_source

DEFAULT_SOURCES = ("wikipedia", "bible", "shakespeare")


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 *, chunk: int = 512) -> torch.Tensor:
    """Per-token negative log-likelihood ``[B, n-1]`` (float64): entry ``i`` scores token
    ``i + 1`` given tokens ``0..i``. Entries whose input or target is padding are NaN.

    The log-softmax runs in float32 over ``chunk`` positions at a time, so a large vocabulary
    never needs a float64 copy of all logits.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a LongTensor [batch, length]; use ids[None] for one "
                         "document")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens to score one, got {input_ids.shape[1]}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must match")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    out = torch.empty(targets.shape, dtype=torch.float64)
    for start in range(0, targets.shape[1], chunk):
        part = logits[:, start:start + chunk].float()
        nll = F.cross_entropy(part.transpose(1, 2), targets[:, start:start + part.shape[1]],
                              reduction="none")
        out[:, start:start + part.shape[1]] = nll.double().cpu()
    if attention_mask is not None:
        valid = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
        out[~valid.cpu()] = float("nan")
    return out


def log2_edges(max_position: int) -> list[int]:
    """``[1, 2, 4, ..., 2**k]`` with ``2**k > max_position``: buckets ``[2**i, 2**(i+1))``."""
    if max_position < 1:
        raise ValueError(f"max_position must be >= 1, got {max_position}")
    return [2 ** i for i in range(int(math.floor(math.log2(max_position))) + 2)]


def _check_edges(edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"buckets must be >= 2 increasing positions starting at >= 1 (e.g. "
                         f"[1, 2, 4, 8]), got {edges}")
    return edges


def bucket_stats(losses: torch.Tensor, edges: Sequence[int]) -> list[dict]:
    """Per bucket ``[lo, hi)`` of positions: mean loss over all its tokens in all documents,
    its standard error over tokens (``sem``), the standard error of the per-document bucket
    means (``doc_sem``; tokens of one document are correlated, so it is the more honest one),
    the token count and the per-document means (``doc_means``, None where a document has no
    token in the bucket; they allow paired comparisons of methods on the same documents).
    ``losses`` is ``[docs, n-1]`` from :func:`token_losses`; NaN entries
    (padding) are left out."""
    edges = _check_edges(edges)
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if losses.dim() != 2:
        raise ValueError(f"losses must be [docs, positions], got shape {tuple(losses.shape)}")
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        part = losses[:, lo - 1:hi - 1]  # column i holds position i + 1
        values = part[~torch.isnan(part)]
        count = values.numel()
        mean = values.mean().item() if count else float("nan")
        sem = (values.std(unbiased=True).item() / math.sqrt(count)) if count > 1 else float("nan")
        doc_means = [row[~torch.isnan(row)].mean().item() if (~torch.isnan(row)).any() else None
                     for row in part]
        per_doc = [m for m in doc_means if m is not None]
        doc_sem = float(np.std(per_doc, ddof=1) / math.sqrt(len(per_doc))) \
            if len(per_doc) > 1 else float("nan")
        rows.append(dict(lo=lo, hi=hi, mean=mean, sem=sem, doc_sem=doc_sem, count=count,
                         doc_means=doc_means))
    return rows


def loss_by_position(model, docs: Sequence[torch.Tensor], *, buckets: Sequence[int] | None = None,
                     progress: bool = True, desc: str = "documents") -> dict:
    """Token losses of every document (one forward each), bucketed by position.

    ``buckets`` are the edges (default :func:`log2_edges` of the longest document). Returns
    ``{"edges", "buckets": [{lo, hi, mean, sem, doc_sem, count, doc_means}], "mean_loss", "tokens",
    "docs"}``.
    """
    if not docs:
        raise ValueError("docs is empty: give at least one token tensor")
    longest = max(len(d) for d in docs)
    edges = _check_edges(buckets) if buckets is not None else log2_edges(longest - 1)
    rows = torch.full((len(docs), longest - 1), float("nan"), dtype=torch.float64)
    device = next(model.parameters()).device
    for i, ids in enumerate(tqdm(docs, desc=desc, unit="doc", disable=not progress, leave=False)):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(device)
        rows[i, :ids.shape[1] - 1] = token_losses(model, ids)[0]
    valid = rows[~torch.isnan(rows)]
    return dict(edges=edges, buckets=bucket_stats(rows, edges), mean_loss=valid.mean().item(),
                tokens=int(valid.numel()), docs=len(docs))


def heldout_documents(tokenizer, seq_len: int, count: int, *,
                      sources: Sequence[str] = DEFAULT_SOURCES, val_fraction: float = 0.05,
                      split_seed: int = 0, seed: int = 0) -> list[dict]:
    """The first ``seq_len`` tokens of ``count`` held-out documents of at least that length.

    Each source is split by document exactly as ``sattn train`` splits it (same
    ``val_fraction`` and ``split_seed`` as the training config), so no returned document was
    trained on. Eligible documents are shuffled per source with ``seed`` and taken in turn from
    each source. ``tokenizer`` has ``encode(text) -> list[int]`` (see
    :mod:`stochastic_attention.data.tokenizers`). Returns dicts ``{ids, source, index}``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if count < 1:
        raise ValueError(f"count (documents) must be >= 1, got {count}")
    pools = []
    for name in sources:
        source = parse_source(name)
        texts = source.load()
        _, val_idx = split_documents(texts, val_fraction, split_seed)
        eligible = []
        for i in val_idx:
            ids = _prefix_ids(tokenizer, texts[i], seq_len)
            if ids is not None:
                eligible.append(dict(ids=torch.tensor(ids, dtype=torch.long), source=source.name,
                                     index=int(i)))
        order = np.random.default_rng([seed, len(pools)]).permutation(len(eligible))
        pools.append([eligible[j] for j in order])
    picked = [pool[k] for k in range(max(map(len, pools), default=0)) for pool in pools
              if k < len(pool)][:count]
    if len(picked) < count:
        raise ValueError(f"only {len(picked)} held-out documents of >= {seq_len} tokens in "
                         f"{list(sources)}; ask for fewer documents, a shorter seq_len or add "
                         "sources")
    return picked


def _prefix_ids(tokenizer, text: str, seq_len: int) -> list[int] | None:
    """First ``seq_len`` token ids of ``text`` or None if it is shorter. Encodes a generous
    prefix first (tokenisers are local, so the leading tokens do not depend on the cut)."""
    head = text[:seq_len * 16]
    ids = tokenizer.encode(head)
    if len(ids) < seq_len + 8 and len(head) < len(text):
        ids = tokenizer.encode(text)
    return ids[:seq_len] if len(ids) >= seq_len else None


def parse_position_method(text: str, default_window: int):
    """``name[:window][+opt=value...]`` -> (MethodSpec labelled ``text``, window or None).

    The options are those of ``sattn eval`` (:mod:`stochastic_attention.eval.methods`);
    ``:window`` sets this method's window (default ``default_window``; none for ``full``).
    """
    from dataclasses import replace

    from ...eval.methods import parse_method

    text = text.strip()
    head, plus, rest = text.partition("+")
    name, colon, window = head.partition(":")
    if colon and not window.isdigit():
        raise ValueError(f"method {text!r}: the window after ':' must be a whole number, e.g. "
                         "sliding_window:64+sinks=4")
    spec = replace(parse_method(name + plus + rest), label=text)
    if spec.method == "full":
        return spec, None
    return spec, int(window) if colon else default_window


def compare_positions(docs: Sequence[torch.Tensor], *, model=None, methods: Sequence = (),
                      checkpoints: Sequence[str | Path] = (), buckets: Sequence[int] | None = None,
                      seed: int = 0, progress: bool = True) -> dict:
    """Loss by position of several methods and models on the same documents, JSON-able.

    ``methods`` are ``(MethodSpec, window)`` pairs (see :func:`parse_position_method`), each
    applied to ``model`` training-free with :func:`stochastic_attention.hf.patch` (``seed``
    draws the permutations). ``checkpoints`` are SA-Llama folders saved by ``sattn train``
    (``<run>/final``), evaluated as trained; their permutations use ``perm_seed=seed``.
    """
    if methods and model is None:
        raise ValueError("methods need a model to patch: pass model=")
    if not methods and not checkpoints:
        raise ValueError("nothing to compare: give methods (with a model) or checkpoints")
    seq_lens = sorted({len(d) for d in docs})
    edges = _check_edges(buckets) if buckets is not None else log2_edges(seq_lens[-1] - 1)
    results = []
    bar = tqdm(total=len(methods) + len(checkpoints), desc="position loss", unit="run",
               disable=not progress)
    if methods:
        from ...eval.methods import mean_keys
        from ...hf import patched

        layers = model.config.num_hidden_layers
        for spec, window in methods:
            bar.set_postfix_str(spec.label)
            w = window or 1 << 30
            with patched(model, **spec.settings(w, layers, seed)):
                stats = loss_by_position(model, docs, buckets=edges, progress=progress,
                                         desc=spec.label)
            results.append(dict(label=spec.label, method=spec.method, window=window,
                                options={k: list(v) if isinstance(v, tuple) else v
                                         for k, v in spec.options.items()},
                                settings=spec.settings(w, layers, seed) if window else None,
                                keys_per_query=mean_keys(spec, w, seq_lens[-1], model.config,
                                                         seed), **stats))
            bar.update()
    for path in checkpoints:
        label = checkpoint_label(path)
        bar.set_postfix_str(label)
        trained = load_checkpoint(path, seed)
        stats = loss_by_position(trained, docs, buckets=edges, progress=progress, desc=label)
        cfg = trained.config
        results.append(dict(label=label, method="checkpoint", checkpoint=str(path),
                            attention_methods=list(cfg.attention_methods),
                            window=cfg.attention_options.get("window"),
                            keys_per_query=None, **stats))
        del trained
        bar.update()
    bar.close()
    return dict(edges=edges, seq_len=seq_lens[-1], docs=len(docs), seed=seed, methods=results)


def checkpoint_label(path: str | Path) -> str:
    """A checkpoint's name: its folder, or the run folder for ``<run>/final``."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "final" else path.name


def load_checkpoint(path: str | Path, seed: int = 0):
    """An SA-Llama model saved by ``sattn train`` (``<run>/final``), in eval mode."""
    from ...models import SALlamaConfig, SALlamaForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"checkpoint {str(path)!r} has no config.json: give the 'final' folder "
                         "that `sattn train` writes (e.g. runs/stochastic/final)")
    config = SALlamaConfig.from_pretrained(path)
    config.attention_options = {**config.attention_options, "perm_seed": seed}
    return SALlamaForCausalLM.from_pretrained(path, config=config).eval()


def training_data_config(path: str | Path) -> dict | None:
    """The ``data`` section of the training run that wrote checkpoint ``path`` (its parent's
    ``config.json``), or None when there is none."""
    import json

    config = Path(path).resolve().parent / "config.json"
    if not config.exists():
        return None
    return json.loads(config.read_text()).get("data")
