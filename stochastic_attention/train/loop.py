"""The pre-training loop: short steps, every knob visible in the config.

Data position, learning-rate schedule and permutation RNG are all functions of the step
count and the saved state, so a run interrupted (SIGINT / SIGTERM, or ``stop_after``) and
resumed with ``resume=True`` reproduces the uninterrupted run exactly. A new run never
replaces an old one in the same folder unless asked (``overwrite=True``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cli_args import UsageError
from ..data import ChunkSampler, load_tokenizer, parse_source, prepare_source
from ..data.packing import IGNORE_INDEX, packed_batch
from ..models import SALlamaConfig, SALlamaForCausalLM
from ..progress import tqdm
from . import checkpoint
from . import distributed as dist_utils
from .config import ConfigError, ExperimentConfig, TrainConfig
from .schedule import cosine_lambda_lr

# What a run writes into its folder (``overwrite=True`` removes exactly these).
RUN_FILES = ("run.json", "config.json", "metrics.jsonl", "eval.json")
RUN_DIRS = ("checkpoints", "final", "tensorboard")


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


def _loss(model, batch: torch.Tensor, precision: str, eos_id: int | None = None) -> torch.Tensor:
    """Mean next-token loss of a chunk batch; with ``eos_id`` (data.pack) its documents are
    packed: attended apart, no target across a boundary (:mod:`..data.packing`)."""
    if eos_id is None:
        inputs, targets, positions = batch[:, :-1], batch[:, 1:], None
    else:
        inputs, targets, positions = packed_batch(batch, eos_id)
    with _autocast(batch.device, precision):
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, samplers: dict[str, ChunkSampler], *, micro_batch_size: int, batches: int,
             precision: str, info: dist_utils.DistInfo,
             eos_id: int | None = None) -> dict[str, float]:
    """Mean validation loss per source (nats/token) over its first chunks, split over ranks
    (chunks packed by document with ``eos_id``, as in training with data.pack)."""
    was_training = model.training
    model.eval()
    results = {}
    for name, sampler in samplers.items():
        chunks = sampler.sequential(batches * micro_batch_size)[info.rank::info.world_size]
        total = torch.zeros(2, device=info.device)
        for i in range(0, len(chunks), micro_batch_size):
            rows = [sampler.chunk(c) for c in chunks[i:i + micro_batch_size]]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64))
            loss = _loss(model, batch.to(info.device), precision, eos_id)
            total += torch.stack([loss * len(rows), torch.tensor(float(len(rows)))
                                  .to(info.device)])
        if info.enabled:
            torch.distributed.all_reduce(total)
        results[name] = (total[0] / total[1].clamp(min=1)).item()
    model.train(was_training)
    return results


def existing_run(out_dir: Path) -> list[str]:
    """The files and folders of an earlier run in ``out_dir`` (empty: nothing to lose)."""
    return [name for name in (*RUN_FILES, *RUN_DIRS) if (out_dir / name).exists()]


def clear_run(out_dir: Path) -> None:
    """Remove what a run wrote into ``out_dir`` (and nothing else)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out_dir / name, ignore_errors=True)


def train(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) the run described by ``cfg``; returns a summary dict.

    A fresh run refuses to start in a folder that holds another run: ``resume=True``
    continues that run, ``overwrite=True`` deletes it first. ``stop_after`` behaves like an
    interruption after that many steps (checkpoint, then return with ``interrupted=True``);
    tests use it to exercise the resume path. The summary's ``val_loss`` is measured at its
    ``step``.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    t = cfg.train
    out_dir = Path(t.out_dir)
    if not resume and not overwrite and existing_run(out_dir):
        raise UsageError(f"{out_dir} already holds a run ({', '.join(existing_run(out_dir))}); "
                         "pass --resume to continue it or --overwrite to replace it")
    info = dist_utils.setup()
    try:
        return _train(cfg, info, resume, stop_after, progress)
    finally:
        dist_utils.teardown(info)


def _save_final(model, cfg: ExperimentConfig, tokenizer, info: dist_utils.DistInfo,
                path: Path) -> None:
    """The Hugging Face directory for evaluation and generate(); collective under FSDP."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if not (info.enabled and cfg.train.distributed == "fsdp"):
        if info.is_main:
            model.save_pretrained(path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Every rank takes part in gathering the shards; rank 0 alone receives the full weights.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if info.is_main:
        with torch.random.fork_rng(devices=[]):  # a plain copy, initialised then overwritten
            plain = build_model(cfg, tokenizer.vocab_size, tokenizer.eos_id)
        plain.load_state_dict(state)
        plain.save_pretrained(path)
    torch.distributed.barrier()


def _resume_point(out_dir: Path) -> tuple[Path, str | None]:
    """The checkpoint to resume from: the newest of the run recorded in ``run.json``."""
    run_id = checkpoint.current_run_id(out_dir)
    path = checkpoint.latest(out_dir, run_id)
    if path is None:
        raise checkpoint.CheckpointError(
            f"--resume: no checkpoint of the run in {out_dir} under "
            f"{checkpoint.checkpoint_dir(out_dir)}; start it without --resume")
    return path, run_id


@dataclass
class _Run:
    """What the steps of one run share: its pieces, and where it stands (``step``, losses)."""

    cfg: ExperimentConfig
    info: dist_utils.DistInfo
    config: dict  # cfg as saved in config.json and in every checkpoint
    accum: int  # micro-batches per rank and optimizer step
    tokenizer: object
    train_sampler: ChunkSampler
    val_samplers: dict[str, ChunkSampler]
    model: torch.nn.Module
    step_model: torch.nn.Module  # what the training steps call: ``model``, compiled or not
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    run_id: str | None  # (rank 0 writes the checkpoints, so only it needs the id)
    pack_eos: int | None  # with data.pack: the EOS that separates documents attended apart
    step: int = 0
    samples: int = 0
    loss: float = float("nan")
    val_loss: dict[str, float] | None = None
    val_step: int | None = None
    interrupted: bool = False

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


def _train(cfg: ExperimentConfig, info: dist_utils.DistInfo, resume: bool,
           stop_after: int | None, progress: bool) -> dict:
    """Build (or resume) the run, step it to the end or an interruption, then finish it."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    # Before any work: resuming a folder without a checkpoint fails at once.
    resume_from = _resume_point(Path(t.out_dir)) if resume else None
    run = _build(cfg, info, resume_from)
    if resume_from is not None:
        _resume(run, resume_from[0])
    _train_steps(run, stop_after, progress)
    if run.val_step != run.step:  # interrupted between evaluations, or resumed a finished run
        _validate(run)
    if not run.interrupted:
        _save_final(run.model, cfg, run.tokenizer, info, run.out_dir / "final")
    return {"step": run.step, "samples": run.samples, "loss": run.loss,
            "val_loss": run.val_loss, "interrupted": run.interrupted,
            "out_dir": str(run.out_dir)}


def _accumulation(t: TrainConfig, info: dist_utils.DistInfo) -> int:
    """Micro-batches each rank runs per optimizer step, so that the global batch is
    ``train.batch_size`` whatever the number of processes."""
    micro_per_step = t.batch_size // t.micro_batch_size
    if micro_per_step % info.world_size:
        raise ConfigError(f"train.batch_size / train.micro_batch_size = {micro_per_step} "
                         f"micro-batches must divide among {info.world_size} processes")
    return micro_per_step // info.world_size


def _load_data(cfg: ExperimentConfig, info: dist_utils.DistInfo):
    """The tokenizer and the samplers of training and validation chunks. Rank 0 tokenises
    first; the others then read its cache instead of all writing it at once."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    splits = []
    for rank_turn in (True, False):
        if rank_turn == info.is_main:
            splits = [prepare_source(parse_source(s), tokenizer, cfg.data.cache_dir,
                                     val_fraction=cfg.data.val_fraction,
                                     split_seed=cfg.data.split_seed) for s in cfg.data.sources]
        if info.enabled:
            torch.distributed.barrier()
    t = cfg.train
    train_sampler = ChunkSampler([s.train for s in splits], t.seq_len, seed=t.seed)
    val_samplers = {s.name: ChunkSampler([s.val], t.seq_len) for s in splits}
    return tokenizer, train_sampler, val_samplers


def _seed_rank_stream(t: TrainConfig, info: dist_utils.DistInfo, offset: int = 0) -> None:
    """Permutations (and any other randomness) come from a per-rank stream."""
    torch.manual_seed(t.seed * 1_000_003 + 7919 * info.rank + 1 + offset)


def _build(cfg: ExperimentConfig, info: dist_utils.DistInfo,
           resume_from: tuple[Path, str | None] | None) -> _Run:
    """Data, model, optimizer and schedule. A new run clears its folder only once data and
    model are known to work, so a config error never costs an old run."""
    t = cfg.train
    accum = _accumulation(t, info)
    tokenizer, train_sampler, val_samplers = _load_data(cfg, info)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    try:
        model = build_model(cfg, tokenizer.vocab_size, tokenizer.eos_id).to(info.device)
    except ValueError as err:  # the attention layers' own checks (window, sinks, ...)
        raise ConfigError(f"model: {err}") from None
    run_id = None if resume_from is None else resume_from[1]
    if resume_from is None and info.is_main:
        clear_run(Path(t.out_dir))  # (only reached with overwrite=True, or when there is nothing)
        run_id = checkpoint.new_run_id(Path(t.out_dir))
    model = dist_utils.wrap(model, info, t.distributed)
    # Only the training steps run compiled: the optimiser, checkpoints (no "_orig_mod." keys),
    # evaluation and the final model all use the module itself.
    step_model = torch.compile(model) if t.compile else model
    optimizer = _optimizer(model, t)
    scheduler = cosine_lambda_lr(optimizer, warmup=t.warmup_steps, total=t.steps, lr=t.lr,
                                 min_lr=t.min_lr)
    _seed_rank_stream(t, info)
    return _Run(cfg=cfg, info=info, config=cfg.to_dict(), accum=accum, tokenizer=tokenizer,
                train_sampler=train_sampler, val_samplers=val_samplers, model=model,
                step_model=step_model, optimizer=optimizer, scheduler=scheduler, run_id=run_id,
                pack_eos=tokenizer.eos_id if cfg.data.pack else None)


def _resume(run: _Run, path: Path) -> None:
    """Restore weights, optimizer, schedule, RNG and position from the checkpoint ``path``,
    after checking that it belongs to this config."""
    payload = checkpoint.read(path)
    checkpoint.check_compatible(payload, run.config, path)
    if run.run_id is None:  # a run from before run ids: adopt the checkpoint's (or none)
        run.run_id = payload.get("run_id")
    checkpoint.restore(payload, model=run.model, optimizer=run.optimizer,
                       scheduler=run.scheduler, info=run.info)
    run.step, run.samples = payload["step"], payload["samples"]
    if len(payload["rng"]) != run.info.world_size:  # cannot be exact; stay reproducible
        _seed_rank_stream(run.cfg.train, run.info, offset=run.step)
    if run.info.is_main:
        print(f"resumed from step {run.step} ({path})", file=sys.stderr, flush=True)


def _train_steps(run: _Run, stop_after: int | None, progress: bool) -> None:
    """Step until ``train.steps``, logging, validating and checkpointing on their schedules.
    A stop request (a signal on any rank, or ``stop_after``) ends it after a checkpoint."""
    t, info = run.cfg.train, run.info
    metrics = _Metrics(run.out_dir, run.step, t.tensorboard, info.is_main)
    if info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "config.json").write_text(json.dumps(run.config, indent=1))
    bar = tqdm(total=t.steps, initial=run.step, disable=not (progress and info.is_main),
               desc=f"train {run.out_dir.name}", unit="step")
    run.model.train()
    with _StopFlag() as stop:
        tic = time.perf_counter()
        while run.step < t.steps:
            lr, grad_norm = _one_step(run)
            toc = time.perf_counter()
            tok_s = t.batch_size * t.seq_len / max(toc - tic, 1e-9)
            tic = toc
            bar.update(1)
            bar.set_postfix(loss=f"{run.loss:.4f}", tok_s=f"{tok_s:,.0f}")
            _log_and_validate(run, metrics, lr=lr, grad_norm=grad_norm, tok_s=tok_s)
            if stop_after is not None and run.step >= stop_after:
                stop.raised = True
            run.interrupted = dist_utils.any_rank(stop.raised, info) and run.step < t.steps
            if run.step % t.checkpoint_every == 0 or run.step == t.steps or run.interrupted:
                _save_checkpoint(run)
            if run.interrupted:
                break
    bar.close()
    metrics.close()


def _one_step(run: _Run) -> tuple[float, float]:
    """One optimizer step over the global batch; returns the rate it used and the gradient
    norm before clipping (NaN without clipping). Each rank reads its own micro-batches."""
    t, info, model = run.cfg.train, run.info, run.model
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    total = torch.zeros((), device=info.device)
    for micro in range(run.accum):
        start = run.samples + (micro * info.world_size + info.rank) * t.micro_batch_size
        batch = run.train_sampler.batch(start, t.micro_batch_size).to(info.device)
        sync = contextlib.nullcontext()
        if is_ddp and micro < run.accum - 1:
            sync = model.no_sync()  # gradients are all-reduced once per step
        with sync:
            loss = _loss(run.step_model, batch, t.precision, run.pack_eos)
            (loss / run.accum).backward()
        total += loss.detach() / run.accum
    grad_norm = float("nan")
    if t.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.samples += t.batch_size
    run.loss = dist_utils.all_reduce_mean(total, info).item()
    return lr, grad_norm


def _log_and_validate(run: _Run, metrics: _Metrics, *, lr: float, grad_norm: float, tok_s: float) -> None:
    """Training metrics every ``train.log_every`` steps, validation losses every
    ``train.eval_every``; both at the last step."""
    t, step = run.cfg.train, run.step
    if step % t.log_every == 0 or step == t.steps:
        metrics.log({"step": step, "loss": run.loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens": step * t.batch_size * t.seq_len, "tokens_per_s": tok_s})
    if step % t.eval_every == 0 or step == t.steps:
        val = _validate(run)
        metrics.log({"step": step, "val_loss": val, "val_loss_mean": sum(val.values()) / len(val)})


def _validate(run: _Run) -> dict[str, float]:
    """Validation loss per source at the current step (collective: every rank calls it)."""
    t = run.cfg.train
    run.val_loss = evaluate(run.model, run.val_samplers, micro_batch_size=t.micro_batch_size,
                            batches=t.eval_batches, precision=t.precision, info=run.info,
                            eos_id=run.pack_eos)
    run.val_step = run.step
    return run.val_loss


def _save_checkpoint(run: _Run) -> None:
    """The resumable state at the current step (older checkpoints pruned to ``keep``)."""
    t = run.cfg.train
    checkpoint.save(checkpoint.checkpoint_dir(run.out_dir) / f"step-{run.step:07d}.pt",
                    model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                    step=run.step, samples=run.samples, config=run.config, info=run.info,
                    keep=t.keep_checkpoints, run_id=run.run_id)
