"""Randomized linear algebra: a jittable, batched randomized range finder and truncated SVD.

Both functions run in float32 whatever the input dtype, accept any number of leading batch axes
(e.g. a stack of layers ``[L, m, n]``) and have static output shapes, so they can sit inside
``jax.jit``, ``jax.lax.cond`` and ``jax.lax.scan``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["randomized_range_finder", "randomized_svd"]


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _one_matrix_at_a_time(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
  """``fn(x)`` for a LAPACK-backed ``fn`` (QR, eigh) of a ``[..., m, n]`` batch; on a CPU it runs
  on one matrix at a time (``lax.map``), elsewhere on the whole batch.

  jaxlib's CPU LAPACK kernels (jax 0.10) split a batch whose work exceeds ~2e5 flops into chunks
  that they schedule on XLA's intra-op thread pool, then block that thread until the chunks are
  done. The simulated devices of a CPU mesh run on the same pool (as many threads as cores): once
  every pool thread is a device blocked in such a kernel (a sharded update of stacked layers,
  whose refreshes factorise ``[L, M, l]`` panels), no thread is left for the chunks and the step
  hangs. A kernel given one matrix never schedules anything. Each matrix is factorised by the
  same LAPACK routine either way, so the results are the same bits.
  """
  batch = x.shape[:-2]
  if math.prod(batch) <= 1:
    return fn(x)

  def per_matrix(x):
    out = jax.lax.map(fn, x.reshape((-1,) + x.shape[-2:]))
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)

  return jax.lax.platform_dependent(x, cpu=per_matrix, default=fn)


def _qr(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _one_matrix_at_a_time(lambda a: jnp.linalg.qr(a, mode="reduced"), y)


def _orthonormal_columns(y: jax.Array) -> jax.Array:
  q, _ = _qr(y)
  return q


def _check_matrix(a: jax.Array, what: str) -> None:
  if a.ndim < 2:
    raise ValueError(f"{what} needs an array with at least 2 dimensions, got shape {a.shape}.")


def _small_svd(b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SVD of a short-and-wide ``[..., k, n]`` (``k <= n``) from ``eigh`` and ``qr``, not LAPACK's SVD.

  jaxlib's CPU SVD kernels (gesdd and gesvd alike) wait on the intra-op thread pool that the devices
  of a CPU mesh run on, and deadlock when every device enters them at once (seen with 8 CPU devices,
  jax 0.10.2: the test suite hung in a sharded AdaRankGrad update). Its batched ``eigh`` and ``qr``
  kernels do the same on a large enough batch, so those run one matrix at a time on a CPU
  (:func:`_one_matrix_at_a_time`). The left vectors are the eigenvectors of ``b bᵀ`` (orthonormal
  by construction); ``bᵀ u = v s``, so a QR of ``bᵀ u`` gives the right vectors (orthonormal, even
  for zero singular values) and the singular values as the norms of its columns, without the
  squaring of the Gram matrix.
  """
  _, u = _one_matrix_at_a_time(jnp.linalg.eigh, b @ _mT(b))
  u = u[..., ::-1]  # descending
  v, r = _qr(_mT(b) @ u)
  d = jnp.diagonal(r, axis1=-2, axis2=-1)
  sign = jnp.where(d < 0, -1.0, 1.0).astype(b.dtype)
  s = jnp.abs(d)
  # eigh orders by the Gram's eigenvalues; the column norms can differ in the last bits.
  order = jnp.argsort(-s, axis=-1)
  s = jnp.take_along_axis(s, order, axis=-1)
  u = jnp.take_along_axis(u, order[..., None, :], axis=-1)
  v = jnp.take_along_axis(v * sign[..., None, :], order[..., None, :], axis=-1)
  return u, s, _mT(v)


def _typed_key(key) -> jax.Array:
  """``key`` as a typed key array: a legacy ``jax.random.PRNGKey`` (uint32 data, e.g. ``[2]`` or
  ``[..., 2]`` for threefry) is wrapped with the default implementation, so both kinds draw the
  same numbers."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype != jnp.uint32:
    raise TypeError(
        f"key must be a jax.random key (jax.random.key or the legacy jax.random.PRNGKey), got an "
        f"array of dtype {key.dtype} and shape {key.shape}.")
  try:
    return jax.random.wrap_key_data(key)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"key: a legacy uint32 key must have the default implementation's trailing key shape, got "
        f"shape {key.shape} ({e}).") from None


def _sketch(key: jax.Array, batch: tuple[int, ...], shape: tuple[int, int]) -> jax.Array:
  """Gaussian sketches ``batch + shape``: from one key, or from one key per batch member."""
  key = _typed_key(key)
  if jnp.ndim(key) == 0:
    return jax.random.normal(key, batch + shape, jnp.float32)
  if tuple(jnp.shape(key)) != tuple(batch):
    raise ValueError(
        f"key must be one key or an array of keys of the batch shape {batch}, got shape "
        f"{tuple(jnp.shape(key))}.")
  flat = jnp.reshape(key, (-1,))
  omega = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(flat)
  return omega.reshape(batch + shape)


def randomized_range_finder(
    key: jax.Array, a: jax.Array, size: int, *, power_iters: int = 1
) -> jax.Array:
  r"""Orthonormal basis of (approximately) the dominant ``size``-dimensional range of ``a``.

  Halko, Martinsson and Tropp's Algorithm 4.4: draw a Gaussian sketch
  :math:`\Omega \in \mathbb{R}^{n \times \ell}`, form :math:`Y = A\Omega`, and refine it with
  ``power_iters`` subspace iterations :math:`Y \leftarrow A (A^\top Q)`, re-orthonormalising with a
  QR factorisation after every product so that small singular directions are not lost to rounding.

  Args:
    key: A ``jax.random`` key (typed, or a legacy ``jax.random.PRNGKey``), or an array of keys with
      ``a``'s batch shape (one sketch per matrix: matrix ``b``'s sketch is then the same whether it
      is computed alone or in a batch).
    a: Array of shape ``[..., m, n]``; leading axes are batch axes. Any float dtype.
    size: Number of basis vectors ``ell``, ``1 <= size <= min(m, n)``.
    power_iters: Number of power (subspace) iterations; each costs two products with ``a``.

  Returns:
    ``q`` of shape ``[..., m, size]``, float32, with orthonormal columns.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optax_memopt.linalg import randomized_range_finder
    >>> a = jnp.outer(jnp.arange(1.0, 7.0), jnp.arange(1.0, 5.0))  # rank one
    >>> q = randomized_range_finder(jax.random.key(0), a, 1)
    >>> print(q.shape, bool(jnp.allclose(q @ (q.T @ a), a, atol=1e-4)))
    (6, 1) True

  References:
    Halko, Martinsson, Tropp, `Finding structure with randomness: Probabilistic algorithms for
    constructing approximate matrix decompositions <https://arxiv.org/abs/0909.4061>`_, 2011.
  """
  _check_matrix(a, "randomized_range_finder")
  m, n = a.shape[-2:]
  if not 1 <= size <= min(m, n):
    raise ValueError(f"size must be in [1, min(m, n)] = [1, {min(m, n)}], got {size}.")
  if power_iters < 0:
    raise ValueError(f"power_iters must be >= 0, got {power_iters}.")
  a = a.astype(jnp.float32)
  omega = _sketch(key, a.shape[:-2], (n, size))
  q = _orthonormal_columns(a @ omega)
  for _ in range(power_iters):
    z = _orthonormal_columns(_mT(a) @ q)
    q = _orthonormal_columns(a @ z)
  return q


def randomized_svd(
    key: jax.Array,
    a: jax.Array,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Truncated SVD :math:`A \approx U \operatorname{diag}(s) V^\top` by a randomized range finder.

  With :math:`\ell = \min(\text{rank} + \text{oversample}, m, n)`, find an orthonormal
  :math:`Q \in \mathbb{R}^{m\times\ell}` spanning the dominant range of :math:`A`
  (:func:`randomized_range_finder`), take the small exact SVD
  :math:`Q^\top A = \tilde U \operatorname{diag}(s) V^\top` and return :math:`U = Q \tilde U`,
  all truncated to ``rank``. The cost is :math:`O(mn\ell\,(1 + 2\,\text{power\_iters}))` instead of
  the :math:`O(mn\min(m,n))` of a full SVD. The expected error is within a small factor of the
  optimal rank-``rank`` error, and tends to it quickly as ``power_iters`` grows when the spectrum
  decays (Halko et al., Theorem 10.6 and Corollary 10.10).

  Args:
    key: A ``jax.random`` key (typed, or a legacy ``jax.random.PRNGKey``), or an array of keys with
      ``a``'s batch shape (one per matrix).
    a: Array of shape ``[..., m, n]``; leading axes are batch axes. Any float dtype (bf16 is
      computed in float32).
    rank: Number of singular triplets to return, ``1 <= rank <= min(m, n)``.
    oversample: Extra sketch columns beyond ``rank`` (clipped so the sketch has at most
      ``min(m, n)`` columns).
    power_iters: Number of power iterations.

  Returns:
    ``(u, s, vt)`` in float32 with shapes ``[..., m, rank]``, ``[..., rank]`` (descending,
    non-negative) and ``[..., rank, n]``.

  Raises:
    ValueError: if ``a.ndim < 2``, ``rank < 1`` or ``rank > min(m, n)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optax_memopt.linalg import randomized_svd
    >>> a = jnp.diag(jnp.array([5.0, 3.0, 1.0, 0.0]))
    >>> u, s, vt = randomized_svd(jax.random.key(0), a, 2, oversample=2)
    >>> print(u.shape, s.shape, vt.shape, jnp.round(s, 4))
    (4, 2) (2,) (2, 4) [5. 3.]

  References:
    Halko, Martinsson, Tropp, `Finding structure with randomness: Probabilistic algorithms for
    constructing approximate matrix decompositions <https://arxiv.org/abs/0909.4061>`_, 2011.
  """
  _check_matrix(a, "randomized_svd")
  m, n = a.shape[-2:]
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}.")
  if rank > min(m, n):
    raise ValueError(f"rank must be <= min(m, n) = {min(m, n)} for shape {a.shape}, got {rank}.")
  if oversample < 0:
    raise ValueError(f"oversample must be >= 0, got {oversample}.")
  a = a.astype(jnp.float32)
  transpose = m < n  # work on the tall orientation so the sketch has min(m, n) rows
  if transpose:
    a = _mT(a)
  size = min(rank + oversample, min(m, n))
  q = randomized_range_finder(key, a, size, power_iters=power_iters)
  ub, s, vt = _small_svd(_mT(q) @ a)
  u = q @ ub[..., :rank]
  s, vt = s[..., :rank], vt[..., :rank, :]
  if transpose:
    u, vt = _mT(vt), _mT(u)
  return u, s, vt
