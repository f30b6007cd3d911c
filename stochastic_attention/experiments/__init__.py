"""Experiments: training, evaluation and analysis runs behind the ``sattn`` subcommands."""
