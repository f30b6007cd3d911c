"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay.

One formula serves the pre-training loop (decay to ``train.min_lr``), the long-range cells
(decay to 0, Zoology's recipe) and the FNA classifiers (decay to a tenth of the peak), so the
three cannot drift apart.
"""

from __future__ import annotations

import math

import torch


def cosine_schedule(step: int, *, warmup: int, total: int, lr: float = 1.0,
                    min_lr: float = 0.0) -> float:
    """The rate at ``step`` (counted from 0): linear warm-up to ``lr`` over ``warmup`` steps,
    then cosine decay to ``min_lr`` at step ``total``, and ``min_lr`` after it.

    Step 0 already trains at ``lr / warmup`` (not 0, a wasted step); ``warmup=0`` starts at
    ``lr``. With the defaults it is the factor a base rate is multiplied by.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def cosine_lambda_lr(optimizer: torch.optim.Optimizer, *, warmup: int, total: int,
                     lr: float = 1.0, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :func:`cosine_schedule` for an optimizer built with rate ``lr``.

    LambdaLR multiplies the optimizer's own rate by a factor, hence the division by ``lr``;
    with ``lr=1`` (the default) ``min_lr`` is the final factor itself.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_schedule(step, warmup=warmup, total=total, lr=lr,
                                                min_lr=min_lr) / lr)
