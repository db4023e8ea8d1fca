"""Gumbel MuZero for the mallocGame: policy/value network, search over the true game, self-play and replay."""
