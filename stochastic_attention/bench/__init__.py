"""Benchmarks: ``sattn bench`` (attention operators) and ``sattn bench-decode`` (decoding)."""
