"""Progress bars that one switch silences (``--no-progress`` in every ``sattn`` subcommand)."""

from __future__ import annotations

import contextlib
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
    """Silence every progress bar inside the block (when ``flag``)."""
    global _enabled
    previous = _enabled
    _enabled = previous and not flag
    try:
        yield
    finally:
        _enabled = previous
