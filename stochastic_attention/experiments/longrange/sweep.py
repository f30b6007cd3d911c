"""The long-range grid: profiles, groups of cells, resumable shards and merging.

A *group* is (task, method, depth, width). Each group runs its learning-rate sweep at the first
seed, keeps the learning rate with the best validation accuracy, then runs the other seeds at
it (so the reported test accuracy is never the one that picked the learning rate). Shards split
the groups by estimated cost; each appends one JSON line per finished cell to its own file, so an
interrupted shard skips what it already finished when started again, and any set of shard
files merges into one report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .methods import METHODS, mean_keys, method_options
from .train import Cell, TaskSpec, train_cell


@dataclass(frozen=True)
class Profile:
    name: str
    tasks: tuple[TaskSpec, ...]
    methods: tuple[str, ...] = METHODS
    depths: tuple[int, ...] = (2, 4)
    widths: tuple[int, ...] = (64,)
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: int = 16
    steps: int = 150
    batch_size: int = 32
    eval_examples: int = 512
    heads: int = 2
    # Depths whose groups run the learning-rate sweep; a group at another depth reuses the rate
    # chosen for the same task, method and width at the nearest swept depth (None: sweep everywhere).
    lr_sweep_depths: tuple[int, ...] | None = None
    # Extra groups: (task name, methods, depths, widths) crossed in addition to the main grid.
    extra: tuple[tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...]], ...] = ()
    description: str = ""


MAJORITY = TaskSpec("majority", seq_len=256, margins=(0.0625, 0.125, 0.25),
                    eval_margins=(0.0625, 0.125, 0.25))
MQAR = TaskSpec("mqar", seq_len=128, pairs=8, vocab=64, random_filler=False)

PROFILES: dict[str, Profile] = {
    # The grid behind docs/results-long-range.md.
    "full": Profile(
        "full", tasks=(MAJORITY,), depths=(2, 4), widths=(64,), budget=8, lr_sweep_depths=(2,),
        extra=(("majority", METHODS[1:], (6,), (64,)),),
        description="majority at 256 tokens, budget 8 keys/query; 9 methods x depth 2, 4, and all but "
                    "full at depth 6 (width 64); lr {1e-3, 3e-3} at seed 0 (depth 2; deeper models "
                    "reuse it), seeds 0-2 at the best"),
    # Accuracy against width, where SWA and the SA + local union differ most.
    "width": Profile(
        "width", tasks=(MAJORITY,), methods=("sliding_window", "stochastic_local"), depths=(2,),
        widths=(32, 64, 128), lrs=(3e-3,), seeds=(0,), budget=8,
        description="majority at 256 tokens, budget 8; sliding_window and stochastic_local at "
                    "depth 2, width 32, 64, "
                    "128; lr 3e-3; 1 seed"),
    # MQAR as far as this CPU affords: 600 steps of 32 sequences (Zoology trains about 20x longer).
    "mqar": Profile(
        "mqar", tasks=(MQAR,), methods=("full", "sliding_window", "stochastic_local", "moba"),
        depths=(2,), lrs=(1e-2,),
        seeds=(0,), budget=8, steps=600, batch_size=32, eval_examples=256,
        description="MQAR at 128 tokens, 8 pairs, vocabulary 64, zero filler; depth 2, width 64; "
                    "600 steps; 1 seed"),
    # About 15 minutes on one core (14 min of CPU measured): the full grid's main finding (the
    # eight main methods at depth 2 and 4, one seed, one learning rate).
    "quick": Profile(
        "quick", tasks=(MAJORITY,), methods=METHODS[:8], depths=(2, 4), lrs=(3e-3,), seeds=(0,),
        budget=8, steps=150, batch_size=32, eval_examples=256,
        description="majority at 256 tokens, budget 8; 8 methods x depth 2, 4; lr 3e-3; 1 seed"),
    # Seconds: for the tests.
    "tiny": Profile(
        "tiny", tasks=(TaskSpec("majority", seq_len=32, margins=(0.25,), eval_margins=(0.25,)),
                       TaskSpec("mqar", seq_len=32, pairs=4, vocab=32)),
        methods=("full", "sliding_window", "stochastic"), depths=(1,), widths=(16,), lrs=(3e-3, 1e-2), seeds=(0, 1),
        budget=4, steps=3, batch_size=4, eval_examples=8, heads=1,
        description="smoke test"),
}


@dataclass(frozen=True)
class Group:
    task: int
    method: str
    depth: int
    width: int

    def cells(self, profile: Profile, lr: float, seed: int) -> Cell:
        task = profile.tasks[self.task]
        layer_method, options = method_options(self.method, profile.budget, task.seq_len)
        return Cell(task=task, method=layer_method, attention=options, layers=self.depth,
                    width=self.width, heads=profile.heads, lr=lr, steps=profile.steps,
                    batch_size=profile.batch_size, seed=seed, eval_examples=profile.eval_examples)


def groups(profile: Profile) -> list[Group]:
    out = [Group(t, m, d, w) for t in range(len(profile.tasks)) for m in profile.methods
           for d in profile.depths for w in profile.widths]
    names = [task.name for task in profile.tasks]
    for name, methods, depths, widths in profile.extra:
        if name not in names:
            continue
        t = names.index(name)
        out += [Group(t, m, d, w) for m in methods if m in profile.methods for d in depths
                for w in widths if Group(t, m, d, w) not in out]
    return out


def shard_groups(profile: Profile, shard: tuple[int, int]) -> list[Group]:
    """The groups of shard i of k: balanced by estimated cost (layers x width x length), greedily.

    Deterministic, so a restarted shard gets the same groups.
    """
    i, k = shard
    def cost(g: Group) -> float:
        return g.depth * g.width * profile.tasks[g.task].seq_len
    loads, mine = [0.0] * k, []
    for index, group in sorted(enumerate(groups(profile)), key=lambda ig: (-cost(ig[1]), ig[0])):
        target = min(range(k), key=lambda s: (loads[s], s))
        loads[target] += cost(group)
        if target == i:
            mine.append((index, group))
    return [g for _, g in sorted(mine, key=lambda ig: ig[0])]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/k' -> (i, k) with 0 <= i < k."""
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like i/k (e.g. 0/4), got {text!r}") from err
    if not 0 <= i < k:
        raise ValueError(f"--shard i/k needs 0 <= i < k, got {text!r}")
    return i, k


def load_records(paths: list[Path]) -> list[dict]:
    """Every record in the shard files (a torn last line from an interruption is skipped)."""
    records = []
    for path in paths:
        files = sorted(Path(path).glob("shard-*.jsonl")) if Path(path).is_dir() else [Path(path)]
        for file in files:
            for line in file.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "kind" in record:
                    raise ValueError(
                        f"{file} holds records of the former format (\"kind\" and the old method "
                        "names, e.g. \"swa\"); this version writes \"method\" with the names of "
                        "stochastic_attention.vocabulary: rerun those cells into a new folder")
                records.append(record)
    return records


def _append(path: Path, record: dict) -> None:
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        if torn:  # an interrupted write left half a line: end it so the new record stays readable
            f.write("\n")
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_shard(profile: Profile, out: Path, shard: tuple[int, int] = (0, 1), *,
              progress: bool = True, log=print) -> Path:
    """Run one shard's groups; cells already in ``out`` are skipped. Returns the shard file."""
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "profile.json"
    if not meta.exists():
        meta.write_text(json.dumps({"profile": profile.name, "description": profile.description},
                                   indent=2))
    i, k = shard
    path = out / f"shard-{i}-of-{k}.jsonl"
    done = {r["key"]: r for r in load_records([out])}
    mine = shard_groups(profile, shard)
    total = len(mine) * (len(profile.lrs) + len(profile.seeds) - 1)
    bar = _bar(total, progress, f"shard {i}/{k}")
    for group in mine:
        val = {}
        reused = _reused_lr(profile, group, done)
        for lr in profile.lrs if reused is None else ():
            rec = _run(group.cells(profile, lr, profile.seeds[0]), done, path, group, profile)
            val[lr] = rec["val_accuracy"]
            bar.update(1)
        best = max(profile.lrs, key=lambda lr: (val[lr], -lr)) if reused is None else reused
        if reused is not None:
            val[best] = _run(group.cells(profile, best, profile.seeds[0]), done, path, group,
                             profile)["val_accuracy"]
            bar.update(len(profile.lrs))
        for seed in profile.seeds[1:]:
            _run(group.cells(profile, best, seed), done, path, group, profile)
            bar.update(1)
        log(f"{profile.tasks[group.task].name} {group.method} L={group.depth} d={group.width}: "
            f"best lr {best:g} (val acc {val[best]:.3f})")
    bar.close()
    return path


def _reused_lr(profile: Profile, group: Group, done: dict) -> float | None:
    """The learning rate chosen at the nearest swept depth, if this depth is not swept and that
    sweep has finished; None means: sweep here."""
    swept = profile.lr_sweep_depths
    if swept is None or group.depth in swept:
        return None
    nearest = min(swept, key=lambda d: (abs(d - group.depth), d))
    source = Group(group.task, group.method, nearest, group.width)
    cells = [source.cells(profile, lr, profile.seeds[0]) for lr in profile.lrs]
    if not all(c.key() in done for c in cells):
        return None
    val = {c.lr: done[c.key()]["val_accuracy"] for c in cells}
    return max(profile.lrs, key=lambda lr: (val[lr], -lr))


def _run(cell: Cell, done: dict, path: Path, group: Group, profile: Profile) -> dict:
    if cell.key() in done:
        return done[cell.key()]
    record = train_cell(cell)
    record.update(method=group.method, depth=group.depth, width=group.width,
                  task=profile.tasks[group.task].name, profile=profile.name,
                  keys_per_query=mean_keys(cell.method, cell.attention, cell.task.seq_len))
    _append(path, record)
    done[cell.key()] = record
    return record


def _bar(total: int, enabled: bool, desc: str):
    from ...progress import tqdm  # (silenced by sattn --no-progress too)

    return tqdm(total=total, disable=not enabled, desc=desc, unit="cell")


def with_overrides(profile: Profile, **changes) -> Profile:
    """A profile with some fields replaced (None values are ignored)."""
    return replace(profile, **{k: v for k, v in changes.items() if v is not None})


def select_tasks(profile: Profile, names: tuple[str, ...] | None) -> Profile:
    """The profile restricted to the tasks with these names (None: all)."""
    if not names:
        return profile
    known = [t.name for t in profile.tasks]
    bad = set(names) - set(known)
    if bad:
        raise ValueError(f"--tasks: unknown {sorted(bad)}; profile {profile.name} has {known}")
    return replace(profile, tasks=tuple(t for t in profile.tasks if t.name in names))


__all__ = ["PROFILES", "Group", "Profile", "groups", "load_records", "parse_shard", "run_shard",
           "select_tasks", "shard_groups", "with_overrides"]
