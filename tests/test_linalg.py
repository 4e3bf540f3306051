"""Tests for optax_memopt.linalg: randomized SVD against the exact SVD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_memopt.linalg import randomized_range_finder, randomized_svd
from tests._checks import batched_lapack_calls


def _matrix_with_spectrum(seed, m, n, s):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
  v, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
  return jnp.asarray((u * s) @ v.T, jnp.float32)


def _rank_r_error(a, u, s, vt):
  return float(jnp.linalg.norm(a - (u * s[..., None, :]) @ vt))


@pytest.mark.parametrize("shape", [(64, 48), (40, 72)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_within_ten_percent_of_optimal_on_decaying_spectrum(shape, seed):
  # Spectrum s_i = 0.8^i. Halko et al. (Thm 10.5) bound the expected range error without power
  # iterations by sqrt(1 + r/(p-1)) = 1.53 times the optimal tail for r = p = 8; one power
  # iteration replaces s_i by s_i^3 in that bound (Cor. 10.10), which for this decay makes the
  # gap to optimal a few percent. We demand <= 1.1x optimal (eps = 0.1) for every seed.
  m, n = shape
  s = 0.8 ** np.arange(min(m, n))
  a = _matrix_with_spectrum(seed, m, n, s)
  rank = 8
  u, sv, vt = randomized_svd(jax.random.key(seed), a, rank)
  assert u.shape == (m, rank) and sv.shape == (rank,) and vt.shape == (rank, n)
  optimal = float(np.sqrt(np.sum(s[rank:] ** 2)))
  assert _rank_r_error(a, u, sv, vt) <= 1.1 * optimal
  np.testing.assert_allclose(sv, s[:rank], rtol=2e-2)
  np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-5)
  np.testing.assert_allclose(vt @ vt.T, np.eye(rank), atol=1e-5)


def test_power_iterations_help():
  s = 0.9 ** np.arange(60)
  a = _matrix_with_spectrum(3, 80, 60, s)
  errs = [
      np.mean([_rank_r_error(a, *randomized_svd(jax.random.key(k), a, 6, oversample=2,
                                                power_iters=q)) for k in range(4)])
      for q in (0, 2)
  ]
  assert errs[1] < errs[0]


def test_exact_on_low_rank_matrix():
  a = _matrix_with_spectrum(4, 30, 20, np.array([3.0, 2.0, 1.0]))
  u, s, vt = randomized_svd(jax.random.key(0), a, 3, power_iters=0)
  np.testing.assert_allclose((u * s) @ vt, a, atol=1e-5)
  np.testing.assert_allclose(s, [3.0, 2.0, 1.0], rtol=1e-5)


def test_batched_matches_each_slice():
  spectra = [0.5 ** np.arange(20), 0.7 ** np.arange(20), 0.3 ** np.arange(20)]
  a = jnp.stack([_matrix_with_spectrum(i, 30, 20, s) for i, s in enumerate(spectra)])
  u, s, vt = randomized_svd(jax.random.key(0), a, 4)
  assert u.shape == (3, 30, 4) and s.shape == (3, 4) and vt.shape == (3, 4, 20)
  for i, spec in enumerate(spectra):
    np.testing.assert_allclose(s[i], spec[:4], rtol=1e-3)
    optimal = np.sqrt(np.sum(spec[4:] ** 2))
    assert _rank_r_error(a[i], u[i], s[i], vt[i]) <= 1.01 * optimal


def test_bf16_input_gives_float32_factors():
  a = _matrix_with_spectrum(5, 32, 24, 0.5 ** np.arange(24))
  u, s, vt = randomized_svd(jax.random.key(0), a.astype(jnp.bfloat16), 4)
  assert u.dtype == s.dtype == vt.dtype == jnp.float32
  np.testing.assert_allclose(s, 0.5 ** np.arange(4), rtol=2e-2)


def test_jittable_with_static_rank():
  a = _matrix_with_spectrum(6, 16, 12, 0.5 ** np.arange(12))
  f = jax.jit(randomized_svd, static_argnames=("rank", "oversample", "power_iters"))
  u, s, vt = f(jax.random.key(0), a, rank=3)
  np.testing.assert_allclose(s, 0.5 ** np.arange(3), rtol=1e-3)


def test_range_finder_orthonormal_and_captures_range():
  a = _matrix_with_spectrum(7, 25, 15, np.array([4.0, 1.0]))
  q = randomized_range_finder(jax.random.key(1), a, 2)
  assert q.shape == (25, 2) and q.dtype == jnp.float32
  np.testing.assert_allclose(q.T @ q, np.eye(2), atol=1e-5)
  np.testing.assert_allclose(q @ (q.T @ a), a, atol=1e-5)


@pytest.mark.parametrize(
    "shape, rank, match",
    [((5,), 1, "at least 2 dimensions"), ((6, 4), 0, "rank must be >= 1"), ((6, 4), 5, "<= min")],
)
def test_errors(shape, rank, match):
  with pytest.raises(ValueError, match=match):
    randomized_svd(jax.random.key(0), jnp.ones(shape), rank)


def test_one_key_per_matrix_gives_each_matrix_its_own_sketch():
  # A batch of keys: matrix b's factorisation is the one it gets alone with key b (what lets a
  # stacked leaf and its layers, updated one at a time, draw the same sketches).
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(3))
  a = jax.random.normal(jax.random.key(1), (3, 20, 12))
  u, s, vt = randomized_svd(keys, a, 4)
  for b in range(3):
    ub, sb, vtb = randomized_svd(keys[b], a[b], 4)
    # Batched against unbatched matrix products: float32 rounding only.
    np.testing.assert_allclose(s[b], sb, rtol=1e-5)
    np.testing.assert_allclose(np.abs(u[b].T @ ub), np.eye(4), atol=1e-4)
  with pytest.raises(ValueError, match="batch shape"):
    randomized_svd(keys[:2], a, 4)


def test_legacy_uint32_keys_work_like_typed_keys():
  # jax.random.PRNGKey (uint32 data) is still what most code passes: one key, or one per matrix.
  a = _matrix_with_spectrum(8, 20, 12, 0.6 ** np.arange(12))
  for typed, legacy in [(jax.random.key(3), jax.random.PRNGKey(3))]:
    for got, want in zip(randomized_svd(legacy, a, 3), randomized_svd(typed, a, 3)):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(randomized_range_finder(legacy, a, 3),
                                  randomized_range_finder(typed, a, 3))
  stack = jnp.stack([a, 2 * a])
  typed = jax.random.split(jax.random.key(4), 2)
  legacy = jax.random.split(jax.random.PRNGKey(4), 2)
  for got, want in zip(randomized_svd(legacy, stack, 3), randomized_svd(typed, stack, 3)):
    np.testing.assert_array_equal(got, want)
  jitted = jax.jit(randomized_svd, static_argnames="rank")
  np.testing.assert_array_equal(jitted(jax.random.PRNGKey(3), a, rank=3)[1],
                                jitted(jax.random.key(3), a, rank=3)[1])
  with pytest.raises(TypeError, match="jax.random key"):
    randomized_svd(jnp.zeros(2, jnp.float32), a, 3)


def test_cpu_factorises_a_batch_one_matrix_at_a_time_with_the_batched_bits():
  # jaxlib's batched CPU LAPACK kernels deadlock the devices of a CPU mesh (see
  # tests/_checks.batched_lapack_calls): on a CPU the QRs and eighs of a batch run per matrix, and
  # each matrix gets the bits the batched kernel gives it (the same LAPACK routine on the same data).
  from optax_memopt import linalg

  a = jax.random.normal(jax.random.key(0), (2, 3, 40, 12))
  gram = jnp.swapaxes(a, -1, -2) @ a
  for fn, x in [(lambda y: jnp.linalg.qr(y, mode="reduced"), a), (jnp.linalg.eigh, gram)]:
    for got, want in zip(jax.jit(lambda y, fn=fn: linalg._one_matrix_at_a_time(fn, y))(x),
                         jax.jit(fn)(x), strict=True):
      np.testing.assert_array_equal(got, want)
  if jax.default_backend() == "cpu":
    hlo = jax.jit(randomized_svd, static_argnames="rank").lower(
        jax.random.key(0), a, rank=4).compile().as_text()
    assert "lapack_" in hlo
    assert not batched_lapack_calls(hlo)
