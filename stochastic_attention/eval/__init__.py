"""Training-free evaluation of attention methods on released models (``sattn eval``)."""

from .methods import MethodSpec, mean_keys, parse_method, parse_methods
from .sweep import aggregate, run_sweep, time_prefill
from .tasks import TASKS, Task

__all__ = ["TASKS", "MethodSpec", "Task", "aggregate", "mean_keys", "parse_method",
           "parse_methods", "run_sweep", "time_prefill"]
