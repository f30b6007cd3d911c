"""Packed training rows (``data.pack: true``): documents side by side, attended apart.

A training chunk is a slice of the token stream, in which every document ends with the
end-of-document token (see :mod:`.dataset`), so a chunk holds the end of one document, whole
documents and the start of another. Packed, each of these pieces is a document of its own: its
position ids restart at 0 (the model reads restarting positions as packed documents, the way
transformers' ``DataCollatorWithFlattening`` marks them, and attends every document alone) and
no loss target crosses a boundary: the token after an end-of-document token is not predicted
from the document before it.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets F.cross_entropy skips


def document_starts(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """bool [B, L]: True at each row's first token and after every end-of-document token."""
    starts = torch.ones_like(inputs, dtype=torch.bool)
    starts[:, 1:] = inputs[:, :-1] == eos_id
    return starts


def packed_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids [B, L] that restart at 0 at every document of a packed row."""
    starts = document_starts(inputs, eos_id)
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def packed_batch(batch: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """A chunk batch [B, L + 1] -> (inputs [B, L], targets [B, L], position_ids [B, L]).

    Targets whose input is an end-of-document token (the next token starts another document)
    are :data:`IGNORE_INDEX`.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    targets = targets.masked_fill(inputs == eos_id, IGNORE_INDEX)
    return inputs, targets, packed_positions(inputs, eos_id)
