"""Benchmarks: ``sattn bench``."""
