"""Attention kernels: FuseMax einsum cascades (reference), blockwise XLA, Pallas GPU block-sparse; see api.py."""
