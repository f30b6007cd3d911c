"""Train and score one small SA-Llama on one long-range task: one cell of the grid."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ...train.schedule import cosine_schedule
from . import tasks


@dataclass(frozen=True)
class TaskSpec:
    """Which task and its size. ``margins`` (majority) are drawn per example in training."""

    name: str = "majority"
    seq_len: int = 512
    margins: tuple[float, ...] = (0.0625, 0.125, 0.25)
    eval_margins: tuple[float, ...] = (0.0625, 0.125, 0.25)
    pairs: int = 16
    vocab: int = 256
    random_filler: bool = True  # MQAR: random tokens between queries (False: zeros)

    @property
    def vocab_size(self) -> int:
        return tasks.MAJORITY_VOCAB if self.name == "majority" else self.vocab

    def batch(self, num: int, seed: int | list[int], margins: tuple[float, ...] | None = None) -> tasks.Batch:
        if self.name == "majority":
            return tasks.majority(num, self.seq_len, list(margins or self.margins), seed=seed)
        if self.name == "mqar":
            return tasks.mqar(num, self.seq_len, self.pairs, self.vocab, seed=seed,
                              random_filler=self.random_filler)
        raise ValueError(f"task must be 'majority' or 'mqar', got {self.name!r}")


@dataclass(frozen=True)
class Cell:
    """One training run: task, attention method and its options, model shape, optimisation."""

    task: TaskSpec = field(default_factory=TaskSpec)
    method: str = "full"
    attention: tuple[tuple[str, object], ...] = ()  # SALlamaConfig attention options
    layers: int = 2
    width: int = 64
    heads: int = 2
    lr: float = 3e-3
    steps: int = 300
    batch_size: int = 32
    seed: int = 0
    eval_examples: int = 512

    def key(self) -> str:
        """A stable identifier of the cell (used to skip finished cells on resume)."""
        opts = ",".join(f"{k}={v}" for k, v in self.attention)
        t = self.task
        task = (f"{t.name}:n={t.seq_len}" + (f",pairs={t.pairs},vocab={t.vocab}" if t.name == "mqar"
                                             else f",margins={'/'.join(map(str, t.margins))}"))
        return (f"{task}|{self.method}[{opts}]|L={self.layers},d={self.width},h={self.heads}"
                f"|lr={self.lr:g},steps={self.steps},bs={self.batch_size}|seed={self.seed}")


def build_model(cell: Cell):
    from ...models import SALlamaConfig, SALlamaForCausalLM

    config = SALlamaConfig(
        vocab_size=cell.task.vocab_size, hidden_size=cell.width, intermediate_size=2 * cell.width,
        num_hidden_layers=cell.layers, num_attention_heads=cell.heads,
        attention_methods=cell.method, attention_options=dict(cell.attention),
        max_position_embeddings=cell.task.seq_len, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(cell.seed)
    return SALlamaForCausalLM(config)


def scored_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the scored positions only (labels aligned with inputs, no shift)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=tasks.IGNORE)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 0 (Zoology's schedule)."""
    return cosine_schedule(step, warmup=warmup, total=steps, lr=lr, min_lr=0.0)


@torch.no_grad()
def evaluate(model, cell: Cell, *, split: str = "test", batch_size: int = 64) -> dict:
    """Accuracy at scored positions on held-out examples.

    ``split`` "test" (``cell.eval_examples`` examples) or "val" (half as many, other seeds,
    used to choose the learning rate); both are disjoint from the training seeds.
    """
    stream = {"test": 1, "val": 2}[split]  # training draws use stream 0
    examples = cell.eval_examples if split == "test" else max(1, cell.eval_examples // 2)
    model.eval()
    task = cell.task
    groups = [(m, (m,)) for m in task.eval_margins] if task.name == "majority" else [(None, None)]
    result = {}
    for margin, margins in groups:
        correct = total = 0
        loss_sum = 0.0
        for start in range(0, examples, batch_size):
            num = min(batch_size, examples - start)
            batch = task.batch(num, seed=[stream, start], margins=margins)
            logits = model(input_ids=batch.inputs).logits
            scored = batch.labels != tasks.IGNORE
            pred = logits.argmax(-1)
            correct += int((pred[scored] == batch.labels[scored]).sum())
            total += int(scored.sum())
            loss_sum += float(scored_loss(logits, batch.labels)) * int(scored.sum())
        name = "accuracy" if margin is None else f"accuracy@{margin:g}"
        result[name] = correct / max(total, 1)
        result["loss" if margin is None else f"loss@{margin:g}"] = loss_sum / max(total, 1)
    if task.name == "majority":
        result["accuracy"] = sum(result[f"accuracy@{m:g}"] for m in task.eval_margins) / len(groups)
    model.train()
    return result


def train_cell(cell: Cell, *, progress=None) -> dict:
    """Train one model on fresh examples every step, then score it; returns a JSON-able record."""
    model = build_model(cell)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=cell.lr, betas=(0.9, 0.98))
    warmup = max(1, cell.steps // 10)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(cell.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cell.steps, cell.lr, warmup)
        batch = cell.task.batch(cell.batch_size, seed=[0, cell.seed, step])
        loss = scored_loss(model(input_ids=batch.inputs).logits, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, float(loss))
    seconds = time.perf_counter() - start
    record = {
        "key": cell.key(), "cell": asdict(cell), "params": params,
        "train_seconds": seconds,
        "tokens_per_second": cell.steps * cell.batch_size * cell.task.seq_len / seconds,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_loss_curve": losses[:: max(1, len(losses) // 50)],
    }
    record.update(evaluate(model, cell))
    record["val_accuracy"] = evaluate(model, cell, split="val")["accuracy"]
    return record
