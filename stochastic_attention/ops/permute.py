"""Moving tokens between original order and permuted (slot) order."""

from __future__ import annotations

import torch


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
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    draw_on = generator.device if generator is not None else device
    keys = torch.rand(batch, heads, seq_len, generator=generator, device=draw_on)
    return keys.argsort(dim=-1).to(device if device is not None else keys.device)


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
    """out[b, h, i] = mask[b, index[b, h, i]] for mask [B, n] and index [B|1, H|1, n]."""
    B = mask.shape[0]
    index = index.expand(B, *index.shape[1:])
    return torch.gather(mask[:, None, :].expand(B, index.shape[1], -1), -1, index)
