"""Direct sight in MQAR: how often a query's answer is among the keys its pattern lets it read.

Recall of one specific key-value pair needs the query to read the value token (or a token that
carries it) by content. A pattern that does not look at content decides *before* seeing the
tokens which keys a query may read; in one layer the query at position ``i`` then reads the
value token at ``j`` only if ``j`` is in its visible set. This module measures, with the
operators' own visibility rules, the probability that the answer's value token is directly
visible to its query in at least one of ``layers`` layers (independent draws per layer): an
upper bound on single-hop recall for content-blind methods. Content-routed methods (MoBA) and full
attention are not bounded by it (MoBA chooses its blocks from the query; full sees all).
"""

from __future__ import annotations

import torch

from ...ops.patterns import dense_mask
from . import tasks
from .train import TaskSpec


def visible_masks(method: str, options: tuple[tuple[str, object], ...], seq_len: int, draws: int,
                  *, seed: int = 0) -> torch.Tensor:
    """[draws, n, n] bool: query i may read key j, one independent draw of the pattern per row."""
    o, n = dict(options), seq_len
    gen = torch.Generator().manual_seed(seed)
    if method == "full":
        return torch.ones(n, n, dtype=torch.bool).tril().expand(draws, n, n)
    if method == "sliding_window":
        return dense_mask(n, o["window"])[0, 0].expand(draws, n, n)
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(draws)])[:, None]
    if method == "stochastic":
        return dense_mask(n, o["window"], perm=perms, layout=o.get("layout", "band"))[:, 0]
    if method == "stochastic_local":
        return dense_mask(n, o["window"], perm=perms, local=o["local"])[:, 0]
    if method == "gated":  # the union of its stochastic and sliding-window branches
        return dense_mask(n, o["window"], perm=perms, local=o["local_window"])[:, 0]
    if method == "bigbird":
        from ...ops.bigbird import bigbird_indices, bigbird_mask

        idx = bigbird_indices(draws, 1, n, o["window"], o["random_keys"], sinks=o["sinks"],
                              generator=gen)
        return bigbird_mask(n, o["window"], idx, sinks=o["sinks"])[:, 0]
    raise ValueError(f"direct sight is defined for content-blind methods, not {method!r}")


def mqar_sight(task: TaskSpec, method: str, options: tuple[tuple[str, object], ...], layers: int,
               *, examples: int = 256, draws: int = 64, seed: int = 0) -> dict:
    """Mean over MQAR queries of P(answer's value token visible in >= 1 of ``layers`` layers).

    Also returns the same for the key token and the fraction of queries whose value token is
    within the SWA-like reach ``local`` positions (for reference).
    """
    if task.name != "mqar":
        raise ValueError("mqar_sight needs an MQAR task")
    masks = visible_masks(method, options, task.seq_len, draws, seed=seed).float()
    p_one = masks.mean(0)  # [n, n]: P(query i reads key j) in one layer
    batch = task.batch(examples, seed=[4, seed])
    ctx = 2 * task.pairs
    seen, gaps = [], []
    for row in range(examples):
        keys = batch.inputs[row, 0:ctx:2].tolist()
        where = {k: 2 * i for i, k in enumerate(keys)}
        for q in (batch.labels[row] != tasks.IGNORE).nonzero().flatten().tolist():
            value_pos = where[int(batch.inputs[row, q])] + 1
            p = float(p_one[q, value_pos])
            seen.append(1 - (1 - p) ** layers)
            gaps.append(q - value_pos)
    return dict(method=method, layers=layers, sight=sum(seen) / len(seen),
                mean_distance=sum(gaps) / len(gaps), queries=len(seen))
