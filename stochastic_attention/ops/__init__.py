"""Operators: pure functions on tensors. ``patterns`` defines visibility; one module per backend.

Backends (``reference``, ``blocked``, ``flex``) expose one ``attention(q, k, v, window, *, perm,
layout, causal, sinks, key_mask, scale, local)``; :mod:`stochastic_attention.functional`
validates and picks one. ``dense`` holds the shared primitives, ``budget`` the key counts,
``compose`` the ensemble and head split; MoBA, BigBird and fractional attention have a module
each, with their references.
"""
