"""Training checkpoints: model, optimiser, scheduler, RNG and data position, saved atomically.

The state dicts are full (unsharded) and keyed by parameter name, via
``torch.distributed.checkpoint.state_dict``, so the same file serves 1 process, DDP and FSDP.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from .distributed import DistInfo

FORMAT = "stochastic-attention-train"
VERSION = 1
_NAME = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not ours, or from another configuration."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: str | Path) -> Path | None:
    paths = [p for p in checkpoint_dir(out_dir).glob("step-*.pt") if _NAME.search(p.name)]
    return max(paths, key=lambda p: int(_NAME.search(p.name).group(1)), default=None)


def _options(info: DistInfo) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=info.enabled)


def _rng_state(info: DistInfo) -> list[dict]:
    """Every rank's RNG state (permutations are drawn per rank)."""
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if not info.enabled:
        return [state]
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def save(path: Path, *, model, optimizer, scheduler, step: int, samples: int, config: dict,
         info: DistInfo, keep: int) -> None:
    """Collective under distributed training; rank 0 writes ``path`` (atomically)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(info))
    rng = _rng_state(info)
    if info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT, "version": VERSION, "step": step, "samples": samples,
            "config": config, "world_size": info.world_size, "model": model_state,
            "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind
        old = sorted(checkpoint_dir(path.parent.parent).glob("step-*.pt"))[:-keep]
        for stale in old:
            stale.unlink()
    if info.enabled:
        dist.barrier()


def read(path: Path) -> dict:
    """Load and sanity-check a checkpoint file; raise CheckpointError with the fix."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a zip, not a torch file ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                              "it is corrupt or truncated: delete it to resume from an "
                              "earlier one, or start a new out_dir") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stochastic-attention training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, "
                              f"this code reads version {VERSION}")
    return payload


def check_compatible(payload: dict, config: dict, path: Path) -> None:
    """The model and data must match the run being resumed (training length may change)."""
    diffs = []
    for section in ("model", "data"):
        old, new = payload["config"].get(section, {}), config.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r}, config "
                             f"{new.get(key)!r}")
    for key in ("seq_len", "batch_size", "seed"):
        if payload["config"]["train"].get(key) != config["train"].get(key):
            diffs.append(f"train.{key}: checkpoint {payload['config']['train'].get(key)!r}, "
                         f"config {config['train'].get(key)!r}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} belongs to a different configuration: "
                              + "; ".join(diffs)
                              + ". Resume with the original config, or use a new out_dir.")


def restore(payload: dict, *, model, optimizer, scheduler, info: DistInfo) -> None:
    try:
        set_state_dict(model, optimizer, model_state_dict=payload["model"],
                       optim_state_dict=payload["optimizer"], options=_options(info))
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights do not fit this model: {err}") from err
    scheduler.load_state_dict(payload["scheduler"])
    rng = payload["rng"]
    if len(rng) == info.world_size:
        mine = rng[info.rank]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
