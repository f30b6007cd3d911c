"""What every ``sattn`` subcommand shares: option types, the options several subcommands
have (``--out``, ``--no-progress``, ``--threads``, ``--device``, ...), the user-error type,
memory checks and the record of a run.

One syntax for list options: comma-separated (``--seeds 0,1,2``). Types raise
``argparse.ArgumentTypeError``, so argparse prints ``sattn CMD: error: ...`` and exits with 2.
Errors found later (a missing file, a size the machine cannot hold) raise :class:`UsageError`,
which ``sattn`` reports the same way, without a traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable


class UsageError(ValueError):
    """A mistake in the user's input (option, config, file): reported in one line, exit code 2."""


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _list_of(convert: Callable[[str], object], what: str, *, allow_empty: bool = False):
    def parse(text: str) -> list:
        items = _items(text)
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, "
                                             f"got {text!r}")
        try:
            return [convert(item) for item in items]
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, "
                                             f"got {text!r} ({err})") from None

    parse.__name__ = f"list of {what}"  # argparse names the type in its messages
    return parse


def _bounded_int(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


positive_int = _bounded_int(1, "an integer >= 1")
nonneg_int = _bounded_int(0, "an integer >= 0")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer option with a lower bound, e.g. ``int_at_least(2)`` for sequence lengths."""
    return _bounded_int(minimum, f"an integer >= {minimum}")


def zero_or_length(text: str) -> int:
    """A sequence length (>= 2), or 0 meaning "skip this part"."""
    value = nonneg_int(text)
    if value == 1:
        raise argparse.ArgumentTypeError("expected 0 (skip) or a length >= 2, got 1")
    return value


zero_or_length.__name__ = "0 or a length >= 2"

int_list = _list_of(int, "integers")
length_list = _list_of(int_at_least(2), "lengths >= 2")
positive_int_list = _list_of(positive_int, "integers >= 1")
nonneg_int_list = _list_of(nonneg_int, "integers >= 0")
float_list = _list_of(float, "numbers")
str_list = _list_of(str, "names")


def optional_list(parse: Callable[[str], list]) -> Callable[[str], list]:
    """Like ``parse``, but an empty string means an empty list (``--sweep-seq-lens ''``: skip)."""
    def wrapped(text: str) -> list:
        return parse(text) if text.strip() else []

    wrapped.__name__ = parse.__name__
    return wrapped


def choice_list(choices) -> Callable[[str], list[str]]:
    """A comma-separated list whose items must come from ``choices``."""
    def parse(text: str) -> list[str]:
        items = str_list(text)
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from "
                                             f"{','.join(choices)}")
        return items

    parse.__name__ = "list of names"
    return parse


# Options several subcommands have: one definition each, so they keep meaning the same.
# The help texts are parameters where a subcommand says more about its own use.

SHARED_CPU_THREADS_HELP = "torch threads (1 is fastest on a CPU shared with other jobs; 0: default)"
DTYPES = ("float32", "bfloat16", "float16")


def add_out(parser: argparse.ArgumentParser, default, help: str = "output folder",
            **kwargs) -> None:
    """``--out``: the folder a subcommand writes into (``kwargs``: e.g. ``type=Path``)."""
    parser.add_argument("--out", default=default, help=help, **kwargs)


def add_no_progress(parser: argparse.ArgumentParser, help: str = "no progress bars") -> None:
    """``--no-progress``: ``sattn`` silences every progress bar of the run."""
    parser.add_argument("--no-progress", action="store_true", help=help)


def add_threads(parser: argparse.ArgumentParser, *, default: int | None = 1,
                type: Callable[[str], int] = nonneg_int,
                help: str = SHARED_CPU_THREADS_HELP) -> None:
    """``--threads``: torch's CPU threads, applied with :func:`set_threads`."""
    parser.add_argument("--threads", type=type, default=default, help=help)


def set_threads(threads: int | None) -> None:
    """Apply ``--threads``: a positive count sets torch's CPU threads; 0 or None keeps its own."""
    if threads and threads > 0:
        import torch

        torch.set_num_threads(threads)


def add_seed(parser: argparse.ArgumentParser, help: str) -> None:
    """``--seed`` (an integer, default 0)."""
    parser.add_argument("--seed", type=int, default=0, help=help)


def add_window(parser: argparse.ArgumentParser, default: int, help: str = "attention window",
               type: Callable[[str], int] = positive_int) -> None:
    """``--window``: keys per query (``type`` sets the smallest allowed)."""
    parser.add_argument("--window", type=type, default=default, help=help)


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable): config overrides, collected in ``overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help=help)


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device`` (a GPU when there is one) and ``--dtype`` of the timing subcommands."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="float32 / bfloat16 / float16 (default fp32 on CPU, bf16 on GPU)")


def check_device(device: str) -> None:
    """UsageError unless ``device`` is cpu or an available cuda device."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")


def resolve_dtype(device: str, dtype: str | None) -> str:
    """``--dtype``, or its default on ``device``: float32 on the CPU, bfloat16 on a GPU."""
    return dtype or ("float32" if device == "cpu" else "bfloat16")


def run_meta(args: argparse.Namespace, started: float, *, model: str | None) -> dict:
    """What a results file records about its run: the model, every option, the date, the
    machine and the seconds since ``started`` (a ``time.time()``)."""
    import datetime
    import platform
    import time

    import torch

    return dict(
        model=model, command=vars(args) | {"func": None},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {torch.get_num_threads()} threads, no GPU"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        seconds=round(time.time() - started, 1))


def method_list(methods, renamed=None, what: str = "method") -> Callable[[str], list[str]]:
    """A comma-separated list of method names from ``methods``; an old name (``swa``, ``sa``
    ...) is an error that names the new one (``renamed`` extends the package's table)."""
    from .vocabulary import RENAMED_METHODS, check_name

    table = {**RENAMED_METHODS, **(renamed or {})}

    def parse(text: str) -> list[str]:
        items = str_list(text)
        try:
            for item in items:
                check_name(item, methods, what=what, renamed=table)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return items

    parse.__name__ = f"list of {what}s"
    return parse


def renamed_option(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Make the former option ``old`` an error that names ``new`` (not "unrecognized")."""
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{old} was renamed {new}")

    parser.add_argument(old, action=Renamed, nargs="?", help=argparse.SUPPRESS,
                        dest=f"renamed_{old.lstrip('-').replace('-', '_')}")


def ensure_folder(path: str | os.PathLike, option: str = "--out"):
    """Create the output folder ``path`` (UsageError if a file is in the way)."""
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; {option} names a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (None when the platform cannot say)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(need_bytes: float, what: str, fix: str, *, device: str = "cpu") -> None:
    """Raise UsageError if ``what`` would need more memory than ``device`` has available."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        available = free
    else:
        available = available_memory()
    if available is not None and need_bytes > available:
        raise UsageError(f"{what} needs about {need_bytes / 2**30:.1f} GiB but only "
                         f"{available / 2**30:.1f} GiB is available; {fix}")
