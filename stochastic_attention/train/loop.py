"""The pre-training loop: one function, every knob visible in the config.

Data position, learning-rate schedule and permutation RNG are all functions of the step
count and the saved state, so a run interrupted (SIGINT / SIGTERM, or ``stop_after``) and
resumed with ``resume=True`` reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import ChunkSampler, load_tokenizer, parse_source, prepare_source
from ..models import SALlamaConfig, SALlamaForCausalLM
from . import checkpoint
from . import distributed as dist_utils
from .config import ExperimentConfig


def cosine_schedule(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``total`` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_model(cfg: ExperimentConfig, vocab_size: int, eos_id: int) -> SALlamaForCausalLM:
    options = dict(cfg.model)
    options.setdefault("eos_token_id", eos_id)
    config = SALlamaConfig(vocab_size=vocab_size, **options)
    return SALlamaForCausalLM(config)


def _optimizer(model, t) -> torch.optim.AdamW:
    # No weight decay on norms and biases (the usual Llama / GPT recipe).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


class _StopFlag:
    """Set by SIGINT / SIGTERM: the loop checkpoints at the end of the current step and exits."""

    def __init__(self) -> None:
        self.raised = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Metrics:
    """metrics.jsonl (rank 0), plus TensorBoard when installed and enabled."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop records past the checkpoint we resume from
            keep = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(model, batch: torch.Tensor, precision: str) -> torch.Tensor:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with _autocast(batch.device, precision):
        logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, samplers: dict[str, ChunkSampler], *, micro_batch_size: int, batches: int,
             precision: str, info: dist_utils.DistInfo) -> dict[str, float]:
    """Mean validation loss per source (nats/token) over its first chunks, split over ranks."""
    was_training = model.training
    model.eval()
    results = {}
    for name, sampler in samplers.items():
        chunks = sampler.sequential(batches * micro_batch_size)[info.rank::info.world_size]
        total = torch.zeros(2, device=info.device)
        for i in range(0, len(chunks), micro_batch_size):
            rows = [sampler.chunk(c) for c in chunks[i:i + micro_batch_size]]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64))
            loss = _loss(model, batch.to(info.device), precision)
            total += torch.stack([loss * len(rows), torch.tensor(float(len(rows)))
                                  .to(info.device)])
        if info.enabled:
            torch.distributed.all_reduce(total)
        results[name] = (total[0] / total[1].clamp(min=1)).item()
    model.train(was_training)
    return results


def train(cfg: ExperimentConfig, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) the run described by ``cfg``; returns a summary dict.

    ``stop_after`` behaves like an interruption after that many steps (checkpoint, then
    return with ``interrupted=True``); tests use it to exercise the resume path.
    """
    t = cfg.train
    info = dist_utils.setup()
    try:
        return _train(cfg, t, info, resume, stop_after, progress)
    finally:
        dist_utils.teardown(info)


def _train(cfg, t, info, resume, stop_after, progress) -> dict:
    if t.threads:
        torch.set_num_threads(t.threads)
    out_dir = Path(t.out_dir)
    config_dict = cfg.to_dict()
    micro_per_step = t.batch_size // t.micro_batch_size
    if micro_per_step % info.world_size:
        raise ValueError(f"train.batch_size / train.micro_batch_size = {micro_per_step} "
                         f"micro-batches must divide among {info.world_size} processes")
    accum = micro_per_step // info.world_size

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    splits = []
    for rank_turn in (True, False):  # rank 0 tokenises first; the others then read its cache
        if rank_turn == info.is_main:
            splits = [prepare_source(parse_source(s), tokenizer, cfg.data.cache_dir,
                                     val_fraction=cfg.data.val_fraction,
                                     split_seed=cfg.data.split_seed) for s in cfg.data.sources]
        if info.enabled:
            torch.distributed.barrier()
    train_sampler = ChunkSampler([s.train for s in splits], t.seq_len, seed=t.seed)
    val_samplers = {s.name: ChunkSampler([s.val], t.seq_len) for s in splits}

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.eos_id).to(info.device)
    model = dist_utils.wrap(model, info, t.distributed)
    optimizer = _optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, warmup=t.warmup_steps, total=t.steps, lr=t.lr,
                                             min_lr=t.min_lr) / t.lr)
    # Permutations (and any other randomness) come from a per-rank stream.
    torch.manual_seed(t.seed * 1_000_003 + 7919 * info.rank + 1)

    step, samples = 0, 0
    if resume:
        path = checkpoint.latest(out_dir)
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(out_dir)}")
        payload = checkpoint.read(path)
        checkpoint.check_compatible(payload, config_dict, path)
        checkpoint.restore(payload, model=model, optimizer=optimizer, scheduler=scheduler,
                           info=info)
        step, samples = payload["step"], payload["samples"]
        if len(payload["rng"]) != info.world_size:  # cannot be exact; stay reproducible
            torch.manual_seed(t.seed * 1_000_003 + 7919 * info.rank + 1 + step)

    metrics = _Metrics(out_dir, step, t.tensorboard, info.is_main)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_dict, indent=1))
    bar = tqdm(total=t.steps, initial=step, disable=not (progress and info.is_main),
               desc=f"train {out_dir.name}", unit="step")
    tokens_per_step = t.batch_size * t.seq_len
    model.train()
    interrupted, last_loss, last_val = False, float("nan"), None
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def save():
        checkpoint.save(checkpoint.checkpoint_dir(out_dir) / f"step-{step:07d}.pt",
                        model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                        samples=samples, config=config_dict, info=info,
                        keep=t.keep_checkpoints)

    with _StopFlag() as stop:
        tic = time.perf_counter()
        while step < t.steps:
            total = torch.zeros((), device=info.device)
            for micro in range(accum):
                start = samples + (micro * info.world_size + info.rank) * t.micro_batch_size
                batch = train_sampler.batch(start, t.micro_batch_size).to(info.device)
                sync = contextlib.nullcontext()
                if is_ddp and micro < accum - 1:
                    sync = model.no_sync()  # gradients are all-reduced once per step
                with sync:
                    loss = _loss(model, batch, t.precision)
                    (loss / accum).backward()
                total += loss.detach() / accum
            grad_norm = float("nan")
            if t.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                 t.grad_clip))
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples += t.batch_size
            last_loss = dist_utils.all_reduce_mean(total, info).item()

            toc = time.perf_counter()
            tok_s = tokens_per_step / max(toc - tic, 1e-9)
            tic = toc
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            if step % t.log_every == 0 or step == t.steps:
                metrics.log({"step": step, "loss": last_loss, "lr": lr,
                             "grad_norm": grad_norm, "tokens": step * tokens_per_step,
                             "tokens_per_s": tok_s})
            if step % t.eval_every == 0 or step == t.steps:
                last_val = evaluate(model, val_samplers, micro_batch_size=t.micro_batch_size,
                                    batches=t.eval_batches, precision=t.precision, info=info)
                metrics.log({"step": step, "val_loss": last_val,
                             "val_loss_mean": sum(last_val.values()) / len(last_val)})
            if stop_after is not None and step >= stop_after:
                stop.raised = True
            interrupted = dist_utils.any_rank(stop.raised, info) and step < t.steps
            if step % t.checkpoint_every == 0 or step == t.steps or interrupted:
                save()
            if interrupted:
                break
    bar.close()
    metrics.close()
    if info.is_main and not interrupted and not (info.enabled and t.distributed == "fsdp"):
        # A Hugging Face directory for evaluation and generate() (FSDP runs: the checkpoint).
        (model.module if is_ddp else model).save_pretrained(out_dir / "final")
    return {"step": step, "samples": samples, "loss": last_loss, "val_loss": last_val,
            "interrupted": interrupted, "out_dir": str(out_dir)}
