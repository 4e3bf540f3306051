"""BAdam's ratio mode: every tensor trains a moving fraction of its entries.

Each leaf with at least ``min_size`` entries trains ``n = ceil(update_ratio · size)`` of them at a
time (a static count per leaf), and Adam's moments exist only for those ``n`` entries: the state holds
``[n]``-shaped vectors, never a dense full-size moment. Smaller leaves (norm scales, biases) train
whole. Every ``switch_every`` updates the selection moves on and every moment (small leaves' too)
resets to zero, with bias correction restarting from the period's own step 1.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_memopt._blocks import AlwaysActiveSpec, resolve_always_active
from optax_memopt._tree import (
    check_float_leaves,
    check_same_structure,
    is_params_placeholder,
    leaf_paths,
    zeros_like_placed,
)

MASK_MODES = ("adjacent", "scatter")


class BAdamRatioState(NamedTuple):
  """State of :func:`badam_ratio`.

  Attributes:
    count: int32 scalar, updates done so far (the global step).
    block_step: int32 scalar, updates done in the current selection period, in
      ``[0, switch_every)``.
    active_block: int32 scalar, index of the selection period of the next update
      (``count // switch_every``).
    key: uint32 ``[2]``, raw PRNG key data of the ``scatter`` selections.
    index: per leaf, int32 ``[n]`` flat indices of the selected entries (``optax.MaskedNode()``, no
      array, for leaves trained whole).
    mu: per leaf, float32 ``[n]`` first moment of the selected entries (``[size]`` for small leaves).
    nu: per leaf, float32 ``[n]`` second moment, likewise.
    master: per leaf, float32 ``[n]`` master copy of the selected entries of bf16/fp16 leaves
      (``optax.MaskedNode()`` for float32 leaves).

  The state holds no zero-size array (orbax's ``StandardCheckpointer`` refuses them), and no field
  is shaped like the params, so ``optax.tree_utils.tree_map_params`` hands every field to
  ``transform_non_params``.
  """

  count: jax.Array
  block_step: jax.Array
  active_block: jax.Array
  key: jax.Array
  index: Any
  mu: Any
  nu: Any
  master: Any


def _selected_count(size: int, update_ratio: float, min_size: int) -> int:
  if size < min_size:
    return size
  return max(1, math.ceil(update_ratio * size))


def _mulmod(a, b: int, size: int):
  """``(a * b) % size`` for a traced int32 ``a >= 0`` and Python ints ``b``, ``size <= 2**31``,
  without overflow: double-and-add over the bits of ``a`` in uint32 (every partial sum is below
  ``2 * size <= 2**32``)."""
  a = a.astype(jnp.uint32)
  b, size_u = jnp.uint32(b % size), jnp.uint32(size)
  out = jnp.uint32(0)
  for bit in range(30, -1, -1):
    out = (out * 2) % size_u
    out = jnp.where((a >> bit) & 1, (out + b) % size_u, out)
  return out


def _random_subset(key, size: int, n: int):
  """``n`` distinct indices in ``[0, size)``, in O(n) memory: the first ``n`` images of a keyed
  pseudorandom permutation of ``[0, size)`` (a 6-round Feistel network on the smallest even number
  of bits covering ``size``, with cycle walking back into range)."""
  bits = max(2, (size - 1).bit_length())
  bits += bits % 2
  half, low_mask = bits // 2, jnp.uint32((1 << (bits // 2)) - 1)
  round_keys = jax.random.bits(key, (6,), jnp.uint32)

  def permute(x):
    left, right = x >> half, x & low_mask
    for r in range(6):
      h = (right ^ round_keys[r]) * jnp.uint32(0x9E3779B1)
      h = (h ^ (h >> 15)) * jnp.uint32(0x85EBCA77)
      left, right = right, left ^ ((h ^ (h >> 13)) & low_mask)
    return (left << half) | right

  x = permute(jnp.arange(n, dtype=jnp.uint32))
  x = jax.lax.while_loop(
      lambda x: jnp.any(x >= size), lambda x: jnp.where(x >= size, permute(x), x), x)
  return x


def _selection(mode, size, n, key, leaf_id, period):
  """Flat indices (int32 [n]) of the entries trained in ``period``."""
  if mode == "adjacent":
    start = _mulmod(period, n, size)
    return ((start + jnp.arange(n, dtype=jnp.uint32)) % jnp.uint32(size)).astype(jnp.int32)
  k = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key), leaf_id), period)
  return jnp.sort(_random_subset(k, size, n)).astype(jnp.int32)


def _explicit(x) -> bool:
  """Whether ``x`` is typed with a sharding on an ``Explicit`` mesh (sharding in types)."""
  mesh = jax.typeof(x).sharding.mesh
  return not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types


def _take(x, idx):
  """The entries of ``x`` at flat (row-major) indices ``idx``, or all of them flattened if ``idx`` is
  ``MaskedNode`` (a leaf trained whole). Indexes by coordinates: flattening a sharded array first
  would all-gather it whole, while a gather by coordinates moves only the selected entries. On an
  explicit mesh the result is typed replicated, like the state's ``[n]``-vectors."""
  if isinstance(idx, optax.MaskedNode):
    return x.reshape(-1)
  coords = jnp.unravel_index(idx, x.shape) if x.ndim > 1 else idx
  return x.at[coords].get(out_sharding=jax.P() if _explicit(x) else None)


def _put(like, idx, values):
  """Zeros like ``like`` (and sharded like it) with ``values`` at flat indices ``idx``."""
  if isinstance(idx, optax.MaskedNode):
    return values.reshape(like.shape)
  coords = jnp.unravel_index(idx, like.shape) if like.ndim > 1 else idx
  out_sharding = jax.typeof(like).sharding if _explicit(like) else None
  return zeros_like_placed(like).at[coords].set(values, out_sharding=out_sharding)


def badam_ratio(
    learning_rate: optax.ScalarOrSchedule,
    *,
    update_ratio: float = 0.1,
    always_active: AlwaysActiveSpec = None,
    switch_every: int = 100,
    mask_mode: str = "adjacent",
    min_size: int = 100,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    master_weights: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""BAdam ratio mode: Adam on a moving fraction ``update_ratio`` of every tensor's entries.

  For a leaf of ``size`` entries, the selected set :math:`S_p` of period
  :math:`p = \lfloor t / K \rfloor` has :math:`n = \lceil r \cdot size \rceil` entries: in
  ``adjacent`` mode the contiguous run (in flattened order, wrapping) starting at :math:`p n \bmod
  size`, so that successive periods sweep the tensor; in ``scatter`` mode a pseudorandom subset
  keyed by ``seed``, the leaf and :math:`p`: the first :math:`n` images of a keyed pseudorandom
  permutation of the entries (a Feistel network with cycle walking), so every entry is about
  equally likely and the draw needs :math:`O(n)` memory, never a permutation of the whole leaf.
  On :math:`S_p` the update is AdamW with moments that start at zero at the period's first step
  (bias correction counts from there); outside it, zero. Leaves with fewer than ``min_size``
  entries train every entry, and so do the leaves named in ``always_active`` (e.g. a new task head,
  whatever its size). The learning rate schedule runs on the global step.

  State memory: per leaf two float32 vectors of length :math:`n` (moments), an int32 index vector of
  length :math:`n` (only for selected leaves) and, for bf16/fp16 params, a float32 master copy of the
  :math:`n` entries: about ``3 · update_ratio`` (4 with bf16) of one float32 parameter copy, against
  AdamW's 2.

  Args:
    learning_rate: scalar or schedule on the global step.
    update_ratio: fraction of each tensor trained at a time, in (0, 1].
    always_active: leaves trained whole at every step (their moments reset with the others' at each
      switch): ``None``, a list of regular expressions over dotted key paths, a pytree of bools or
      a callable ``params -> bools``, as in :func:`badam`.
    switch_every: updates per selection period (``K``).
    mask_mode: ``"adjacent"`` or ``"scatter"``.
    min_size: leaves with fewer entries are trained whole.
    seed: seed of the ``scatter`` selections.
    b1, b2, eps: Adam's coefficients.
    weight_decay: decoupled weight decay on the selected entries of leaves with ``ndim >= 2``.
    master_weights: keep a float32 copy of the selected entries of bf16/fp16 leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`BAdamRatioState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_memopt
    >>> params = {'w': jnp.ones((10, 20)), 'b': jnp.ones(20)}
    >>> tx = optax_memopt.badam_ratio(1e-2, update_ratio=0.1, switch_every=5)
    >>> state = tx.init(params)
    >>> state.mu['w'].shape, state.mu['b'].shape
    ((20,), (20,))
    >>> updates, state = tx.update({'w': jnp.ones((10, 20)), 'b': jnp.ones(20)}, state, params)
    >>> int((updates['w'] != 0).sum()), int((updates['b'] != 0).sum())
    (20, 20)

  References:
    Luo, Yu, Li, `BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language
    Models <https://arxiv.org/abs/2404.02827>`_, NeurIPS 2024 (``BlockOptimizerRatio`` in the
    reference code).
  """
  if any(isinstance(x, (jax.Array, jax.core.Tracer)) for x in (update_ratio, switch_every, min_size)):
    raise TypeError(
        "update_ratio and switch_every decide shapes and must be Python numbers; under "
        "optax.inject_hyperparams pass static_args=('update_ratio', 'switch_every', ...)"
    )
  if not 0.0 < float(update_ratio) <= 1.0:
    raise ValueError(f"update_ratio must be in (0, 1], got {update_ratio!r}")
  if not isinstance(switch_every, int) or switch_every < 1:
    raise ValueError(f"switch_every must be an int >= 1, got {switch_every!r}")
  if mask_mode not in MASK_MODES:
    raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
  if not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
  k = switch_every
  decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

  if isinstance(always_active, str):
    raise TypeError(
        "always_active: a single string is ambiguous; pass a list of regular expressions, e.g. "
        f"[{always_active!r}]"
    )

  def sizes(params):
    leaves = jax.tree_util.tree_leaves(params)
    whole = resolve_always_active(always_active, params)
    return [(x.size, x.size if w else _selected_count(x.size, update_ratio, min_size))
            for x, w in zip(leaves, whole)]

  def low_precision(x):
    return master_weights and jnp.dtype(x.dtype) in (jnp.bfloat16, jnp.float16)

  def select_all(params, key, period):
    treedef = jax.tree_util.tree_structure(params)
    index = []
    for i, (size, n) in enumerate(sizes(params)):
      if n == size:
        index.append(optax.MaskedNode())
      else:
        index.append(_selection(mask_mode, size, n, key, i, period))
    return jax.tree_util.tree_unflatten(treedef, index)

  def fresh(params, index):
    """Zero moments and a master copy for the selection ``index``."""
    def one(x, idx):
      n = x.size if isinstance(idx, optax.MaskedNode) else idx.shape[0]
      if low_precision(x):
        master = _take(x, idx).astype(jnp.float32)
      else:
        master = optax.MaskedNode()
      # Distinct arrays for mu and nu, so that a state from init can be donated to a jitted step.
      return jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32), master
    out = jax.tree.map(one, params, index)
    pick = lambda j: jax.tree.map(lambda _, o: o[j], params, out)
    return pick(0), pick(1), pick(2)

  def init_fn(params):
    if is_params_placeholder(params):  # optax.tree.map_params: no field is shaped like the params
      return BAdamRatioState(*(jnp.zeros([], jnp.int32) for _ in BAdamRatioState._fields))
    check_float_leaves(params, "badam_ratio")
    key = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
    index = select_all(params, key, jnp.int32(0))
    mu, nu, master = fresh(params, index)
    zero = lambda: jnp.zeros([], jnp.int32)
    return BAdamRatioState(zero(), zero(), zero(), key, index, mu, nu, master)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("badam_ratio requires params: call tx.update(grads, state, params)")
    check_same_structure("badam_ratio", updates, "grads", params, "params")
    check_same_structure("badam_ratio", params, "params", state.mu, "the state's moments (from init)")
    for path, (size, n), m in zip(leaf_paths(params), sizes(params), jax.tree_util.tree_leaves(state.mu)):
      if m.shape != (n,):
        raise ValueError(
            f"badam_ratio: parameter {path!r} ({size} entries) trains {n} at a time but the state "
            f"built at init holds {m.shape[0]}: it changed shape between init and update (re-run "
            "tx.init)"
        )
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    reset = state.block_step == 0
    mu0, nu0, master0 = fresh(params, state.index)
    mu = jax.tree.map(lambda a, b: jnp.where(reset, a, b), mu0, state.mu)
    nu = jax.tree.map(lambda a, b: jnp.where(reset, a, b), nu0, state.nu)
    master = jax.tree.map(lambda a, b: jnp.where(reset, a, b), master0, state.master)
    s = (state.block_step + 1).astype(jnp.float32)

    def one(g, p, idx, m, v, w):
      g_sel = _take(g, idx).astype(jnp.float32)
      current = _take(p, idx).astype(jnp.float32)
      m = b1 * m + (1 - b1) * g_sel
      v = b2 * v + (1 - b2) * g_sel * g_sel
      direction = (m / (1 - b1**s)) / (jnp.sqrt(v / (1 - b2**s)) + eps)
      if low_precision(p):
        base = w
      else:
        base = current
      if decays and p.ndim >= 2:
        direction = direction + weight_decay * base
      new_value = base - lr * direction
      if low_precision(p):
        w = new_value
        new_value = new_value.astype(p.dtype)
      delta = (new_value.astype(jnp.float32) - current).astype(p.dtype)
      return _put(p, idx, delta), m, v, w

    out = jax.tree.map(one, updates, params, state.index, mu, nu, master)
    pick = lambda j: jax.tree.map(lambda _, o: o[j], params, out)
    new_updates, mu, nu, master = pick(0), pick(1), pick(2), pick(3)

    count = optax.safe_increment(state.count)
    block_step = (state.block_step + 1) % k
    period = count // k
    index = jax.lax.cond(
        block_step == 0, lambda: select_all(params, state.key, period), lambda: state.index
    )
    new_state = BAdamRatioState(
        count, block_step, period.astype(jnp.int32), state.key, index, mu, nu, master
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
