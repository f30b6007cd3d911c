"""Where pre-training text comes from: offline corpora, local text files, HF ``datasets``.

A source is given in a config as a corpus name (``shakespeare``, ``bible``, ``wikipedia``,
any of :data:`~stochastic_attention.data.corpora.CORPORA`) or
as a mapping: ``{name: notes, files: "notes/*.txt"}`` (one document per file) or
``{name: wt103, hf: wikitext, config: wikitext-103-raw-v1, split: train, column: text}``
(needs the ``datasets`` package and a network). Loading yields the documents' texts.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_args import UsageError
from .corpora import CORPORA, load_corpus


class DataError(UsageError):
    """A data source, tokenizer or token cache that cannot be used as configured."""


@dataclass(frozen=True)
class Source:
    """One named text source; ``kind`` is "corpus", "files" or "hf"."""

    name: str
    kind: str
    target: str
    options: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Changes when the source's definition (or, for files, their size or date) changes."""
        parts: dict = {"kind": self.kind, "target": self.target, "options": self.options}
        if self.kind == "files":
            parts["files"] = [(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns)
                              for p in self.paths()]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def paths(self) -> list[str]:
        pattern = str(Path(self.target).expanduser())
        if Path(pattern).is_dir():
            pattern = str(Path(pattern) / "**" / "*.txt")
        paths = sorted(glob.glob(pattern, recursive=True))
        if not paths:
            raise DataError(f"source {self.name!r}: no files match {self.target!r}; "
                             "give a file, a directory of .txt files or a glob pattern")
        return paths

    def load(self) -> list[str]:
        """The texts of the source's documents, in a fixed order."""
        if self.kind == "corpus":
            return [doc.text for doc in load_corpus(self.target)]
        if self.kind == "files":
            return [Path(p).read_text(encoding="utf-8", errors="replace") for p in self.paths()]
        return _load_hf(self)


def _load_hf(source: Source) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"source {source.name!r} reads a Hugging Face dataset: "
                         "pip install datasets (and have a network)") from err
    ds = datasets.load_dataset(source.target, source.options.get("config"),
                               split=source.options.get("split", "train"))
    column = source.options.get("column", "text")
    return [text for text in ds[column] if text and text.strip()]


def parse_source(entry: str | dict) -> Source:
    """A Source from a config entry (a corpus name or a mapping; see the module doc)."""
    if isinstance(entry, str):
        if entry in CORPORA:
            return Source(entry, "corpus", entry)
        if Path(entry).expanduser().exists() or any(c in entry for c in "*?["):
            return Source(Path(entry).stem or entry, "files", entry)
        raise DataError(f"unknown data source {entry!r}: use one of {CORPORA}, a path, or a "
                         "mapping {name: ..., files: ...} / {name: ..., hf: ...}")
    if not isinstance(entry, dict):
        raise TypeError(f"a data source must be a string or a mapping, got {type(entry).__name__}")
    entry = dict(entry)
    kinds = [k for k in ("corpus", "files", "hf") if k in entry]
    if len(kinds) != 1:
        raise DataError(f"data source {entry!r} needs exactly one of 'corpus', 'files', 'hf'")
    kind = kinds[0]
    target = str(entry.pop(kind))
    if kind == "corpus" and target not in CORPORA:
        raise DataError(f"corpus must be one of {CORPORA}, got {target!r}")
    name = str(entry.pop("name", target))
    allowed = {"hf": {"config", "split", "column"}}.get(kind, set())
    unknown = set(entry) - allowed
    if unknown:
        keys = ", ".join(["name", kind, *sorted(allowed)])
        raise DataError(f"data source {name!r}: unknown keys {sorted(unknown)}; allowed: {keys}")
    return Source(name, kind, target, entry)
