"""The YAML configuration of a pre-training run: ``model``, ``data`` and ``train`` sections.

``model`` holds :class:`~stochastic_attention.models.SALlamaConfig` arguments (the vocabulary
size comes from the tokenizer); ``data`` and ``train`` are the dataclasses below. Unknown keys
in any section are errors (:class:`ConfigError`, listing the valid keys), so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..cli_args import UsageError

PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")


class ConfigError(UsageError):
    """A training config that cannot be used: unreadable, unknown keys or bad values."""


def model_keys() -> list[str]:
    """The keys of the ``model`` section: SALlamaConfig's arguments (but the vocabulary size)."""
    from ..models import SALlamaConfig

    params = inspect.signature(SALlamaConfig.__init__).parameters.values()
    return sorted(p.name for p in params if p.name not in ("self", "vocab_size")
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: ["shakespeare"])
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    split_seed: int = 0
    cache_dir: str = "~/.cache/stochastic-attention/tokens"
    pack: bool = False            # documents in a row attended apart (data/packing.py)


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
    compile: bool = False         # torch.compile the model for the training steps


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
                raise ConfigError(f"train.{name} must be a positive int, got {value!r}")
        if t.batch_size % t.micro_batch_size:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({t.micro_batch_size})")
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
        if t.distributed not in DISTRIBUTED:
            raise ConfigError(f"train.distributed must be one of {DISTRIBUTED}, "
                             f"got {t.distributed!r}")
        if not 0 <= t.min_lr <= t.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr, got {t.min_lr} and {t.lr}")
        if t.seq_len < 2:
            raise ConfigError(f"train.seq_len must be >= 2 (a model input and its next token), "
                              f"got {t.seq_len}")
        if not self.data.sources:
            raise ConfigError("data.sources is empty: name at least one corpus, path or dataset")
        self._validate_model()
        return self

    def _validate_model(self) -> None:
        if "vocab_size" in self.model:
            raise ConfigError("model.vocab_size comes from data.tokenizer; remove it")
        from ..models.sa_llama_config import reject_old_arguments

        try:  # renamed keys (attention_kinds, window ...) name their replacement
            reject_old_arguments(self.model)
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
        known = model_keys()
        unknown = sorted(set(self.model) - set(known))
        if unknown:
            raise ConfigError(f"unknown keys in 'model': {unknown}; known: {known}")
        from ..models import SALlamaConfig

        try:  # the model's own checks (attention methods, head sizes ...) before any work
            SALlamaConfig(**self.model)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model: {err}") from None


def _section(values, section: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"'{section}' must be a mapping of key: value, got {values!r}")
    return dict(values)


def _check_type(section: str, name: str, default, value) -> None:
    """Values must have their default's type (an int is fine where a float is expected)."""
    if isinstance(default, bool) or default is None:
        ok = default is None or isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{section}.{name} must be a {type(default).__name__}, got {value!r}")


def _build(cls, values, section: str):
    values = _section(values, section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown keys in '{section}': {unknown}; known: {sorted(fields)}")
    defaults = cls()
    for name, value in values.items():
        _check_type(section, name, getattr(defaults, name), value)
    if "betas" in values:
        betas = values["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"{section}.betas must be a list of two numbers, got {betas!r}")
        values["betas"] = tuple(betas)
    return cls(**values)


def config_from_dict(raw: dict) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError("a training config must be a mapping with model / data / train sections")
    unknown = sorted(set(raw) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"unknown top-level keys {unknown}; use model, data and train")
    return ExperimentConfig(model=_section(raw.get("model"), "model"),
                            data=_build(DataConfig, raw.get("data"), "data"),
                            train=_build(TrainConfig, raw.get("train"), "train")).validate()


def _set(mapping: dict, keys: list[str], value, item: str) -> dict:
    """A copy of ``mapping`` with ``mapping[k0][k1]... = value`` (nested mappings copied)."""
    if len(keys) == 1:
        return dict(mapping, **{keys[0]: value})
    inner = mapping.get(keys[0]) or {}
    if not isinstance(inner, dict):
        raise ConfigError(f"override {item!r}: {keys[0]} is not a mapping")
    return dict(mapping, **{keys[0]: _set(inner, keys[1:], value, item)})


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config; ``overrides`` are ``section.key=value`` strings (value in YAML);
    ``section.key.sub=value`` sets one entry of a mapping, e.g.
    ``model.attention_options.window=16``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: "
                          f"{' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with model / data / train "
                          "sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "data", "train"):
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              "e.g. train.steps=200")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        raw[section] = _set(_section(raw.get(section), section), name.split("."), parsed, item)
    return config_from_dict(raw)
