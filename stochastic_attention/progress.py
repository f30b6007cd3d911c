"""Progress bars that one switch silences (``--no-progress`` in every ``sattn`` subcommand)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm.auto import tqdm as _tqdm

_enabled = True


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm``, disabled while :func:`disabled` is active."""
    if not _enabled:
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)


@contextlib.contextmanager
def disabled(flag: bool = True) -> Iterator[None]:
    """Silence every progress bar inside the block (when ``flag``): ours and, when it is
    already imported, Hugging Face's (e.g. save_pretrained's "Writing model shards").

    Subcommands that import transformers enter this block again after importing it (importing
    it here would slow every other subcommand down).
    """
    global _enabled
    previous = _enabled
    _enabled = previous and not flag
    hf = sys.modules.get("transformers.utils.logging")
    hf_was_on = hf is not None and hf.is_progress_bar_enabled()
    if flag and hf_was_on:
        hf.disable_progress_bar()
    try:
        yield
    finally:
        _enabled = previous
        if flag and hf_was_on:
            hf.enable_progress_bar()
