"""The one warm-up + cosine schedule equals, to the bit, the three formulas it replaced."""

from __future__ import annotations

import math

import pytest
import torch

from stochastic_attention.experiments.fna.train import TrainConfig, _scheduler
from stochastic_attention.experiments.longrange.train import lr_at
from stochastic_attention.train import cosine_schedule
from stochastic_attention.train.schedule import cosine_lambda_lr


# The formulas as they stood in train/loop.py, experiments/longrange/train.py and
# experiments/fna/train.py before they became one.
def old_pretraining(step, *, warmup, total, lr, min_lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def old_longrange(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def old_fna_factor(step, *, warmup, steps):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# (warmup, total): none, some, all warm-up, a single step
SHAPES = [(0, 50), (5, 50), (10, 10), (0, 1), (1, 1), (3, 7)]


def steps_of(warmup, total):
    """Every step up to total, and past it (a resumed run may step beyond)."""
    return sorted({*range(total + 1), total + 3, warmup, max(warmup - 1, 0)})


@pytest.mark.parametrize("warmup,total", SHAPES)
def test_pretraining_schedule_is_unchanged(warmup, total):
    for lr, min_lr in ((3e-3, 3e-4), (1e-3, 0.0), (0.7, 0.7)):
        for step in steps_of(warmup, total):
            assert cosine_schedule(step, warmup=warmup, total=total, lr=lr, min_lr=min_lr) == \
                old_pretraining(step, warmup=warmup, total=total, lr=lr, min_lr=min_lr)


@pytest.mark.parametrize("warmup,total", SHAPES)
def test_longrange_schedule_is_unchanged(warmup, total):
    for lr in (3e-3, 1e-2, 1.0):
        for step in steps_of(warmup, total):
            assert lr_at(step, total, lr, warmup) == old_longrange(step, total, lr, warmup)


@pytest.mark.parametrize("warmup,total", SHAPES)
def test_fna_schedule_is_unchanged(warmup, total):
    cfg = TrainConfig(steps=total, warmup=warmup)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = _scheduler(optimizer, cfg)
    for step in range(total + 3):
        assert scheduler.get_last_lr()[0] == cfg.lr * old_fna_factor(step, warmup=warmup,
                                                                      steps=total)
        optimizer.step()
        scheduler.step()


def test_schedule_warms_up_from_the_first_step_and_ends_at_min_lr():
    rates = [cosine_schedule(s, warmup=4, total=20, lr=1.0, min_lr=0.1) for s in range(21)]
    assert rates[0] == 0.25 and rates[3] == 1.0 and rates[4] == 1.0
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert rates[20] == pytest.approx(0.1) and cosine_schedule(99, warmup=4, total=20,
                                                               min_lr=0.1) == rates[20]


@pytest.mark.parametrize("warmup,total", [(0, 12), (3, 12), (12, 12)])
def test_lambda_lr_gives_the_optimizer_the_schedule(warmup, total):
    lr, min_lr = 3e-3, 3e-4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = cosine_lambda_lr(optimizer, warmup=warmup, total=total, lr=lr, min_lr=min_lr)
    for step in range(total + 2):
        expected = lr * (old_pretraining(step, warmup=warmup, total=total, lr=lr,
                                         min_lr=min_lr) / lr)  # LambdaLR: base rate x factor
        assert scheduler.get_last_lr()[0] == expected
        optimizer.step()
        scheduler.step()
