"""Pre-training data: text sources, tokenisers, cached token arrays and their sampling."""

from .dataset import ChunkSampler, TokenSplits, prepare_source, split_documents
from .sources import CORPORA, Source, parse_source
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["CORPORA", "ByteTokenizer", "ChunkSampler", "HFTokenizer", "Source", "TokenSplits",
           "load_tokenizer", "parse_source", "prepare_source", "split_documents"]
