"""Long-range benchmarks: how much of a long document a model actually uses."""
