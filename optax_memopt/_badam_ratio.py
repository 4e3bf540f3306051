"""BAdam's ratio mode: every tensor trains a moving fraction of its entries.

Each leaf with at least ``min_size`` entries trains ``n = ceil(update_ratio · size)`` of them at a
time (a static count per leaf), and Adam's moments exist only for those ``n`` entries: the state holds
``[n]``-shaped vectors, never a dense full-size moment. Smaller leaves (norm scales, biases) train
whole. A leaf of a layer stack (``[L, ...]``, recognised as :func:`optax_memopt.block_labels` does)
is ``L`` leaves: each layer's slice is selected, decayed and counted as the same layer's leaf of a
list of layers would be (state ``[L, n]``). Every ``switch_every`` updates the selection moves on
and every moment (small leaves' too) resets to zero, with bias correction restarting from the
period's own step 1.

:func:`scale_by_badam_ratio` is the direction (Adam on the selected entries); :func:`badam_ratio`
is that direction with the learning rate, decoupled weight decay on the selected entries and the
float32 master copy folded in: it returns ``new - current`` on the selected entries (the master copy
needs the step itself), so it is not the chain of the direction with later stages.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_memopt import _stacks
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
  """State of :func:`badam_ratio` and :func:`scale_by_badam_ratio`.

  Attributes:
    count: int32 scalar, updates done so far (the global step).
    block_step: int32 scalar, updates done in the current selection period, in
      ``[0, switch_every)``.
    active_block: int32 scalar, index of the selection period of the next update
      (``count // switch_every``).
    key: uint32 ``[2]``, raw PRNG key data of the ``scatter`` selections.
    index: per leaf, int32 ``[n]`` flat indices of the selected entries (``optax.MaskedNode()``, no
      array, for leaves trained whole); ``[L, n]`` for a leaf of a layer stack (flat indices into
      each layer's slice).
    mu: per leaf, float32 ``[n]`` first moment of the selected entries (``[size]`` for small leaves;
      ``[L, n]`` for a stacked leaf).
    nu: per leaf, float32 ``[n]`` second moment, likewise.
    master: per leaf, float32 ``[n]`` master copy of the selected entries of bf16/fp16 leaves
      (``optax.MaskedNode()`` for float32 leaves, and for every leaf in
      :func:`scale_by_badam_ratio`), likewise.

  The state holds no zero-size array (orbax's ``StandardCheckpointer`` refuses them), and the
  state ``init`` gives ``optax.tree_utils.tree_map_params``' placeholder has no field shaped like the
  params, so it hands every field to ``transform_non_params``.
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


def _selection(mode, size, n, key, leaf_id, period, layers=None):
  """Flat indices (int32 [n]) of the entries trained in ``period``; ``[layers, n]`` (indices into
  each layer's slice, each layer its own draw) for a leaf of a layer stack."""
  if mode == "adjacent":
    start = _mulmod(period, n, size)
    idx = ((start + jnp.arange(n, dtype=jnp.uint32)) % jnp.uint32(size)).astype(jnp.int32)
    return idx if layers is None else jnp.broadcast_to(idx, (layers, n))
  k = jax.random.fold_in(jax.random.wrap_key_data(key), leaf_id)
  if layers is None:
    return jnp.sort(_random_subset(jax.random.fold_in(k, period), size, n)).astype(jnp.int32)
  keys = jax.vmap(lambda l: jax.random.fold_in(jax.random.fold_in(k, l), period))(jnp.arange(layers))
  return jax.vmap(lambda k: jnp.sort(_random_subset(k, size, n)).astype(jnp.int32))(keys)


def _explicit(x) -> bool:
  """Whether ``x`` is typed with a sharding on an ``Explicit`` mesh (sharding in types)."""
  mesh = jax.typeof(x).sharding.mesh
  return not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types


def _coords(idx, shape, axis):
  """Coordinates of flat indices ``idx`` into ``shape``; for a stacked leaf (layer axis ``axis``,
  ``None`` for a leaf outside the stacks), ``idx`` is ``[L, n]`` (flat indices into each layer's
  slice, ``shape`` without ``axis``)."""
  if axis is None:
    return jnp.unravel_index(idx, shape) if len(shape) > 1 else idx
  layer = jnp.arange(shape[axis], dtype=idx.dtype)[:, None]
  inner = shape[:axis] + shape[axis + 1:]
  coords = list(jnp.unravel_index(idx, inner) if len(inner) > 1 else (idx,) if inner else ())
  coords.insert(axis, layer)
  return tuple(coords)


def _take(x, idx, axis=None):
  """The entries of ``x`` at flat (row-major) indices ``idx``, or all of them flattened if ``idx`` is
  ``MaskedNode`` (a leaf trained whole); per layer (``[L, n]``) for a stacked leaf (its layer axis
  ``axis``). Indexes by
  coordinates: flattening a sharded array first would all-gather it whole, while a gather by
  coordinates moves only the selected entries. On an explicit mesh the result is typed replicated,
  like the state's ``[n]``-vectors."""
  if isinstance(idx, optax.MaskedNode):
    return x.reshape(-1) if axis is None else jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
  coords = _coords(idx, x.shape, axis)
  return x.at[coords].get(out_sharding=jax.P() if _explicit(x) else None)


def _put(like, idx, values, axis=None):
  """Zeros like ``like`` (and sharded like it) with ``values`` at flat indices ``idx``."""
  if isinstance(idx, optax.MaskedNode):
    if axis is None:
      return values.reshape(like.shape)
    moved = (like.shape[axis],) + like.shape[:axis] + like.shape[axis + 1:]
    return jnp.moveaxis(values.reshape(moved), 0, axis)
  coords = _coords(idx, like.shape, axis)
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
    stacks: str | tuple[str, ...] | dict[str, int] | None = None,
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
  entries train every entry. The learning rate schedule runs on the global step. Each layer of a
  layer stack (a leaf ``[L, ...]``, or ``[d, L, ...]`` in a stack scanned on axis 1) counts as a
  leaf of its own, so a stacked model trains the same entries as the same model written as a list
  of layers (in ``adjacent`` mode, the same numbers).
  Leaves named in ``always_active`` (e.g. a new task head, whatever its size) train every entry.
  :func:`scale_by_badam_ratio` is the same direction with no learning rate, decay or master copy.

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
    weight_decay: decoupled weight decay on the selected entries of leaves with ``ndim >= 2`` (for a
      stacked leaf, of one layer's slice: a stack of norm scales ``[L, d]`` is not decayed).
    master_weights: keep a float32 copy of the selected entries of bf16/fp16 leaves.
    stacks: the layer stacks' subtree paths, or ``{path: layer axis}`` (as in
      :func:`optax_memopt.block_labels`), ``None`` to recognise them by name and shape, ``()`` to
      treat every leaf as one tensor.

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
  _validate(update_ratio, switch_every, mask_mode, min_size, always_active)
  return _BAdamRatio(
      learning_rate, update_ratio=update_ratio, always_active=always_active,
      switch_every=switch_every, mask_mode=mask_mode, min_size=min_size, seed=seed, b1=b1, b2=b2,
      eps=eps, weight_decay=weight_decay, master_weights=master_weights, stacks=stacks,
      name="badam_ratio",
  ).transformation()


def scale_by_badam_ratio(
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
    stacks: str | tuple[str, ...] | dict[str, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam on a moving fraction ``update_ratio`` of every tensor's entries.

  The direction of :func:`badam_ratio` without its step: on the selected set :math:`S_p` of the
  current selection period (chosen as in :func:`badam_ratio`), with :math:`s` the step within the
  period (restarting at 1 at every switch),

  .. math::
    m_s = \beta_1 m_{s-1} + (1-\beta_1) g_t, \quad v_s = \beta_2 v_{s-1} + (1-\beta_2) g_t^2,
    \quad u_t = \frac{m_s / (1-\beta_1^s)}{\sqrt{v_s / (1-\beta_2^s)} + \epsilon},

  and :math:`u_t = 0` outside :math:`S_p`, in the dtype of the gradients. Chain it with
  ``optax.scale_by_learning_rate``. Its state is a :class:`BAdamRatioState` with no master copy
  (``master`` is ``optax.MaskedNode()`` for every leaf): the parameters move by whatever the
  later stages make of the direction. :func:`badam_ratio` is this direction with its learning
  rate, decoupled weight decay on the selected entries and float32 master copy folded in; a chain
  with ``optax.add_decayed_weights`` instead decays every entry, selected or not.

  Args:
    update_ratio: fraction of each tensor trained at a time, in (0, 1].
    always_active: leaves whose every entry is selected at every step, as in :func:`badam_ratio`.
    switch_every: updates per selection period (``K``).
    mask_mode: ``"adjacent"`` or ``"scatter"``.
    min_size: leaves with fewer entries are selected whole.
    seed: seed of the ``scatter`` selections.
    b1, b2, eps: Adam's coefficients.
    stacks: the layer stacks, as in :func:`badam_ratio`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`BAdamRatioState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optax_memopt
    >>> params = {'w': jnp.ones((10, 20)), 'b': jnp.ones(20)}
    >>> tx = optax.chain(optax_memopt.scale_by_badam_ratio(update_ratio=0.1, switch_every=5),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((10, 20)), 'b': jnp.ones(20)}, state, params)
    >>> int((updates['w'] != 0).sum()), round(float(updates['b'][0]), 3)
    (20, -0.01)

  References:
    Luo, Yu, Li, `BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language
    Models <https://arxiv.org/abs/2404.02827>`_, NeurIPS 2024.
  """
  _validate(update_ratio, switch_every, mask_mode, min_size, always_active)
  return _BAdamRatio(
      None, update_ratio=update_ratio, always_active=always_active, switch_every=switch_every,
      mask_mode=mask_mode, min_size=min_size, seed=seed, b1=b1, b2=b2, eps=eps, weight_decay=0.0,
      master_weights=False, stacks=stacks, name="scale_by_badam_ratio",
  ).transformation()


def _validate(update_ratio, switch_every, mask_mode, min_size, always_active) -> None:
  if any(isinstance(x, (jax.Array, jax.core.Tracer)) for x in (update_ratio, switch_every, min_size)):
    raise TypeError(
        "update_ratio, switch_every and min_size decide shapes and must be Python numbers; under "
        "optax.inject_hyperparams pass static_args=('update_ratio', 'switch_every', 'min_size')"
    )
  if not 0.0 < float(update_ratio) <= 1.0:
    raise ValueError(f"update_ratio must be in (0, 1], got {update_ratio!r}")
  if not isinstance(switch_every, int) or switch_every < 1:
    raise ValueError(f"switch_every must be an int >= 1, got {switch_every!r}")
  if mask_mode not in MASK_MODES:
    raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
  if not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
  if isinstance(always_active, str):
    raise TypeError(
        "always_active: a single string is ambiguous; pass a list of regular expressions, e.g. "
        f"[{always_active!r}]"
    )


class _Layout(NamedTuple):
  """How one leaf is trained: as ``layers`` units (``None``: one, not a stack) of shape ``unit``
  and ``size`` entries, ``n`` of them selected at a time; ``axis`` is a stack's layer axis."""

  layers: int | None
  unit: tuple[int, ...]
  size: int
  n: int
  axis: int | None


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _update_moments(g_sel, mu, nu, b1, b2):
  """Adam's moment updates on the selected entries, ``(mu, nu)``.

  Not ``optax.tree.update_moment``: under ``jax.jit`` its ``(1 - b) * g + b * m`` compiles to other
  last bits than ``b * m + (1 - b) * g`` here, and its ``(1 - b2) * g**2`` rounds differently from
  ``(1 - b2) * g * g``.
  """
  mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, g_sel, mu)
  nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, g_sel, nu)
  return mu, nu


def _adam_direction(mu, nu, b1, b2, eps, s):
  """``m_hat / (sqrt(v_hat) + eps)`` with the bias corrections of step ``s`` (float32).

  Not ``optax.tree.bias_correction`` (a nested ``jax.jit`` taking the decay as an argument): inside
  a jitted ``badam_ratio`` step it gave other last bits than this expression, which is kept.
  """
  return jax.tree.map(lambda m, v: (m / (1 - b1**s)) / (jnp.sqrt(v / (1 - b2**s)) + eps), mu, nu)


class _BAdamRatio:
  """One :func:`badam_ratio` (``learning_rate`` given) or :func:`scale_by_badam_ratio`
  (``learning_rate=None``: the direction, no decay, no master copy) transformation."""

  def __init__(self, learning_rate, *, update_ratio, always_active, switch_every, mask_mode,
               min_size, seed, b1, b2, eps, weight_decay, master_weights, stacks, name):
    self.learning_rate, self.weight_decay = learning_rate, weight_decay
    self.update_ratio, self.min_size, self.stacks = update_ratio, min_size, stacks
    self.always_active, self.switch_every, self.mask_mode = always_active, switch_every, mask_mode
    self.seed, self.b1, self.b2, self.eps = seed, b1, b2, eps
    self.master_weights, self.name = master_weights, name
    self.decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

  def transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(self.init, self.update)

  # -- static facts

  def layouts(self, params) -> list[_Layout]:
    """Per leaf, its :class:`_Layout`."""
    leaves = jax.tree_util.tree_leaves(params)
    whole = resolve_always_active(self.always_active, params)
    out = []
    for x, key, w in zip(leaves, _stacks.stack_keys(params, self.stacks), whole):
      shape = tuple(x.shape)
      layers, axis = (None, None) if key is None else (key.length, key.axis)
      unit = shape if key is None else shape[:axis] + shape[axis + 1:]
      size = math.prod(unit)
      n = size if w else _selected_count(size, self.update_ratio, self.min_size)
      out.append(_Layout(layers, unit, size, n, axis))
    return out

  def low_precision(self, x) -> bool:
    return self.master_weights and jnp.dtype(x.dtype) in (jnp.bfloat16, jnp.float16)

  # -- the selection and a fresh period's state

  def select_all(self, params, key, period):
    """The selection of ``period``: per leaf its indices (``MaskedNode`` for a leaf trained whole)."""
    treedef = jax.tree_util.tree_structure(params)
    index = []
    for i, (layers, _, size, n, _) in enumerate(self.layouts(params)):
      if n == size:
        index.append(optax.MaskedNode())
      else:
        index.append(_selection(self.mask_mode, size, n, key, i, period, layers))
    return jax.tree_util.tree_unflatten(treedef, index)

  def fresh(self, params, index):
    """Zero moments and a master copy for the selection ``index``: ``(mu, nu, master)``."""
    def one(x, idx, layout):
      shape = (layout.n,) if layout.layers is None else (layout.layers, layout.n)
      if self.low_precision(x):
        master = _take(x, idx, layout.axis).astype(jnp.float32)
      else:
        master = optax.MaskedNode()
      # Distinct arrays for mu and nu, so that a state from init can be donated to a jitted step.
      return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), master
    out = jax.tree.map(one, params, index, self._layout_tree(params), is_leaf=_is_masked)
    pick = lambda j: jax.tree.map(lambda _, o: o[j], params, out)  # noqa: E731
    return pick(0), pick(1), pick(2)

  def _layout_tree(self, params):
    """The layouts as a tree with the structure of ``params`` (a layout at each leaf)."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), self.layouts(params))

  # -- init

  def init(self, params):
    if is_params_placeholder(params):  # optax.tree.map_params: no field is shaped like the params
      return BAdamRatioState(*(jnp.zeros([], jnp.int32) for _ in BAdamRatioState._fields))
    check_float_leaves(params, self.name)
    key = jax.random.key_data(jax.random.key(self.seed)).astype(jnp.uint32)
    index = self.select_all(params, key, jnp.int32(0))
    mu, nu, master = self.fresh(params, index)
    zero = lambda: jnp.zeros([], jnp.int32)  # noqa: E731
    return BAdamRatioState(zero(), zero(), zero(), key, index, mu, nu, master)

  # -- update: reset at a switch, Adam on the selected entries, the step, the next selection

  def update(self, updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      if self.learning_rate is not None:
        raise ValueError(f"{self.name} requires params: call tx.update(grads, state, params)")
      params = updates  # the direction needs only the shapes
    self._check_fits(updates, state, params)
    reset = state.block_step == 0
    mu, nu, master = optax.tree.where(
        reset, self.fresh(params, state.index), (state.mu, state.nu, state.master))
    layouts = self._layout_tree(params)
    g_sel = jax.tree.map(lambda g, idx, lay: _take(g, idx, lay.axis).astype(jnp.float32),
                         updates, state.index, layouts, is_leaf=_is_masked)
    mu, nu = _update_moments(g_sel, mu, nu, self.b1, self.b2)
    s = (state.block_step + 1).astype(jnp.float32)
    direction = _adam_direction(mu, nu, self.b1, self.b2, self.eps, s)
    if self.learning_rate is None:
      new_updates = jax.tree.map(lambda g, idx, u, lay: _put(g, idx, u.astype(g.dtype), lay.axis),
                                 updates, state.index, direction, layouts, is_leaf=_is_masked)
    else:
      new_updates, master = self._step(params, state, direction, master, layouts)
    return new_updates, self._next_state(params, state, mu, nu, master)

  def _check_fits(self, updates, state, params) -> None:
    """One-line errors for grads, params and a state (from init) that do not belong together."""
    check_same_structure(self.name, updates, "grads", params, "params")
    check_same_structure(self.name, params, "params", state.mu, "the state's moments (from init)")
    for path, layout, m in zip(leaf_paths(params), self.layouts(params),
                               jax.tree_util.tree_leaves(state.mu)):
      want = (layout.n,) if layout.layers is None else (layout.layers, layout.n)
      if m.shape != want:
        raise ValueError(
            f"{self.name}: parameter {path!r} trains {want} entries at a time but the state built "
            f"at init holds {m.shape}: it changed shape (or was stacked differently) between init "
            "and update (re-run tx.init)"
        )

  def _step(self, params, state, direction, master, layouts):
    """``(updates, master)``: the AdamW step on the selected entries (on the master copy of a
    bf16/fp16 leaf), as ``new - current`` in the parameters' dtype, zeros elsewhere."""
    lr = self.learning_rate(state.count) if callable(self.learning_rate) else self.learning_rate

    def one(p, idx, d, w, layout):
      current = _take(p, idx, layout.axis).astype(jnp.float32)
      base = w if self.low_precision(p) else current
      if self.decays and len(layout.unit) >= 2:
        d = d + self.weight_decay * base
      new_value = base - lr * d
      if self.low_precision(p):
        w = new_value
        new_value = new_value.astype(p.dtype)
      delta = (new_value.astype(jnp.float32) - current).astype(p.dtype)
      return _put(p, idx, delta, layout.axis), w

    out = jax.tree.map(one, params, state.index, direction, master, layouts, is_leaf=_is_masked)
    pick = lambda j: jax.tree.map(lambda _, o: o[j], params, out)  # noqa: E731
    return pick(0), pick(1)

  def _next_state(self, params, state, mu, nu, master) -> BAdamRatioState:
    """The state after this update: the schedule advanced, a new selection at a switch."""
    count = optax.safe_increment(state.count)
    block_step = (state.block_step + 1) % self.switch_every
    period = count // self.switch_every
    index = jax.lax.cond(
        block_step == 0, lambda: self.select_all(params, state.key, period), lambda: state.index
    )
    return BAdamRatioState(
        count, block_step, period.astype(jnp.int32), state.key, index, mu, nu, master
    )
