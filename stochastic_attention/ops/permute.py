"""Moving tokens between original order and permuted (slot) order."""

from __future__ import annotations

import torch

from .patterns import inverse_permutation
from .validate import check_int


def random_permutation(
    batch: int,
    heads: int,
    seq_len: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Independent uniform permutations of range(seq_len): a LongTensor [batch, heads, seq_len].

    Drawn on the generator's device (so a CPU generator gives the same permutations whatever
    ``device`` is), then moved to ``device``.
    """
    for name, value in (("batch", batch), ("heads", heads), ("seq_len", seq_len)):
        check_int(name, value, 0)
    if generator is None:  # (no generator=None: that overload of rand takes no symbolic sizes)
        keys = torch.rand(batch, heads, seq_len, device=device)
    else:
        keys = torch.rand(batch, heads, seq_len, generator=generator, device=generator.device)
    return keys.argsort(dim=-1).to(device if device is not None else keys.device)


def routing_permutation(
    batch: int,
    heads: int,
    seq_len: int,
    *,
    key_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The SA routing drawn when none is given: [B|1, heads, seq_len], padding-independent.

    Each row's permutation is drawn over its REAL tokens only (``key_mask`` True): they
    are permuted among themselves and fill the first slots, in drawn order; padded positions
    follow, in position order. So the band and block windows give a real token the same
    window-mates as when its sequence is alone.

    With a ``generator``, every row draws from its own copy of the generator's current state:
    the same seed and the same number of real tokens give the same routing, whatever the row's
    index, its padding or the rest of the batch (rows of equal length share a routing). The
    generator then moves on by one draw (it is reseeded from itself), so a second call draws
    afresh, and its new state does not depend on the batch. Without a generator, rows draw
    independently from torch's global RNG. Without a mask and without a generator this is
    :func:`random_permutation`.
    """
    if key_mask is None and generator is None:
        return random_permutation(batch, heads, seq_len, device=device)
    if key_mask is not None:
        device = key_mask.device if device is None else device
        batch = key_mask.shape[0]
    if generator is None:  # independent rows; padding keys sort after every real one
        keys = torch.rand(batch, heads, seq_len, device=device)
    else:
        lengths = (key_mask.sum(-1).tolist() if key_mask is not None
                   else [seq_len])
        state = generator.get_state()
        draws = {}
        for r in sorted(set(lengths)):
            generator.set_state(state)
            draws[r] = torch.rand(heads, r, generator=generator, device=generator.device).to(device)
        generator.set_state(state)
        generator.manual_seed(int(torch.randint(0, 2**62, (), generator=generator,
                                                device=generator.device)))
        if key_mask is None:
            return draws[seq_len].argsort(dim=-1, stable=True)[None]
        rank = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        keys = torch.empty(batch, heads, seq_len, device=device)
        for b, r in enumerate(lengths):
            if r:
                keys[b] = draws[r][:, rank[b].clamp(max=r - 1)]
    if key_mask is None:
        return keys.argsort(dim=-1, stable=True)
    # Draws lie in [0, 1): padding gets 1 + position / n, after every real token, in order.
    pad_key = 1 + torch.arange(seq_len, device=device) / max(seq_len, 1)
    keys = torch.where(key_mask[:, None, :], keys, pad_key)
    return keys.argsort(dim=-1, stable=True)


def permute_seq(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``gather_seq(x, index)`` for a permutation ``index`` whose inverse is ``inverse``.

    The backward pass of a gather by a permutation is a gather by its inverse: no
    accumulation is needed, which is ~4x faster on CPU than autograd's ``index_add``.
    """
    return _PermuteSeq.apply(x, index, inverse)


class _PermuteSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(index, inverse)
        return gather_seq(x, index)

    @staticmethod
    def backward(ctx, grad):
        index, inverse = ctx.saved_tensors
        return gather_seq(grad.contiguous(), inverse), None, None


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, h, i] = x[b, h, index[b, h, i]] for x [B, H, n, D] and index [B|1, H|1, n]."""
    B, H, n, D = x.shape
    if index.shape[0] == 1 and index.shape[1] == 1:
        return x.index_select(2, index[0, 0])
    # One flat index_select: unlike gather, it needs no index as large as x itself.
    index = index.expand(B, H, n)
    base = torch.arange(B * H, device=x.device).view(B, H, 1) * n
    flat = x.reshape(B * H * n, D).index_select(0, (index + base).reshape(-1))
    return flat.view(B, H, n, D)


def gather_mask(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, h, i] = mask[b, index[b, h, i]] for mask [B|1, n] and index [B|1, H|1, n]."""
    B = max(mask.shape[0], index.shape[0])
    mask = mask.expand(B, mask.shape[-1])
    index = index.expand(B, *index.shape[1:])
    return torch.gather(mask[:, None, :].expand(B, index.shape[1], -1), -1, index)


def real_tokens_first(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's real tokens (stably) in front of its padding: ``(order, inverse, mask)``.

    ``order`` [B, 1, n] is a permutation for :func:`permute_seq` / :func:`gather_seq`,
    ``inverse`` moves results back, and ``mask`` [B, n] is ``key_mask`` in the new order (True
    first). Operators whose blocks, windows or sinks count positions then see each sequence as
    if it were alone.
    """
    order = torch.argsort((~key_mask).to(torch.int8), dim=-1, stable=True)[:, None, :]
    return order, inverse_permutation(order), gather_mask(key_mask, order)[:, 0]
