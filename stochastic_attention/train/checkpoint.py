"""Training checkpoints: model, optimiser, scheduler, RNG and data position, saved atomically.

The state dicts are full (unsharded) and keyed by parameter name, via
``torch.distributed.checkpoint.state_dict``, so the same file serves 1 process, DDP and FSDP.

Each run has an id (``run.json`` in its output folder) that every checkpoint records; pruning
old checkpoints and picking the one to resume from only ever look at the current run's files.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from ..cli_args import UsageError
from .distributed import DistInfo

FORMAT = "stochastic-attention-train"
VERSION = 1
_NAME = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(UsageError):
    """A checkpoint that cannot be used: unreadable, not ours, or from another configuration."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def run_file(out_dir: str | Path) -> Path:
    return Path(out_dir) / "run.json"


def new_run_id(out_dir: str | Path) -> str:
    """Start a new run in ``out_dir``: a fresh id, recorded in ``run.json``."""
    run_id = uuid.uuid4().hex
    path = run_file(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id}) + "\n")
    return run_id


def current_run_id(out_dir: str | Path) -> str | None:
    """The id of the run in ``out_dir`` (None: no run.json, e.g. a run from an older version)."""
    try:
        return json.loads(run_file(out_dir).read_text())["run_id"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _step(path: Path) -> int:
    return int(_NAME.search(path.name).group(1))


def _run_id_of(path: Path) -> str | None:
    """The run id a checkpoint records; memory-mapped, so its tensors are not read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run_id")
    except Exception:  # unreadable files belong to no run (and are never deleted here)
        return ""


def checkpoints(out_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Checkpoints in ``out_dir``, oldest first; only run ``run_id``'s when given."""
    paths = sorted((p for p in checkpoint_dir(out_dir).glob("step-*.pt") if _NAME.search(p.name)),
                   key=_step)
    if run_id is not None:
        paths = [p for p in paths if _run_id_of(p) == run_id]
    return paths


def latest(out_dir: str | Path, run_id: str | None = None) -> Path | None:
    """The newest checkpoint (of run ``run_id`` when given), or None."""
    paths = checkpoints(out_dir)
    if run_id is not None:  # read ids newest first: usually the first one matches
        # an unreadable file is returned too, so that resuming reports it as corrupt
        paths = [p for p in paths[::-1] if _run_id_of(p) in (run_id, "")][:1]
    return paths[-1] if paths else None


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
         info: DistInfo, keep: int, run_id: str | None = None) -> None:
    """Collective under distributed training; rank 0 writes ``path`` (atomically).

    Then deletes all but the newest ``keep`` checkpoints of run ``run_id`` (files of other
    runs, or unreadable ones, are left alone).
    """
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(info))
    rng = _rng_state(info)
    if info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT, "version": VERSION, "step": step, "samples": samples,
            "config": config, "world_size": info.world_size, "model": model_state,
            "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng,
            "run_id": run_id,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind
        for stale in checkpoints(path.parent.parent, run_id)[:-keep]:
            stale.unlink()
    if info.enabled:
        dist.barrier()


def read(path: Path) -> dict:
    """Load and sanity-check a checkpoint file; raise CheckpointError with the fix."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a zip, not a torch file ...
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); "
                              "it is corrupt or truncated: delete it to resume from an "
                              "earlier one, or start a new out_dir") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stochastic-attention training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, "
                              f"this code reads version {VERSION}")
    return payload


def _default(section: str, key: str):
    """The default of config key ``section.key`` (None for keys without a declared default)."""
    from dataclasses import MISSING, fields

    from .config import DataConfig

    if section == "data":
        for f in fields(DataConfig):
            if f.name == key and f.default is not MISSING:
                return f.default
    return None


def check_compatible(payload: dict, config: dict, path: Path) -> None:
    """The model and data must match the run being resumed (training length may change)."""
    diffs = []
    for section in ("model", "data"):
        old, new = payload["config"].get(section, {}), config.get(section, {})
        for key in sorted(set(old) | set(new)):
            # a key added to the config after the checkpoint was written takes its default there
            if old.get(key, _default(section, key)) != new.get(key, _default(section, key)):
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
