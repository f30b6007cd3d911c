"""Data: real offline corpora, tokenisers and token caches."""
