"""Packed documents: several documents in one row, attended exactly as if each were alone.

A packed batch marks its documents with ``document_ids`` [batch, seq] (an int per token; equal
ids in a row are one document, and a document's tokens are contiguous; rows never share a
document) or with FlashAttention's ``cu_seqlens`` (int32 [num_docs + 1], cumulative lengths over
a flattened batch of one row, as transformers derives from position ids that restart per
document).

Every operator then gives, for each document, what it gives for that document alone: no key
crosses a document boundary, the sinks are the first tokens of each document, SA draws its
routing per document, BigBird its random keys per document, and windows, blocks and groups are
counted from each document's first token. This holds by construction: :class:`DocumentPlan`
moves the documents into padded rows of their own (bucketed by padded length, the next power of
two, so there are O(log n) buckets and at most 2n padded tokens), the operator runs on each
bucket with a ``key_mask`` marking the real tokens, and the outputs are moved back. The package
guarantees that a sequence gives the same output alone or right-padded in any batch (routing
drawn over each row's real tokens, with a ``generator`` from each row's own copy of its state;
a row the window covers is full attention over its real tokens, however long the padded row;
``tests/ops/test_padding.py``), and every bucket starts from the generator's same state, so a
document in a packed batch equals the same document alone with the same generator.

The block layout's groups restart at each document's start: the groups are the consecutive
``window`` slots of the document's own permutation, the last one shorter when the document's
length is not a multiple of ``window`` (exactly the groups of the document alone). MoBA's blocks
likewise start at each document's first token.

Memory is O(n) on top of the operator's own: only [docs, padded_len] index tensors are built,
never an n x n one. Gradients flow through the gathers (index_select) and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .validate import check_key_mask, normalize_perm

__all__ = ["DocumentPlan", "cross_document_targets", "document_ids_from_positions", "layer_plan",
           "packed_operator", "packed_plan_from_positions", "run_documents"]


class _Bucket:
    """Documents of one padded length P: where their tokens are, and which slots are real."""

    def __init__(self, starts: torch.Tensor, lengths: torch.Tensor, padded: int, seq: int):
        slot = torch.arange(padded, device=starts.device)
        valid = slot[None, :] < lengths[:, None]  # [docs, P]
        # Padded slots read the document's first token: finite values, masked out anyway.
        self.index = torch.where(valid, starts[:, None] + slot[None, :], starts[:, None])
        self.full = bool(valid.all())
        self.valid = valid
        self.real_slots = None if self.full else valid.flatten().nonzero().squeeze(1)
        self.start_in_row = starts % seq  # [docs]: to make positions document-relative
        self.padded = padded


class DocumentPlan:
    """Where each document of a packed batch [batch, seq] goes in padded per-document rows.

    Build it with :meth:`from_document_ids` or :meth:`from_cu_seqlens`; then :meth:`unpack`
    tensors into one [docs, ..., P, ...] tensor per bucket, run a method on each with the
    bucket's key mask (:meth:`unpack_mask`), and :meth:`pack` the outputs back.
    """

    def __init__(self, starts: torch.Tensor, lengths: torch.Tensor, batch: int, seq: int):
        """``starts``/``lengths``: the documents' flat start (row * seq + col) and length (>= 1)."""
        self.batch, self.seq = batch, seq
        self.starts, self.lengths = starts, lengths
        self.num_documents = int(starts.numel())
        device = starts.device
        padded = _next_power_of_two(lengths)
        self.buckets: list[_Bucket] = []
        for size in sorted(set(padded.tolist())):
            sel = (padded == size).nonzero().squeeze(1)
            self.buckets.append(_Bucket(starts[sel], lengths[sel], size, seq))
        # Where each packed token lies among the buckets' real slots, concatenated.
        order = (torch.cat([b.index[b.valid] for b in self.buckets]) if self.buckets
                 else torch.zeros(0, dtype=torch.long, device=device))
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=device)
        self.identity = bool((order == torch.arange(order.numel(), device=device)).all())
        # Per token: its document's number and its document's flat start.
        doc = torch.arange(self.num_documents, device=device)
        self.document_of = doc.repeat_interleave(lengths)
        self.token_start = starts.repeat_interleave(lengths)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_document_ids(cls, document_ids: torch.Tensor) -> DocumentPlan:
        """From ``document_ids`` [batch, seq]: contiguous runs of equal ids are documents."""
        _check_document_ids(document_ids)
        B, n = document_ids.shape
        start = torch.ones(B, n, dtype=torch.bool, device=document_ids.device)
        start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        starts = start.flatten().nonzero().squeeze(1)
        run_ids = document_ids.flatten()[starts]
        pairs = torch.stack([torch.div(starts, max(n, 1), rounding_mode="floor"), run_ids.long()])
        if pairs.shape[1] and torch.unique(pairs, dim=1).shape[1] != pairs.shape[1]:
            row = _first_split_row(pairs)
            raise ValueError(
                f"document_ids must keep each document's tokens contiguous, but row {row} "
                "splits a document (an id appears, stops and appears again); give each run of "
                "tokens its own id, e.g. document_ids = (ids[:, 1:] != ids[:, :-1]).cumsum(-1)")
        ends = torch.cat([starts[1:], starts.new_tensor([B * n])])[:starts.numel()]
        return cls(starts, ends - starts, B, n)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, seq: int,
                        device: torch.device | str | None = None) -> DocumentPlan:
        """From FlashAttention-style cumulative lengths over ONE flattened row of ``seq`` tokens."""
        cu = _check_cu_seqlens(cu_seqlens, seq)
        lengths = cu[1:] - cu[:-1]
        keep = lengths > 0  # empty documents hold no token
        device = cu_seqlens.device if device is None else device
        return cls(cu[:-1][keep].to(device), lengths[keep].to(device), 1, seq)

    @classmethod
    def build(cls, *, document_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
              batch: int, seq: int, device) -> DocumentPlan:
        """The plan of an operator call on q [batch, heads, seq, dim] (validated against it)."""
        if document_ids is not None and cu_seqlens is not None:
            raise ValueError("pass document_ids or cu_seqlens, not both (they describe the same "
                             "boundaries)")
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(
                    f"cu_seqlens describes one flattened row: q must have batch 1 "
                    f"([1, heads, total_tokens, dim]), got batch {batch}; for a batch of packed "
                    "rows pass document_ids [batch, seq] instead")
            return cls.from_cu_seqlens(cu_seqlens, seq, device)
        if not isinstance(document_ids, torch.Tensor):
            raise TypeError(f"document_ids must be an integer tensor [batch, seq], got "
                            f"{type(document_ids).__name__}")
        if tuple(document_ids.shape) != (batch, seq):
            raise ValueError(f"document_ids must have shape [batch, seq] = {(batch, seq)}, got "
                             f"{tuple(document_ids.shape)}")
        if document_ids.device != torch.device(device):
            raise ValueError(f"document_ids is on {document_ids.device} but q is on {device}")
        return cls.from_document_ids(document_ids)

    def check_shape(self, batch: int, seq: int) -> None:
        if (batch, seq) != (self.batch, self.seq):
            raise ValueError(f"the document plan was built for [batch, seq] = "
                             f"{(self.batch, self.seq)}, but the input has {(batch, seq)}")

    # -- moving tensors --------------------------------------------------------------------

    def _flat(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x with its batch and ``dim`` (the sequence) axes flattened into one leading axis."""
        t = x.movedim(dim, 1)
        if t.shape[0] != self.batch:  # a batch of 1 shared by every row
            t = t.expand(self.batch, *t.shape[1:])
        if t.shape[1] != self.seq:
            raise ValueError(f"expected {self.seq} tokens along dim {dim}, got {t.shape[1]}")
        return t.reshape(self.batch * self.seq, *t.shape[2:])

    def unpack(self, x: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """Per bucket: x [B, ..., seq (at ``dim``), ...] -> [docs, ..., P, ...] (contiguous)."""
        flat = self._flat(x, dim)
        return [flat.index_select(0, b.index.flatten()).view(*b.index.shape, *flat.shape[1:])
                .movedim(1, dim).contiguous() for b in self.buckets]

    def pack(self, outs: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        """Inverse of :meth:`unpack` on the real slots: per-bucket outputs -> [B, ..., seq, ...]."""
        flat = []
        for bucket, out in zip(self.buckets, outs, strict=True):
            o = out.movedim(dim, 1)
            o = o.reshape(-1, *o.shape[2:])
            flat.append(o if bucket.real_slots is None else o.index_select(0, bucket.real_slots))
        packed = flat[0] if len(flat) == 1 else torch.cat(flat)
        if not self.identity:
            packed = packed.index_select(0, self.inverse)
        return packed.view(self.batch, self.seq, *packed.shape[1:]).movedim(1, dim)

    def unpack_mask(self, key_mask: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per bucket: the real tokens [docs, P] (and ``key_mask`` inside documents); None where
        every slot is real, so the operators keep their unmasked fast paths."""
        if key_mask is None:
            return [None if b.full else b.valid for b in self.buckets]
        flat = key_mask.reshape(-1)
        return [flat[b.index] & b.valid for b in self.buckets]

    def positions(self, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each token's position within its document [batch, seq] (RoPE restarts per document);
        with ``key_mask`` only real tokens count, as for a padded row."""
        t = torch.arange(self.batch * self.seq, device=self.starts.device)
        if key_mask is not None and tuple(key_mask.shape) != (self.batch, self.seq):
            raise ValueError(f"the mask of packed documents must be [batch, seq] = "
                             f"{(self.batch, self.seq)} (no cache), got {tuple(key_mask.shape)}")
        if key_mask is None:
            pos = t - self.token_start
        else:
            real = key_mask.reshape(-1).long()
            seen = real.cumsum(0)
            before = seen[self.token_start] - real[self.token_start]
            pos = (seen - before - 1).clamp(min=0)
        return pos.view(self.batch, self.seq)

    def unpack_perm(self, perm: torch.Tensor, heads: int) -> list[torch.Tensor]:
        """A packed SA permutation [seq] | [B|1, seq] | [B|1, H|1, seq] that permutes every
        document within itself -> per bucket [docs, H|1, P] (document-relative; padding last)."""
        perm = normalize_perm(perm, self.batch, heads, self.seq, self.starts.device)
        perm = perm.expand(self.batch, *perm.shape[1:])
        row = torch.arange(self.batch, device=perm.device).view(-1, 1, 1) * self.seq
        slot = torch.arange(self.seq, device=perm.device)
        if not bool((self.document_of[perm + row] == self.document_of[slot + row]).all()):
            raise ValueError(
                "with document_ids/cu_seqlens, perm must permute every document within itself "
                "(perm[..., p] in the same document as p); leave perm=None to draw one per "
                "document, or build it per document")
        outs = []
        for bucket, part in zip(self.buckets, self.unpack(perm, dim=2), strict=True):
            part = part - bucket.start_in_row.view(-1, 1, 1)
            slot = torch.arange(bucket.padded, device=part.device)
            outs.append(torch.where(bucket.valid[:, None, :], part, slot))
        return outs

    def unpack_indices(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """BigBird's packed random keys [B|1, H|1, seq, r] (-1: none), each inside its query's
        document -> per bucket [docs, H|1, P, r], document-relative."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 4:
            raise ValueError("indices must be a LongTensor [batch|1, heads|1, seq, random_keys]")
        if indices.shape[0] not in (1, self.batch) or indices.shape[2] != self.seq:
            raise ValueError(f"indices must have shape [batch|1, heads|1, seq, random_keys] with "
                             f"batch {self.batch} and seq {self.seq}, got {tuple(indices.shape)}")
        indices = indices.long().expand(self.batch, *indices.shape[1:])
        row = torch.arange(self.batch, device=indices.device).view(-1, 1, 1, 1) * self.seq
        slot = torch.arange(self.seq, device=indices.device).view(1, 1, -1, 1)
        key_doc = self.document_of[(indices.clamp(0, self.seq - 1) + row)]
        if not bool(((indices < 0) | (key_doc == self.document_of[slot + row])).all()):
            raise ValueError("with document_ids/cu_seqlens, every BigBird index must lie in its "
                             "query's document (or be -1); leave indices=None to draw them per "
                             "document")
        outs = []
        for bucket, part in zip(self.buckets, self.unpack(indices, dim=2), strict=True):
            rel = part - bucket.start_in_row.view(-1, 1, 1, 1)
            outs.append(torch.where((part >= 0) & bucket.valid[:, None, :, None], rel, -1))
        return outs


def run_documents(plan: DocumentPlan, fn: Callable, seq_args: Sequence[tuple[torch.Tensor, int]],
                  *, key_mask: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                  heads: int = 1, out_dim: int = 2,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``fn(*unpacked, key_mask=..., perm=...)`` on every bucket, packed back.

    ``seq_args`` are (tensor, sequence dim) pairs, unpacked per bucket; ``perm`` (if given) is
    unpacked with :meth:`DocumentPlan.unpack_perm` (``heads``: q's heads). Every bucket starts
    from ``generator``'s same state (each row draws from its own copy of it), so its documents
    draw what they would alone; the generator ends advanced once, as after one call.
    """
    if not plan.buckets:  # no token at all: nothing to move
        return fn(*(x for x, _ in seq_args), key_mask=key_mask, perm=perm)
    masks = plan.unpack_mask(key_mask)
    parts = [plan.unpack(x, dim) for x, dim in seq_args]
    perms = (plan.unpack_perm(perm, heads) if perm is not None
             else [None] * len(plan.buckets))
    state = generator.get_state() if generator is not None else None
    outs = []
    for i, mask in enumerate(masks):
        if state is not None:
            generator.set_state(state)
        outs.append(fn(*(p[i] for p in parts), key_mask=mask, perm=perms[i]))
    return plan.pack(outs, out_dim)


def packed_operator(op: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args,
                    document_ids: torch.Tensor | None = None,
                    cu_seqlens: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Run ``op(q, k, v, *args, **kwargs)`` on every document of a packed batch (module doc).

    ``kwargs`` may hold ``perm`` (SA, fractional), ``indices`` (BigBird) and ``generator``: a
    given perm or indices is packed (each document's own) and moved with the documents.
    ``key_mask`` marks padding inside documents: a document then gives what it gives padded
    in a row of its own.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("q must have shape [batch, heads, seq, head_dim] (4 dims)")
    B, H, n, _ = q.shape
    plan = DocumentPlan.build(document_ids=document_ids, cu_seqlens=cu_seqlens, batch=B, seq=n,
                              device=q.device)
    check_key_mask(key_mask, B, n, q.device)
    if not plan.buckets:  # no token: the operator's own empty result
        return op(q, k, v, *args, key_mask=key_mask, **kwargs)
    perm = kwargs.pop("perm", None)
    indices = kwargs.pop("indices", None)
    generator = kwargs.pop("generator", None)
    if generator is not None:
        kwargs["generator"] = generator
    index_parts = plan.unpack_indices(indices) if indices is not None else None
    calls = iter(range(len(plan.buckets)))

    def call(qb, kb, vb, *, key_mask, perm):
        extra = dict(kwargs)
        i = next(calls)
        if perm is not None:
            extra["perm"] = perm
        if index_parts is not None:
            extra["indices"] = index_parts[i]
        return op(qb, kb, vb, *args, key_mask=key_mask, **extra)

    return run_documents(plan, call, [(q, 2), (k, 2), (v, 2)], key_mask=key_mask, perm=perm,
                         heads=H, generator=generator)


def layer_plan(document_ids: torch.Tensor | DocumentPlan, batch: int, seq: int,
               device, cache=None) -> DocumentPlan:
    """The plan of a layer call on [batch, seq] tokens: ``document_ids`` or a plan built from
    them once for every layer of a model. Packed input has no KV cache."""
    if cache is not None:
        raise ValueError(
            "packed documents (document_ids) cannot use a KV cache: the cache would hold "
            "several documents' keys; run packed batches without a cache (use_cache=False) and "
            "decode each document in a batch of its own")
    if isinstance(document_ids, DocumentPlan):
        document_ids.check_shape(batch, seq)
        return document_ids
    return DocumentPlan.build(document_ids=document_ids, cu_seqlens=None, batch=batch, seq=seq,
                              device=device)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, seq: int) -> torch.LongTensor:
    """Position ids [1, seq] that restart at each document of FlashAttention-style ``cu_seqlens``
    (what transformers' packed path derives them from, and back)."""
    cu = _check_cu_seqlens(cu_seqlens, seq).to(torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return (torch.arange(seq, device=starts.device) - starts)[None]


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document ids [B, n] of a packed batch given by position ids that restart per document.

    A document starts at each row's first token and wherever a position does not follow the one
    before it (``pos[i] != pos[i - 1] + 1``; e.g. [0 1 2 0 1 0 1 2 3] is three documents, as
    ``DataCollatorWithFlattening`` makes them). Returns None when no position restarts (one
    document per row: the ordinary, unpacked case).
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, seq], got {tuple(position_ids.shape)}")
    restart = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(restart.any()):
        return None
    first = torch.zeros_like(restart[:, :1])
    return torch.cat([first, restart], dim=1).long().cumsum(-1)


def packed_plan_from_positions(position_ids: torch.Tensor, batch: int) -> DocumentPlan | None:
    """The plan of a packed batch given by restarting position ids [batch|1, seq], or None
    (:func:`document_ids_from_positions`); built once and shared by a model's layers."""
    ids = document_ids_from_positions(position_ids.expand(batch, -1))
    return None if ids is None else DocumentPlan.from_document_ids(ids)


def cross_document_targets(position_ids: torch.Tensor) -> torch.Tensor:
    """bool [batch, seq]: True at each document's first token but a row's first, i.e. where
    a next-token target would be predicted from the previous document."""
    starts = torch.zeros(position_ids.shape, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def _next_power_of_two(lengths: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each length (exact integers, O(log n) passes)."""
    padded = torch.ones_like(lengths)
    while bool((padded < lengths).any()):
        padded = torch.where(padded < lengths, padded * 2, padded)
    return padded


def _check_document_ids(ids) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"document_ids must be an integer tensor [batch, seq], got "
                        f"{type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"document_ids must be an integer tensor [batch, seq] (equal ids = one "
                        f"document), got {ids.dtype}; convert with .long()")
    if ids.dim() != 2:
        raise ValueError(f"document_ids must have shape [batch, seq], got {tuple(ids.shape)}")


def _check_cu_seqlens(cu, seq: int) -> torch.Tensor:
    """Validated cumulative lengths as a long tensor on ``cu``'s device."""
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64):
        got = cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise TypeError(f"cu_seqlens must be an int32 tensor [num_docs + 1] of cumulative "
                        f"document lengths, got {got}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with num_docs + 1 >= 2 entries "
                         f"(0, len0, len0 + len1, ...), got shape {tuple(cu.shape)}")
    cu = cu.long()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing (cumulative document lengths)")
    if int(cu[-1]) != seq:
        raise ValueError(f"cu_seqlens must end at the number of tokens, {seq}, got "
                         f"{int(cu[-1])}")
    return cu


def _first_split_row(pairs: torch.Tensor) -> int:
    """The first row in which an id starts two runs (for the error message)."""
    seen = set()
    for row, doc in pairs.t().tolist():
        if (row, doc) in seen:
            return row
        seen.add((row, doc))
    return -1
