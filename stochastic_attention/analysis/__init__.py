"""Receptive-field and routing analysis of attention patterns (graphs, coverage, small world).

- ``layers``: one layer's pattern as edges / scipy.sparse, from the operators' own rule;
- ``families``: named schemes (SWA, SA, SA + SWA, MoBA-like, dilated, full) drawn layer by layer;
- ``receptive``: exact receptive fields through depth (one query, or all tokens as bitsets);
- ``theory``: closed forms to compare with; ``graphstats``: paths, clustering, spectral gaps;
- ``experiments``, ``plots``, ``cli``: the ``sattn coverage`` and ``sattn graph`` commands.
"""

from .families import PATTERNS, LayerStack, PatternSpec
from .layers import (
    Edges,
    attention_graph,
    dilated_edges,
    layer_edges,
    moba_edges,
    top_weight_edges,
)
from .receptive import (
    ReceptiveFields,
    all_tokens_sizes,
    layers_to_full,
    query_coverage_curve,
    query_receptive_field,
)

__all__ = [
    "PATTERNS",
    "Edges",
    "LayerStack",
    "PatternSpec",
    "ReceptiveFields",
    "all_tokens_sizes",
    "attention_graph",
    "dilated_edges",
    "layer_edges",
    "layers_to_full",
    "moba_edges",
    "query_coverage_curve",
    "query_receptive_field",
    "top_weight_edges",
]
