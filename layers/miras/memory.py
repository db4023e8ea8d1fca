"""Miras axis 1, the memory architecture: the function M(W; x) whose fast weights W are learned at test time.

"It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online
Optimization" (Behrouz et al., arXiv 2504.13173, §4 and §5.3):

  * :class:`LinearMemory`: M(W; x) = W x, W ∈ R^{d×d} (linear attention, DeltaNet, GDN, ...);
  * :class:`MLPMemory`: the memory of Moneta, Yaad and Memora, M(W; x) = x + LN(W1 σ(W2 x)), W2 ∈ R^{E×d},
    W1 ∈ R^{d×E}, E = expansion·d, σ = GELU (exact, erf), LayerNorm with *slow* (outer) affine parameters
    (spec §9, FLA #185), so the fast state is W1, W2 only (8·d² scalars per head at expansion 4).

Weights use the paper's convention (read W x, write e aᵀ). A memory is a sequence of fast layers; each layer maps
an input activation a to W a. Rows of ``x`` are tokens: x [c, d] -> y [c, d]. Every layer's matrix-vector product
goes through ``matvec(name, w, a)`` (default: a @ wᵀ, in float32 or, with ``matmul="bfloat16"``, with bfloat16
operands and float32 accumulation), so the chunked kernel can evaluate the same function with
per-token weights W_t by passing its dual-form product instead (layers.kernels.miras.chunked).

``backprop`` returns, for one forward, each layer's per-token input activations a_i and error signals e_i
(∂ℓ_i/∂(W a_i)), so that the per-token inner gradient is ∇_W ℓ_i = e_i a_iᵀ (closed form; tests compare it with
``jax.grad`` of the per-token loss).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Matvec = Callable[[str, jax.Array, jax.Array], jax.Array]
MATMULS = ("float32", "bfloat16")


def matmul(spec: str, a: jax.Array, b: jax.Array, mode: str = "float32") -> jax.Array:
  """einsum in float32 (``mode="float32"``, full precision) or with bfloat16 operands and float32 accumulation
  (``mode="bfloat16"``; its derivatives are bfloat16 matmuls too, see :func:`_bf16_einsum`)."""
  if mode == "bfloat16":
    return _bf16_einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
  return plain_matmul(spec, a, b, mode)


def plain_matmul(spec: str, a: jax.Array, b: jax.Array, mode: str = "float32") -> jax.Array:
  """:func:`matmul`'s product without its custom vjp (for kernels that cannot lower one, e.g. Pallas on Triton)."""
  if mode == "bfloat16":
    return _bf16(spec, a, b)
  return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def _bf16(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """float32 a, b -> einsum with bfloat16 operands, float32 result. Its vjp rounds the float32 cotangent to
  bfloat16 as well, so both derivative products are bfloat16 × bfloat16 (tensor cores) instead of the mixed
  float32 × bfloat16 products autodiff would form."""
  return _bf16(spec, a, b)


def _bf16_einsum_fwd(spec, a, b):
  return _bf16(spec, a, b), (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))


def _bf16_einsum_bwd(spec, residuals, g):
  a, b = residuals
  operands, out = spec.split("->")
  sa, sb = operands.split(",")
  for mine, other in ((sa, sb), (sb, sa)):  # each derivative is one einsum: it cannot re-create a summed-out index
    if lonely := set(mine.replace("...", "")) - set(other) - set(out):
      raise ValueError(f"bfloat16 matmul {spec!r}: index {sorted(lonely)} appears in one operand only")
  return _bf16(f"{out},{sb}->{sa}", g, b), _bf16(f"{out},{sa}->{sb}", g, a)


_bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def plain_matvec(name: str, w: jax.Array, a: jax.Array, mode: str = "float32") -> jax.Array:
  """W a for every row of a: a [..., in], w [out, in] -> [..., out]."""
  del name
  return matmul("...i,oi->...o", a, w, mode)


# The constants multiply rather than divide: a kernel's division by a constant is a whole IEEE division a value
# (Mosaic GPU emits div.rn.f32), where XLA would rewrite it as a product anyway.
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_pdf(z: jax.Array) -> jax.Array:
  """φ(z), the standard normal density."""
  return jnp.exp(-0.5 * z * z) * _INV_SQRT_2PI


def gelu(z: jax.Array, erf=jax.lax.erf) -> jax.Array:
  """Exact GELU z·Φ(z) (``erf``: the error function; kernels that cannot lower ``lax.erf`` pass their own)."""
  return 0.5 * z * (1.0 + erf(z * _SQRT_HALF))


def gelu_grad(z: jax.Array, erf=jax.lax.erf) -> jax.Array:
  """dGELU/dz = Φ(z) + z·φ(z) (``erf`` as for :func:`gelu`)."""
  return 0.5 * (1.0 + erf(z * _SQRT_HALF)) + z * normal_pdf(z)


def gelu_grad2(z: jax.Array) -> jax.Array:
  """d²GELU/dz² = φ(z)·(2 − z²)."""
  return (2.0 - z * z) * normal_pdf(z)


def row_mean(x: jax.Array) -> jax.Array:
  """x's mean over the last axis, [..., 1]."""
  return jnp.mean(x, axis=-1, keepdims=True)


def broadcast_row_mean(x: jax.Array) -> jax.Array:
  """x's mean over the last axis broadcast back to x's shape with ``broadcast_in_dim``: the form Pallas' Mosaic GPU
  backend lowers (it takes no keepdims reduction and no [.., 1] operand) for :func:`layer_norm`'s ``mean``."""
  return jax.lax.broadcast_in_dim(jnp.mean(x, axis=-1), x.shape, tuple(range(x.ndim - 1)))


def layer_norm(u: jax.Array, ln: tuple[jax.Array, jax.Array], eps: float,
               mean=row_mean) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(LN(u)·γ + β, the normalised n, 1/σ) over the last axis; ln = (γ [d], β [d]); ``mean``: the row mean
  (:func:`row_mean`, or :func:`broadcast_row_mean` inside Mosaic GPU kernels, where 1/σ comes out [.., d])."""
  mu = mean(u)
  rstd = jax.lax.rsqrt(mean(jnp.square(u - mu)) + eps)
  n = (u - mu) * rstd
  return n * ln[0] + ln[1], n, rstd


def layer_norm_backward(g: jax.Array, n: jax.Array, rstd: jax.Array, gamma: jax.Array, mean=row_mean) -> jax.Array:
  """∂ℓ/∂u from ∂ℓ/∂(LN(u)·γ + β) = g, with n and 1/σ from :func:`layer_norm` (last axis; ``mean`` as there)."""
  g_n = g * gamma
  return rstd * (g_n - mean(g_n) - n * mean(g_n * n))


@dataclasses.dataclass(frozen=True)
class LinearMemory:
  """M(W; x) = W x with one fast weight ``w`` [d, d]; channel gates act on its input (key) axis, as in GLA."""

  matmul: str = "float32"
  gate_axes = {"w": "in"}

  def shapes(self, d: int) -> dict[str, tuple[int, int]]:
    return {"w": (d, d)}

  def apply(self, w: dict, x: jax.Array, ln=None, matvec: Matvec | None = None) -> jax.Array:
    """x [..., d] -> M(W; x) [..., d]."""
    del ln
    return (matvec or self.matvec)("w", w["w"], x)

  def matvec(self, name: str, w: jax.Array, a: jax.Array) -> jax.Array:
    return plain_matvec(name, w, a, self.matmul)

  def forward(self, w: dict, x: jax.Array, ln=None) -> tuple[jax.Array, tuple]:
    return self.apply(w, x), (x,)

  def backprop(self, w: dict, cache: tuple, g_y: jax.Array, ln=None) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{layer: (inputs a [c, in], errors e [c, out])} with ∇_W ℓ_i = e_i a_iᵀ; g_y = ∂ℓ_i/∂y_i [c, d]."""
    del w, ln
    return {"w": (cache[0], g_y)}


@dataclasses.dataclass(frozen=True)
class MLPMemory:
  """M(W; x) = x + LN(W1 gelu(W2 x)): W2 [E, d] (gates on its input axis d), W1 [d, E] (gates on its output
  axis d), E = expansion·d; LayerNorm affine (γ, β) are slow parameters passed as ``ln``."""

  expansion: int = 4
  ln_eps: float = 1e-5
  matmul: str = "float32"

  gate_axes = {"w2": "in", "w1": "out"}

  def shapes(self, d: int) -> dict[str, tuple[int, int]]:
    return {"w2": (self.expansion * d, d), "w1": (d, self.expansion * d)}

  def apply(self, w: dict, x: jax.Array, ln, matvec: Matvec | None = None) -> jax.Array:
    """x [..., d] -> x + LN(W1 gelu(W2 x)) [..., d]."""
    return self.forward(w, x, ln, matvec)[0]

  def matvec(self, name: str, w: jax.Array, a: jax.Array) -> jax.Array:
    return plain_matvec(name, w, a, self.matmul)

  def forward(self, w: dict, x: jax.Array, ln, matvec: Matvec | None = None) -> tuple[jax.Array, tuple]:
    """:meth:`apply` and what :meth:`backprop` needs: (y, (x, z = W2 x, h = gelu(z), n, 1/σ of LayerNorm))."""
    matvec = matvec or self.matvec
    z = matvec("w2", w["w2"], x)
    h = gelu(z)
    y, n, rstd = layer_norm(matvec("w1", w["w1"], h), ln, self.ln_eps)
    return x + y, (x, z, h, n, rstd)

  def backprop(self, w: dict, cache: tuple, g_y: jax.Array, ln) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Closed-form errors: e1 = ∂ℓ/∂u (LayerNorm backward), e2 = (e1 W1) ⊙ gelu'(z); ∇W1 = e1 hᵀ, ∇W2 = e2 xᵀ."""
    x, z, h, n, rstd = cache
    e1 = layer_norm_backward(g_y, n, rstd, ln[0])
    e2 = matmul("...o,oi->...i", e1, w["w1"], self.matmul) * gelu_grad(z)
    return {"w2": (x, e2), "w1": (h, e1)}


Memory = LinearMemory | MLPMemory
