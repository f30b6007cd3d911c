"""The trained long-range benchmark: synthetic tasks, small models per attention method, sweeps, loss by position."""
