"""Baselines for the mallocGame: greedy first-fit / best-fit heuristics and an exact CP-SAT model."""
