"""The YAML configuration of a pre-training run: ``model``, ``data`` and ``train`` sections.

``model`` holds :class:`~stochastic_attention.models.SALlamaConfig` arguments (the vocabulary
size comes from the tokenizer); ``data`` and ``train`` are the dataclasses below. Unknown keys
are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: ["shakespeare"])
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    split_seed: int = 0
    cache_dir: str = "~/.cache/stochastic-attention/tokens"


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0                 # model initialisation, data order and permutations
    seq_len: int = 512
    batch_size: int = 16          # sequences per optimiser step, over all processes
    micro_batch_size: int = 8     # sequences per forward pass and process
    steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0        # 0 disables clipping
    precision: str = "auto"       # auto = bf16 autocast on a GPU that supports it, else fp32
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8         # validation micro-batches per source
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    distributed: str = "ddp"      # used under torchrun: "ddp" or "fsdp"
    tensorboard: bool = True      # also log to TensorBoard when it is installed
    threads: int | None = None    # torch CPU threads (None: torch's default)


@dataclass
class ExperimentConfig:
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> ExperimentConfig:
        t = self.train
        for name in ("seq_len", "batch_size", "micro_batch_size", "steps", "log_every",
                     "eval_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(t, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        if t.batch_size % t.micro_batch_size:
            raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({t.micro_batch_size})")
        if t.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
        if t.distributed not in DISTRIBUTED:
            raise ValueError(f"train.distributed must be one of {DISTRIBUTED}, "
                             f"got {t.distributed!r}")
        if not 0 <= t.min_lr <= t.lr:
            raise ValueError(f"need 0 <= train.min_lr <= train.lr, got {t.min_lr} and {t.lr}")
        if "vocab_size" in self.model:
            raise ValueError("model.vocab_size comes from data.tokenizer; remove it")
        if not self.data.sources:
            raise ValueError("data.sources is empty: name at least one corpus, path or dataset")
        return self


def _build(cls, values: dict | None, section: str):
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown keys in '{section}': {unknown}; known: {sorted(names)}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


def config_from_dict(raw: dict) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ValueError("a training config must be a mapping with model / data / train sections")
    unknown = sorted(set(raw) - {"model", "data", "train"})
    if unknown:
        raise ValueError(f"unknown top-level keys {unknown}; use model, data and train")
    return ExperimentConfig(model=dict(raw.get("model") or {}),
                            data=_build(DataConfig, raw.get("data"), "data"),
                            train=_build(TrainConfig, raw.get("train"), "train")).validate()


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config; ``overrides`` are ``section.key=value`` strings (value in YAML)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "data", "train"):
            raise ValueError(f"override {item!r} must look like section.key=value, "
                             "e.g. train.steps=200")
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {}, **{name: yaml.safe_load(value)})
    return config_from_dict(raw)
