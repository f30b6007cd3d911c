"""Receptive-field and routing analysis of attention patterns (graphs, coverage, small world)."""
