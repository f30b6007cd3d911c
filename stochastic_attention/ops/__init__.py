"""Operators: pure functions on tensors. ``patterns`` defines visibility; one module per backend."""
