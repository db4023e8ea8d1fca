"""Configuration of the decoder-only language model assembled by :mod:`research.models.transformer`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a decoder-only LM; ``layers`` names one registered mixer per block (see ``registry``).

  Attributes:
    vocab_size: number of token ids (256 for byte-level language modelling).
    layers: mixer name of each block, e.g. ``("attn", "attn")`` or ``("mom", "attn", "mom")``.
    d_model: residual stream width D.
    num_heads: query heads H.
    num_kv_heads: key/value heads (H for multi-head, fewer for grouped-query attention); must divide H.
    head_dim: per-head width; ``None`` means ``d_model // num_heads``.
    mlp_hidden: SwiGLU hidden width; ``None`` means 8/3·D rounded up to a multiple of 64.
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: share the input embedding with the output head.
    dtype: compute dtype name (``"float32"`` or ``"bfloat16"``); parameters are always float32.
    aux_loss_weight: weight of every auxiliary loss a mixer returns (e.g. MoM load balancing).
    attn_sink, attn_window: sparse attention layers (``swa``, ``sink_window``, ``longgen``): attention-sink
      tokens and sliding window (current token included); ``swa`` ignores the sink.
    attn_block, attn_local_blocks, attn_stride: LongGen's block pattern (``block_sparse``, ``longgen_block``):
      block size, local blocks and stride of the strided blocks.
    attn_implementation: attention kernel of the sparse layers (``layers.kernels.attention.api``); None picks
      the fastest available.
    longgen_full_fraction: fraction of layers, centred in the stack, that ``longgen*`` layers make full attention.
    mom_num_memories, mom_top_k, mom_shared_memory: MoM routing (memories M, memories per token k, and a shared
      memory that sees every token).
    mom_dispatch: how MoM runs its memories (``layers.mom``): ``packed`` (default; less memory, faster at
      training batch sizes) or ``sorted`` (faster with very few sequences, e.g. b = 1 at long T).
    gdn_expand_v, gdn_conv_size: Gated DeltaNet / MoM memories: value width per head = head_dim · expand_v, and
      the short-convolution window.
    linear_chunk_size, linear_attention_impl: chunk length and kernel (``layers.kernels.gated_delta``; None
      picks the fastest available) of the gated delta rule.
  """

  vocab_size: int = 256
  layers: tuple[str, ...] = ("attn", "attn")
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int | None = None
  mlp_hidden: int | None = None
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  aux_loss_weight: float = 0.01
  attn_sink: int = 64
  attn_window: int = 8192
  attn_block: int = 64
  attn_local_blocks: int = 16
  attn_stride: int = 8
  attn_implementation: str | None = None
  longgen_full_fraction: float = 1 / 3
  mom_num_memories: int = 4
  mom_top_k: int = 2
  mom_shared_memory: bool = True
  mom_dispatch: str = "packed"
  gdn_expand_v: int = 1
  gdn_conv_size: int = 4
  linear_chunk_size: int = 64
  linear_attention_impl: str | None = None

  def __post_init__(self):
    problems = []
    if self.vocab_size < 2:
      problems.append(f"vocab_size must be >= 2 (got {self.vocab_size})")
    if not self.layers:
      problems.append("layers must name at least one layer")
    for name in ("d_model", "num_heads", "num_kv_heads"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be a positive integer (got {getattr(self, name)})")
    if self.num_heads >= 1 and self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
      problems.append(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
    if self.head_dim is None and self.num_heads >= 1 and self.d_model % self.num_heads:
      problems.append(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) "
                      "unless head_dim is given")
    if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
      problems.append(f"head_dim must be a positive even integer for RoPE (got {self.head_dim})")
    if not 0.0 <= self.longgen_full_fraction <= 1.0:
      problems.append(f"longgen_full_fraction must be in [0, 1] (got {self.longgen_full_fraction})")
    if self.dtype not in DTYPES:
      problems.append(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
    if self.mom_dispatch not in ("packed", "sorted"):
      problems.append(f"mom_dispatch must be packed or sorted (got {self.mom_dispatch!r})")
    if problems:
      raise ValueError("; ".join(problems))

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_mlp_hidden(self) -> int:
    return self.mlp_hidden if self.mlp_hidden is not None else -(-8 * self.d_model // 3 // 64) * 64

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]
