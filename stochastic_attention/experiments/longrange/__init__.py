"""The trained long-range benchmark: synthetic tasks, small models per attention kind, sweeps, loss by position."""
