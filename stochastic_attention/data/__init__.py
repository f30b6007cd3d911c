"""Data: real offline corpora, text sources, tokenisers, cached token arrays and sampling."""

from .corpora import CORPORA, Document, load_corpus
from .dataset import ChunkSampler, TokenSplits, prepare_source, split_documents
from .sources import Source, parse_source
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["CORPORA", "ByteTokenizer", "ChunkSampler", "Document", "HFTokenizer", "Source",
           "TokenSplits", "load_corpus", "load_tokenizer", "parse_source", "prepare_source",
           "split_documents"]
