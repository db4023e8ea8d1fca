"""The one-byte codes of projected gradients (spec oracle 16): sizes, stated error bounds, clipping, zero and
non-finite values."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from optim.zo.codec import CODECS, get_codec


def _log_uniform(codec, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  magnitude = np.exp(rng.uniform(math.log(codec.low), math.log(codec.high), n))
  return (magnitude * rng.choice([-1.0, 1.0], n)).astype(np.float32)


@pytest.mark.parametrize("name,num_bytes,bound", [("log8", 1, math.expm1(1 / 16)), ("job9", 2, math.expm1(1 / 32)),
                                                  ("f32", 4, 0.0)])
def test_round_trip_within_the_stated_bound(name, num_bytes, bound):
  codec = get_codec(name)
  assert codec.num_bytes == num_bytes and codec.relative_error == pytest.approx(bound)
  low, high = (codec.low, codec.high) if name != "f32" else (1e-30, 1e30)
  rng = np.random.default_rng(0)
  g = (np.exp(rng.uniform(math.log(low), math.log(high), 20000)) * rng.choice([-1.0, 1.0], 20000)).astype(np.float32)
  codes = codec.encode(jnp.asarray(g))
  assert codes.dtype == jnp.uint8 and codes.shape == (g.size, num_bytes)
  decoded, bad = codec.decode(codes)
  relative = np.abs(np.asarray(decoded) - g) / np.abs(g)
  print(f"{name}: max relative error {relative.max():.5f}, bound {bound:.5f}")
  assert not np.any(np.asarray(bad))
  assert np.all(np.sign(np.asarray(decoded)) == np.sign(g))
  assert relative.max() <= bound * (1 + 1e-5) + 1e-7
  if name != "f32":  # the bound is tight: some value comes within 10% of it
    assert relative.max() > 0.9 * bound


@pytest.mark.parametrize("name", ["log8", "job9"])
def test_magnitudes_outside_the_range_clip_to_its_ends(name):
  codec = get_codec(name)
  g = jnp.asarray([codec.high * 50, -codec.high * 50, codec.low / 50, -codec.low / 50], jnp.float32)
  decoded, bad = codec.decode(codec.encode(g))
  ends = np.array([codec.high, -codec.high, codec.low, -codec.low])
  np.testing.assert_allclose(np.asarray(decoded), ends, rtol=1e-6)
  assert not np.any(np.asarray(bad))


@pytest.mark.parametrize("name", list(CODECS))
def test_zero_is_exact_and_non_finite_values_decode_to_zero_and_are_counted(name):
  codec = get_codec(name)
  g = jnp.asarray([0.0, -0.0, np.nan, np.inf, -np.inf, 1.5], jnp.float32)
  decoded, bad = codec.decode(codec.encode(g))
  np.testing.assert_array_equal(np.asarray(decoded)[:5], np.zeros(5))
  np.testing.assert_array_equal(np.asarray(bad), [False, False, True, True, True, False])
  assert abs(float(decoded[5]) - 1.5) <= 1.5 * codec.relative_error * (1 + 1e-5)


def test_log8_uses_every_byte_and_decodes_each_to_one_value():
  codec = get_codec("log8")
  every = jnp.arange(256, dtype=jnp.uint8)[:, None]
  decoded, bad = codec.decode(every)
  decoded = np.asarray(decoded)
  assert np.asarray(bad).sum() == 1 and bool(bad[0x80])
  assert len(set(decoded[(np.arange(256) != 0x80)].tolist())) == 255  # 0x00 = 0, 127 positive, 127 negative
  # Re-encoding a decoded value gives its byte back (the table and the encoder agree), except the marker.
  again = np.asarray(codec.encode(jnp.asarray(decoded)))[:, 0]
  keep = np.arange(256) != 0x80
  np.testing.assert_array_equal(again[keep], np.arange(256)[keep])


def test_unknown_codec_is_refused_with_the_choices():
  with pytest.raises(ValueError, match="log8, job9, f32"):
    get_codec("int4")
