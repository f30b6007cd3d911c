"""Fractional Neural Attention: one-layer text classification and attention-graph analysis."""
