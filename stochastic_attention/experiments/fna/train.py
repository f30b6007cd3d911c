"""Train one encoder classifier on a passage task and measure its test accuracy."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...models.fna_classifier import ClassifierConfig, EncoderClassifier
from ...progress import tqdm
from ...train.schedule import cosine_lambda_lr
from .data import PassageTask


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 20


@torch.no_grad()
def accuracy(model: EncoderClassifier, tokens: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(tokens), batch_size):
        logits = model(tokens[i:i + batch_size])
        correct += (logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / max(len(tokens), 1)


def train_classifier(task: PassageTask, model_cfg: ClassifierConfig, train_cfg: TrainConfig,
                     seed: int, desc: str = "train") -> tuple[EncoderClassifier, dict]:
    """AdamW with warmup and cosine decay on fresh crops; returns the model and its metrics."""
    torch.manual_seed(seed)
    model = EncoderClassifier(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr,
                            weight_decay=train_cfg.weight_decay)
    sched = _scheduler(opt, train_cfg)
    gen = torch.Generator().manual_seed(10_000 + seed)
    start = time.perf_counter()
    bar = tqdm(range(train_cfg.steps), desc=desc, leave=False, mininterval=2.0)
    loss_ema = None
    model.train()
    for _ in bar:
        tokens, labels = task.sample(train_cfg.batch_size, gen)
        loss = F.cross_entropy(model(tokens), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    train_s = time.perf_counter() - start
    acc = accuracy(model, task.test_tokens, task.test_labels)
    return model, {"test_accuracy": acc, "final_train_loss": loss_ema, "train_seconds": train_s,
                   "parameters": sum(p.numel() for p in model.parameters())}


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to a tenth of ``cfg.lr``."""
    return cosine_lambda_lr(opt, warmup=cfg.warmup, total=cfg.steps, min_lr=0.1)
