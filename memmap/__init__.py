"""memmap: the mallocGame — mapping a compiled program's buffers into a limited fast memory.

Wang et al., "Optimizing Memory Mapping Using Deep Reinforcement Learning" (arXiv 2305.07440). Modules:
``instance`` (buffers, validator), ``io_minimalloc`` (MiniMalloc CSVs), ``xla_extract`` (buffers of XLA-compiled JAX
programs), ``cost_model``, ``env`` (the jittable game), ``baselines`` (greedy heuristics, CP-SAT, exhaustive),
``agent`` (Gumbel MuZero with mctx, and ``agent.anytime``, the default network-free search), ``baselines.exact``
(MiniMalloc's exact search, numba-compiled), ``baselines.omni`` (omnimalloc's allocators), ``solvers`` and ``cli``
(``python -m memmap``).
"""
