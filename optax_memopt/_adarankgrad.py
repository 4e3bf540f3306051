"""AdaRankGrad: Adam on adaptively low-rank projected gradients, with a jitted randomized SVD.

Implementation of "AdaRankGrad: Adaptive Gradient-Rank and Moments for Memory-Efficient LLMs
Training and Fine-Tuning" (https://arxiv.org/abs/2410.17881) by Refael et al. The paper publishes no
code; the choices it leaves open are ours and are documented where they are made.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from optax_memopt import _stacks, _tree
from optax_memopt.linalg import randomized_svd

__all__ = [
    "AdaRankGradDimensionNumbers",
    "AdaRankGradState",
    "adarankgrad",
    "effective_ranks",
    "scale_by_adarankgrad",
]


class AdaRankGradDimensionNumbers(NamedTuple):
  """Which axes of a weight form the rows and the columns of the matrix AdaRankGrad projects.

  Unlike ``optax.contrib.GaLoreDimensionNumbers`` (which is also accepted), axes named in neither
  field are *batch* axes: a stack of layers ``[L, m, n]`` with ``reduction_axis=1, output_axis=2``
  is ``L`` independent ``m x n`` matrices, each with its own subspace, rank and refresh clock.
  Negative axes count from the end.

  Attributes:
    reduction_axis: Axis or axes forming the input (row) dimension.
    output_axis: Axis or axes forming the output (column) dimension.
  """

  reduction_axis: int | Sequence[int] = 0
  output_axis: int | Sequence[int] = 1


_DimNums = AdaRankGradDimensionNumbers | optax_contrib.GaLoreDimensionNumbers


_STACKED_MATRIX = AdaRankGradDimensionNumbers(reduction_axis=1, output_axis=2)


def _stacked_matrix(axis: int) -> AdaRankGradDimensionNumbers:
  """The dimension numbers of a stack of matrices ``[L, m, n]`` whose layer (batch) axis is ``axis``."""
  if axis == 0:
    return _STACKED_MATRIX
  reduction, output = (a for a in range(3) if a != axis)
  return AdaRankGradDimensionNumbers(reduction_axis=reduction, output_axis=output)


def _is_dim_nums(x: Any) -> bool:
  return isinstance(x, (AdaRankGradDimensionNumbers, optax_contrib.GaLoreDimensionNumbers))


class AdaRankGradState(NamedTuple):
  """State of :func:`scale_by_adarankgrad`.

  Every per-parameter field is a pytree with the structure of the params. For a projected weight
  seen as a stack of matrices of shape ``[*B, M, N]`` (``*B`` its batch axes, ``M >= N``: the
  matrix is transposed first if needed) with ``R = min(max_rank, N)``, and ``D`` the storage
  dtype (``state_dtype``, by default the parameter's dtype), the leaves are as listed. A leaf
  trained with plain Adam has full-size moments and ``optax.MaskedNode()`` (no arrays) for the
  projector, rank, reference norm and refresh step.

  Attributes:
    count: Number of updates taken, shape ``()``, int32. Adam's step for bias correction.
    mu: First moments. Projected: ``[*B, R, N]``, D; rows at or beyond the effective rank are
      exactly zero. Plain Adam: the parameter's shape, D.
    nu: Second moments (non-negative), same shapes and dtype as ``mu``.
    projector: Orthonormal basis of the current subspace, ``[*B, M, R]``, D; columns at or beyond
      the effective rank are exactly zero.
    rank: Effective rank of each matrix, ``[*B]``, int32 (read it with :func:`effective_ranks`).
    reference_norm: ``||Q^T G||_F`` measured right after the last refresh, ``[*B]``, float32.
    last_refresh: Value of ``count`` at the last refresh, ``[*B]``, int32.

  ``optax.tree_utils.tree_map_params`` applies its function to ``mu`` and ``nu`` (params-structured;
  a projected leaf's moments have shape ``[*B, R, N]``) and treats the other fields as non-params.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  projector: optax.Updates
  rank: optax.Updates
  reference_norm: optax.Updates
  last_refresh: optax.Updates


class _Layout(NamedTuple):
  """How one projected leaf is seen as a stack of tall matrices ``[*B, M, N]``, ``M >= N``."""

  perm: tuple[int, ...]  # leaf axes -> batch axes, reduction axes, output axes
  reduction: tuple[int, ...]  # the leaf's reduction axes, in the order given
  output: tuple[int, ...]  # the leaf's output axes, in the order given
  grouped_shape: tuple[int, ...]  # the leaf's shape after ``perm``
  batch: tuple[int, ...]
  m: int  # product of the reduction axes
  n: int  # product of the output axes
  rank: int  # R = min(max_rank, m, n), the buffer width

  @property
  def flipped(self) -> bool:
    return self.m < self.n

  def to_matrix(self, x: jax.Array) -> jax.Array:
    y = x.transpose(self.perm).reshape(self.batch + (self.m, self.n))
    return jnp.swapaxes(y, -1, -2) if self.flipped else y

  def from_matrix(self, y: jax.Array) -> jax.Array:
    if self.flipped:
      y = jnp.swapaxes(y, -1, -2)
    inv = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
    return y.reshape(self.grouped_shape).transpose(inv)

  @property
  def tall(self) -> tuple[int, int]:
    return max(self.m, self.n), min(self.m, self.n)

  def matrix_spec(self, spec: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, Any]:
    """The mesh axes of ``[*B, M, N]`` (batch entries, M's, N's) from the leaf's ``spec`` entries.

    A merged dimension keeps the mesh axes of its leading leaf axis when that is its only sharded
    axis (then the reshape moves no data); any other sharding of it is dropped (replicated).
    """

    def merged(axes):
      sharded = [ax for ax in axes if spec[ax] is not None]
      return spec[axes[0]] if sharded == [axes[0]] else None

    batch = tuple(spec[ax] for ax in self.perm[: len(self.batch)])
    rows, cols = merged(self.reduction), merged(self.output)
    return (batch, cols, rows) if self.flipped else (batch, rows, cols)


def _axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  for ax in axes:
    if not -ndim <= ax < ndim:
      raise ValueError(f"axis {ax} is out of range for an array with {ndim} dimensions.")
  return tuple(ax % ndim for ax in axes)


def _layout(path: str, leaf: Any, dim_nums: _DimNums, max_rank: int) -> _Layout:
  shape = tuple(leaf.shape)
  if len(shape) < 2:
    raise ValueError(
        f"scale_by_adarankgrad: parameter {path!r} of shape {shape} was given dimension numbers "
        "but only arrays with at least 2 dimensions can be projected."
    )
  red = _axes(dim_nums.reduction_axis, len(shape))
  out = _axes(dim_nums.output_axis, len(shape))
  if not red or not out or set(red) & set(out) or len(set(red + out)) != len(red + out):
    raise ValueError(
        f"scale_by_adarankgrad: parameter {path!r}: reduction axes {red} and output axes {out} "
        "must be non-empty, disjoint and without repeats."
    )
  batch_axes = tuple(ax for ax in range(len(shape)) if ax not in red + out)
  perm = batch_axes + red + out
  m = math.prod(shape[ax] for ax in red)
  n = math.prod(shape[ax] for ax in out)
  return _Layout(
      perm=perm,
      reduction=red,
      output=out,
      grouped_shape=tuple(shape[ax] for ax in perm),
      batch=tuple(shape[ax] for ax in batch_axes),
      m=m,
      n=n,
      rank=min(max_rank, m, n),
  )


def _is_concrete(x: Any) -> bool:
  """True for Python numbers; hyperparameters injected by ``inject_hyperparams`` are arrays."""
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(
    max_rank, min_rank, info_threshold, refresh_threshold, max_refresh_interval, oversample,
    power_iters,
) -> None:
  for name, value in (("max_rank", max_rank), ("oversample", oversample),
                      ("power_iters", power_iters)):
    if isinstance(value, (jax.Array, jax.core.Tracer)):
      raise TypeError(
          f"{name} decides array shapes or Python loops and must be a Python int, got an array; "
          f"under optax.inject_hyperparams pass static_args=({name!r}, ...) (see the adarankgrad "
          "docstring for the full list)."
      )
  for name, value in (("max_rank", max_rank), ("min_rank", min_rank)):
    if not isinstance(value, (jax.Array, jax.core.Tracer)) and (
        not isinstance(value, int) or isinstance(value, bool)):
      raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if _is_concrete(value) and value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
  if _is_concrete(max_rank) and _is_concrete(min_rank) and min_rank > max_rank:
    raise ValueError(f"min_rank ({min_rank}) must be <= max_rank ({max_rank}).")
  for name, value in (("info_threshold", info_threshold), ("refresh_threshold", refresh_threshold)):
    if _is_concrete(value) and not 0.0 < value <= 1.0:
      raise ValueError(f"{name} must be in (0, 1], got {value}.")
  if _is_concrete(max_refresh_interval) and max_refresh_interval < 1:
    raise ValueError(f"max_refresh_interval must be >= 1, got {max_refresh_interval}.")
  for name, value in (("oversample", oversample), ("power_iters", power_iters)):
    if _is_concrete(value) and value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}.")


def _flatten_like(params_treedef, tree: Any, is_leaf: Callable[[Any], bool]) -> list[Any]:
  """Leaves of ``tree`` (a prefix-compatible tree of specs) in the order of the params' leaves."""
  leaves = jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)[0]
  if len(leaves) != params_treedef.num_leaves:
    leaves = params_treedef.flatten_up_to(tree)
  return leaves


def _layouts(
    params: Any,
    weight_dimension_numbers: Any,
    projection_mask: Any,
    max_rank: int,
    stacks: Any = None,
) -> list[_Layout | None]:
  """One entry per leaf of ``params``: its layout if projected, else ``None`` (plain Adam)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    return _layouts_of(params, leaves_with_path, treedef, weight_dimension_numbers,
                       projection_mask, max_rank, stacks)
  except ValueError as e:
    if "share axis 1" not in str(e):
      raise
    raise ValueError(
        f"{e}; or, for AdaRankGrad, give weight_dimension_numbers naming the layer axis as a batch "
        "axis (AdaRankGradDimensionNumbers(reduction_axis=0, output_axis=2) for [d, L, f])"
    ) from None


def _leaf_dim_nums(params, leaves, treedef, weight_dimension_numbers, stacks) -> list[_DimNums | None]:
  """Per leaf, the dimension numbers it is projected with, ``None`` for plain Adam."""
  if weight_dimension_numbers is None:
    # A layer stack's [L, m, n] leaf is L matrices (batch axis 0; [m, L, n] on axis 1: batch axis
    # 1); its [L, d] (or [d, L]) leaves are L vectors.
    keys = _stacks.stack_keys(params, stacks)
    return [
        _stacked_matrix(k.axis) if k is not None and leaf.ndim == 3
        else AdaRankGradDimensionNumbers() if k is None and leaf.ndim == 2 else None
        for leaf, k in zip(leaves, keys)
    ]
  if _is_dim_nums(weight_dimension_numbers):
    return [weight_dimension_numbers if leaf.ndim >= 2 else None for leaf in leaves]
  tree = weight_dimension_numbers
  if callable(tree):
    tree = tree(params)
  return _flatten_like(treedef, tree, lambda x: x is None or _is_dim_nums(x))


def _projected_leaves(params, treedef, weight_dimension_numbers, projection_mask, stacks) -> list[bool]:
  """Per leaf, whether ``projection_mask`` lets it be projected."""
  if projection_mask is None:
    return [True] * treedef.num_leaves
  if isinstance(projection_mask, str):  # "layers", the default
    if weight_dimension_numbers is None or _is_dim_nums(weight_dimension_numbers):
      return _stacks.layer_leaves(params, stacks)
    return [True] * treedef.num_leaves
  tree = projection_mask(params) if callable(projection_mask) else projection_mask
  return [bool(k) for k in _flatten_like(treedef, tree, lambda x: x is None)]


def _layouts_of(params, leaves_with_path, treedef, weight_dimension_numbers, projection_mask,
                max_rank, stacks) -> list[_Layout | None]:
  leaves = [leaf for _, leaf in leaves_with_path]
  specs = _leaf_dim_nums(params, leaves, treedef, weight_dimension_numbers, stacks)
  keep = _projected_leaves(params, treedef, weight_dimension_numbers, projection_mask, stacks)
  return [
      _layout(_tree.path_str(path), leaf, spec, max_rank) if spec is not None and k else None
      for (path, leaf), spec, k in zip(leaves_with_path, specs, keep, strict=True)
  ]


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


class _Where(NamedTuple):
  """Where a parameter lives on a device mesh: the mesh and one spec entry per axis."""

  mesh: Any
  spec: tuple[Any, ...]
  in_types: bool  # an Explicit mesh axis: the sharding is part of the array's type

  def zeros(self, shape: tuple[int, ...], dtype: Any, spec: Sequence[Any]) -> jax.Array:
    sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
    if self.in_types:
      return jnp.zeros(shape, dtype, out_sharding=sharding)
    return jnp.zeros(shape, dtype, device=sharding)


def _keep_placement(new: Any, old: Any) -> Any:
  """``new`` constrained to the sharding of the concrete array ``old`` (an update run outside
  ``jax.jit``); under a trace the placement is the partitioner's (or the types') business."""
  sharding = getattr(old, "sharding", None)
  if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer) and isinstance(
      sharding, jax.sharding.NamedSharding
  ) and isinstance(new, jax.Array):
    return jax.lax.with_sharding_constraint(new, sharding)
  return new


def _where(x: Any) -> _Where | None:
  """The mesh placement of ``x`` when it is known at trace time, else ``None``.

  Known for a concrete array with a ``NamedSharding`` and, under sharding in types (an Explicit mesh,
  e.g. inside ``jax.set_mesh``), for tracers too. Under ``jax.jit`` on an automatic mesh the
  placement of a tracer is decided later by the partitioner: ``None``.
  """
  def entries(spec):
    spec = tuple(spec)
    return spec + (None,) * (x.ndim - len(spec))

  if not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return _Where(sharding.mesh, entries(sharding.spec), False)
  try:
    sharding = jax.typeof(x).sharding
  except TypeError:
    return None
  if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.empty:
    return None
  spec = entries(sharding.spec)
  if all(e is None for e in spec):
    return None
  return _Where(sharding.mesh, spec, True)


def _frobenius(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))


_ENERGY_RTOL = 1e-5  # relative tolerance of the kept-energy test (float32 rounding, ~1e-6)


def _negligible_reference(ref: jax.Array, low_norm: jax.Array, g: jax.Array) -> jax.Array:
  """Where the last refresh saw a gradient too small to choose a subspace from (per matrix).

  A refresh on a zero gradient (e.g. the layers before a zero-initialised output at step 0) stores
  a reference norm of 0 and an arbitrary basis, and the convergence test ``|Q^T G| < tau * ref``
  could then never fire. Such a subspace is refreshed as soon as the gradient is not negligible:
  when the projected gradient exceeds the reference by more than ``1 / eps`` of float32, or, for a
  reference of exactly zero, when the full gradient is nonzero (its norm is computed only while some
  matrix has a zero reference, so an ordinary step pays nothing).
  """
  tiny_ref = ref < jnp.finfo(jnp.float32).eps * low_norm
  zero_ref = ref == 0
  nonzero_g = jax.lax.cond(
      _tree.layer_separable_any(zero_ref),  # each matrix's result is its own either way
      lambda: _frobenius(g) > 0,
      lambda: jnp.zeros(ref.shape, bool),
  )
  return tiny_ref | (zero_ref & nonzero_g)


def _bias_correction(decay: Any, step: jax.Array) -> jax.Array:
  return 1.0 - jnp.asarray(decay, jnp.float32) ** step.astype(jnp.float32)


def _plain_adam(g, mu, nu, step, b1, b2, eps):
  """Adam on a leaf that is not projected, in float32; the update in ``g``'s dtype, the moments in
  theirs."""
  g32 = g.astype(jnp.float32)
  mu32, nu32 = _moments(g32, mu.astype(jnp.float32), nu.astype(jnp.float32), b1, b2)
  u = _adam_direction(mu32, nu32, b1, b2, eps, step)
  return u.astype(g.dtype), mu32.astype(mu.dtype), nu32.astype(nu.dtype)


def _moments(g32, mu32, nu32, b1, b2):
  """Adam's moments updated with ``g32``, all float32."""
  # Not optax.tree.update_moment: it computes (1 - b) * g + b * m, and XLA on CPU contracts the
  # first product of a sum into a fused multiply-add, so the operand order changes the last bits.
  mu32 = b1 * mu32 + (1.0 - b1) * g32
  nu32 = b2 * nu32 + (1.0 - b2) * jnp.square(g32)
  return mu32, nu32


def _adam_direction(mu32, nu32, b1, b2, eps, step):
  """Adam's step from float32 moments, bias-corrected for ``step`` steps (an array: per matrix)."""
  m_hat = optax.tree.bias_correction(mu32, b1, step)
  v_hat = optax.tree.bias_correction(nu32, b2, step)
  return m_hat / (jnp.sqrt(v_hat) + eps)


def _chosen_rank(s, g, width, info_threshold, min_rank):
  """The rank keeping ``info_threshold`` of ``||g||_F^2`` given singular values ``s`` (per matrix),
  clipped to ``[min(min_rank, width), width]``."""
  total = jnp.sum(jnp.square(g), axis=(-2, -1))
  energy = jnp.cumsum(jnp.square(s), axis=-1)
  # Kept energy is compared with a relative tolerance of 1e-5: the singular values and the exact
  # norm are computed differently in float32 and disagree by ~1e-6 of the total, so without it
  # info_threshold=1.0 never stops below max_rank even for an exactly low-rank gradient.
  target = (info_threshold - _ENERGY_RTOL) * total[..., None]
  chosen = 1 + jnp.sum(energy < target, axis=-1)
  return jnp.clip(chosen, jnp.minimum(min_rank, width), width).astype(jnp.int32)


def _transformed_moments(q_new, q_old, mu, nu, count, b1, b2):
  """The moments carried from the basis ``q_old`` into ``q_new`` (LDAdam's rule, see
  :func:`scale_by_adarankgrad`), float32."""
  p = _mT(q_new) @ q_old
  taken = jnp.maximum(count, 1)  # at count 0 the moments are zero anyway
  # Not optax.tree.bias_correction: the corrected moments are multiplied back by the same factors.
  bc1, bc2 = _bias_correction(b1, taken), _bias_correction(b2, taken)
  m_hat, v_hat = mu / bc1, nu / bc2
  variance = jnp.maximum(v_hat - jnp.square(m_hat), 0.0)
  pm_hat = p @ m_hat
  new_mu = pm_hat * bc1
  new_nu = jnp.maximum(jnp.square(p) @ variance + jnp.square(pm_hat), 0.0) * bc2
  return new_mu, new_nu


def _refresh_key(seed, index, count, lay, offset):
  """The key of a refresh of leaf ``index`` at ``count``: one key per matrix of a stack (member ``b``
  of the flattened batch axes), so a layer's sketch is the same whether its stack is updated whole or
  layer by layer (``offset``: this leaf is one layer of a stacked leaf, see make_layerwise_step)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), count)
  if lay.batch or offset is not None:
    members = math.prod(lay.batch)
    ids = jnp.arange(members, dtype=jnp.int32)
    if offset is not None:
      ids = ids + offset * members
    key = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids).reshape(lay.batch)
  return key


def _zeros_placed(leaf):
  """``zeros(shape, dtype, spec)`` placed like ``leaf`` when its placement is known, and the
  placement (a :class:`_Where` or ``None``)."""
  where = _where(leaf)
  if where is None:  # unsharded, or placed later by the partitioner
    return (lambda shape, dtype, spec: jnp.zeros(shape, dtype)), None
  return where.zeros, where


def _init_leaf(leaf, lay, dt):
  """The zero state fields (mu, nu, projector, rank, reference norm, last refresh) of one leaf."""
  zeros, where = _zeros_placed(leaf)
  if lay is None:
    if where is None and isinstance(leaf, jax.core.Tracer):
      mu = _tree.zeros_like_placed(leaf).astype(dt)
    else:
      mu = zeros(leaf.shape, dt, where and where.spec)
    # No arrays at all (not even empty ones, which orbax refuses to save).
    return (mu, mu) + (optax.MaskedNode(),) * 4
  # Moments [*B, R, N] and projector [*B, M, R] are sharded like the parameter's batch axes
  # and its N (resp. M) dimension; R is never sharded.
  big, small = lay.tall
  b, rows, cols = lay.matrix_spec(where.spec) if where else ((), None, None)
  mu = zeros(lay.batch + (lay.rank, small), dt, b + (None, cols))
  return (
      mu,
      mu,
      zeros(lay.batch + (big, lay.rank), dt, b + (rows, None)),
      zeros(lay.batch, jnp.int32, b),
      zeros(lay.batch, jnp.float32, b),
      zeros(lay.batch, jnp.int32, b),
  )


def _check_moment_shapes(updates, leaves, layouts, mus) -> None:
  """A one-line error naming the leaf whose shape changed between ``init`` and ``update``."""
  for path, g, lay, mu in zip(_tree.leaf_paths(updates), leaves, layouts, mus):
    want = g.shape if lay is None else lay.batch + (lay.rank, lay.tall[1])
    if tuple(mu.shape) != tuple(want):
      raise ValueError(
          f"scale_by_adarankgrad: parameter {path!r} has shape {tuple(g.shape)}, which needs "
          f"moments of shape {tuple(want)}, but the state built at init has {tuple(mu.shape)}: "
          "it changed shape between init and update (re-run tx.init)"
      )


def _columns(treedef, fields) -> list[Any]:
  """Per-leaf tuples of state fields as one pytree per field."""
  return [jax.tree_util.tree_unflatten(treedef, list(col)) for col in zip(*fields, strict=True)]


class _AdaRankGrad:
  """The hyperparameters of :func:`scale_by_adarankgrad` and its ``init`` and ``update``."""

  def __init__(self, *, max_rank, min_rank, info_threshold, refresh_threshold, max_refresh_interval,
               oversample, power_iters, scale, b1, b2, eps, seed, moment_transform,
               weight_dimension_numbers, projection_mask, state_dtype, stacks):
    self.max_rank, self.min_rank = max_rank, min_rank
    self.info_threshold, self.refresh_threshold = info_threshold, refresh_threshold
    self.max_refresh_interval = max_refresh_interval
    self.oversample, self.power_iters = oversample, power_iters
    self.scale, self.b1, self.b2, self.eps, self.seed = scale, b1, b2, eps, seed
    self.moment_transform = moment_transform
    self.weight_dimension_numbers, self.projection_mask = weight_dimension_numbers, projection_mask
    self.state_dtype, self.stacks = state_dtype, stacks

  def layouts(self, tree: Any) -> list[_Layout | None]:
    return _layouts(tree, self.weight_dimension_numbers, self.projection_mask, self.max_rank,
                    self.stacks)

  def dtype_of(self, leaf: Any) -> Any:
    return leaf.dtype if self.state_dtype is None else jnp.dtype(self.state_dtype)

  def init(self, params: optax.Params) -> AdaRankGradState:
    count = jnp.zeros([], jnp.int32)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if _tree.is_params_placeholder(params):
      # optax.tree.map_params: the moments have the params' tree structure (with projected leaves
      # of shape [*B, R, N]); the projector (no arrays for plain-Adam leaves), the int32 rank and
      # refresh step and the reference norm are not params-like and must keep their types.
      other = jnp.zeros([], jnp.int32)
      return AdaRankGradState(count, params, params, other, other, other, other)
    if not leaves:
      return AdaRankGradState(count, params, params, params, params, params, params)
    _tree.check_float_leaves(params, "scale_by_adarankgrad")
    fields = [_init_leaf(leaf, lay, self.dtype_of(leaf))
              for leaf, lay in zip(leaves, self.layouts(params), strict=True)]
    return AdaRankGradState(count, *_columns(treedef, fields))

  def needs_refresh(self, low_norm, ref, last, count, g32):
    """Per matrix: the first step, the projected gradient converged, the interval is up, or the
    last refresh saw a negligible gradient."""
    return (
        (count == 0)
        | (low_norm < self.refresh_threshold * ref)
        | (count - last >= self.max_refresh_interval)
        | _negligible_reference(ref, low_norm, g32)
    )

  def refresh(self, key, g, q_old, low_old, mu, nu, rank, ref, last, need, count, q_dtype):
    """New basis, rank, moments and reference norm for the members of ``need``; f32 in and out.

    ``low_old`` is the gradient projected on the old basis, ``Q_old^T G``.
    """
    width = q_old.shape[-1]
    u, s, _ = randomized_svd(key, g, width, oversample=self.oversample, power_iters=self.power_iters)
    chosen = _chosen_rank(s, g, width, self.info_threshold, self.min_rank)
    q_new = jnp.where(jnp.arange(width) < chosen[..., None, None], u, 0.0)
    q_new = q_new.astype(q_dtype).astype(jnp.float32)  # what the next steps will see
    if self.moment_transform:
      new_mu, new_nu = _transformed_moments(q_new, q_old, mu, nu, count, self.b1, self.b2)
    else:
      new_mu = jnp.zeros_like(mu)
      new_nu = jnp.zeros_like(nu)
    # Computed as every later step computes it (not as diag(s) V^T, equal in exact arithmetic):
    # Adam amplifies the rounding differences of near-zero entries.
    low_new = _mT(q_new) @ g
    sel = need[..., None, None]
    return (
        jnp.where(sel, q_new, q_old),
        jnp.where(need, chosen, rank),
        jnp.where(sel, new_mu, mu),
        jnp.where(sel, new_nu, nu),
        jnp.where(sel, low_new, low_old),
        jnp.where(need, _frobenius(low_new), ref),
        jnp.where(need, count, last),
    )

  def projected_adam(self, index, offset, lay, g, mu, nu, q, rank, ref, last, count):
    """Adam on ``Q^T G`` of one projected leaf, refreshing the matrices that need it first."""
    g32 = lay.to_matrix(g).astype(jnp.float32)
    q32, mu32, nu32 = q.astype(jnp.float32), mu.astype(jnp.float32), nu.astype(jnp.float32)
    low = _mT(q32) @ g32
    need = self.needs_refresh(_frobenius(low), ref, last, count, g32)
    key = _refresh_key(self.seed, index, count, lay, offset)
    q32, rank, mu32, nu32, low, ref, last = jax.lax.cond(
        _tree.layer_separable_any(need),  # refresh() keeps every matrix that does not need one
        lambda: self.refresh(key, g32, q32, low, mu32, nu32, rank, ref, last, need, count, q.dtype),
        lambda: (q32, rank, mu32, nu32, low, ref, last),
    )
    mu32, nu32 = _moments(low, mu32, nu32, self.b1, self.b2)
    if self.moment_transform:
      step = optax.safe_increment(count)
    else:
      step = (optax.safe_increment(count) - last)[..., None, None]
    direction = _adam_direction(mu32, nu32, self.b1, self.b2, self.eps, step)
    u = lay.from_matrix(self.scale * (q32 @ direction)).astype(g.dtype)
    return u, mu32.astype(mu.dtype), nu32.astype(nu.dtype), q32.astype(q.dtype), rank, ref, last

  def update_leaf(self, i, offset, lay, g, fields, count, step):
    """The update and new state fields of leaf ``i``, placed like the old ones."""
    mu, nu, q, rank, ref, last = fields
    if lay is None:
      u, mu, nu = map(_keep_placement, _plain_adam(g, mu, nu, step, self.b1, self.b2, self.eps),
                      (g, mu, nu))
      return u, (mu, nu, q, rank, ref, last)
    args = (g, mu, nu, q, rank, ref, last)
    fn = functools.partial(self.projected_adam, i, offset, lay)
    if any(w is not None and w.in_types for w in map(_where, args)):
      # Sharding in types (an Explicit mesh): typed matrix products contracting a sharded
      # dimension need an output sharding, and the QR of the sketch needs unsharded rows, so
      # the linear algebra runs with the mesh axes automatic (the partitioner then moves thin
      # panels, never a whole matrix) and every output gets the type of the input it replaces.
      fn = jax.sharding.auto_axes(fn, out_sharding=tuple(jax.typeof(x).sharding for x in args))
    u, *new = map(_keep_placement, fn(*args, count), args)
    return u, tuple(new)

  def update(self, updates, state, params=None, **extra_args):
    layer_slice = extra_args.get(_tree.LAYER_SLICE_ARG)
    if params is not None:
      _tree.check_same_structure("scale_by_adarankgrad", updates, "grads", params, "params")
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    if not leaves:
      return updates, state._replace(count=optax.safe_increment(state.count))
    count = state.count
    step = optax.safe_increment(count)
    _tree.check_same_structure(
        "scale_by_adarankgrad", updates, "grads", state.mu, "the state's moments (from init)")
    per_field = [treedef.flatten_up_to(f) for f in state[1:]]
    layouts = self.layouts(updates)
    _check_moment_shapes(updates, leaves, layouts, per_field[0])
    out_updates, out_fields = [], []
    for i, (g, lay, *fields) in enumerate(zip(leaves, layouts, *per_field, strict=True)):
      offset = layer_slice[1] if lay is not None and layer_slice is not None and layer_slice[0][i] else None
      u, new = self.update_leaf(i, offset, lay, g, fields, count, step)
      out_updates.append(u)
      out_fields.append(new)
    return (
        jax.tree_util.tree_unflatten(treedef, out_updates),
        AdaRankGradState(step, *_columns(treedef, out_fields)),
    )


def scale_by_adarankgrad(
    *,
    max_rank: int = 128,
    min_rank: int | None = None,
    info_threshold: float = 0.9,
    refresh_threshold: float = 0.5,
    max_refresh_interval: int = 200,
    oversample: int = 8,
    power_iters: int = 1,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
    moment_transform: bool = True,
    weight_dimension_numbers: Any = None,
    projection_mask: Any = "layers",
    state_dtype: Any = None,
    stacks: str | tuple[str, ...] | dict[str, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale updates with Adam run on adaptively low-rank projections of the gradients.

  Each projected weight is viewed as a matrix :math:`G \in \mathbb{R}^{M \times N}`, transposed if
  needed so that :math:`M \ge N`, and carries an orthonormal basis :math:`Q \in \mathbb{R}^{M
  \times r}`. Adam runs on the projected gradient and its step is mapped back:

  .. math::
    \tilde G_t = Q^\top G_t,\quad m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde G_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde G_t^{2},\quad
    u_t = \alpha\, Q \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}.

  Projecting the long side (:math:`Q` is :math:`M \times r`) keeps moments of :math:`r \times N`,
  :math:`N = \min(m, n)`; the state per matrix is :math:`r(M + 2N)` numbers against
  :math:`r(N + 2M)` for the other side, so this side is never worse (the same choice as
  ``optax.contrib.galore``).

  **Subspace refresh.** A matrix's basis is recomputed at the first step, when the optimisation
  inside it has converged, :math:`\|Q^\top G_t\|_F < \tau\,\|Q^\top G_{t_0}\|_F` (:math:`t_0` the
  last refresh, :math:`\tau` = ``refresh_threshold``), or after ``max_refresh_interval`` steps,
  whichever comes first. Each matrix decides on its own inside ``jax.lax.cond``; for a leaf that
  stacks several matrices (batch axes) the randomized SVD runs for the whole stack when any member
  needs it, and only the members that need a refresh take it. A refresh that saw a zero gradient
  (the layers before a zero-initialised output get one at step 0) chose an arbitrary subspace and
  stored a reference of 0, so the matrix is refreshed again at the first step whose gradient is
  nonzero (or more than ``1 / eps`` of float32 above a tiny reference).

  **Adaptive rank.** At a refresh, a randomized SVD :math:`G \approx U \operatorname{diag}(s)
  V^\top` of width ``max_rank`` (see :func:`optax_memopt.randomized_svd`) gives the rank
  :math:`r = \min\{k : \sum_{i \le k} s_i^2 \ge (\eta - 10^{-5}) \|G\|_F^2\}` clipped to
  ``[min_rank, max_rank]`` (:math:`\eta` = ``info_threshold``, :math:`\|G\|_F` computed exactly;
  the :math:`10^{-5}` absorbs float32 rounding, so :math:`\eta = 1` finds an exact low rank). Buffers
  always have width ``R = min(max_rank, N)``, so shapes are static and there is one compilation;
  columns of :math:`Q` from :math:`r` on are exactly zero, so the matching moment rows stay zero.

  **Moment transformation.** With :math:`P = Q_\text{new}^\top Q_\text{old}` and the
  bias-corrected moments :math:`\hat m = m / (1-\beta_1^t)`, :math:`\hat v = v / (1-\beta_2^t)`
  (:math:`t` the steps taken so far), the moments are carried into the new basis as

  .. math::
    m \leftarrow P m, \qquad
    \hat v \leftarrow (P \circ P) \max(\hat v - \hat m^2, 0) + (P \hat m)^2,

  i.e. the (clipped, non-negative) variance is mapped with the element-wise square of :math:`P`
  and the mean's square is added back (the rule of LDAdam; the paper's :math:`v \leftarrow Pv`
  can turn negative). The result is non-negative by construction; Adam's global step count, and
  so its bias correction, carries on. With ``moment_transform=False`` the moments of a refreshed
  matrix are reset to zero and its bias correction restarts from the refresh (per matrix).

  Leaves that are not projected (vectors, scalars, and whatever ``weight_dimension_numbers`` or
  ``projection_mask`` leaves out) get plain Adam, without ``scale``.

  **Sharding.** On a device mesh the state follows the parameters: the projector ``[*B, M, R]`` is
  sharded like the parameter's batch axes and its M dimension, the moments ``[*B, R, N]`` like its
  batch axes and N, R never (a dimension merged from several axes keeps the mesh axes of its leading
  axis if that is the only sharded one, else it is replicated); plain-Adam moments are sharded like
  their parameter. ``init`` reads the placement from concrete sharded arrays or from the types
  under an Explicit mesh (``jax.set_mesh``); under ``jax.jit`` on an automatic mesh pass the state's
  shardings as ``out_shardings``. An update keeps them and moves no whole matrix between devices:
  the randomized SVD of a refresh communicates thin ``[M, l]`` / ``[N, l]`` / ``[l, N]`` panels
  (``l = max_rank + oversample``), a step without refresh only all-reduces :math:`Q^\top G`.

  **What is projected by default** (``projection_mask="layers"``): the matrices inside the model's
  layers (a list of layers or a layer stack, recognised by name and shape as by
  :func:`optax_memopt.block_labels`); the embeddings, the output or task head and every other leaf
  outside the layers get plain Adam, as in the papers (GaLore and AdaRankGrad project the
  attention and MLP matrices). Parameters without recognisable layers have every matrix
  projected (``projection_mask=None`` always does that). This default is what keeps AdaRankGrad
  from stalling: a randomly initialised embedding's gradient touches only the batch's tokens and
  is not low-rank, so a low-rank subspace cannot train it; in ``benchmarks/adarankgrad_ablation.py``
  (the examples' RoBERTa classifier) projecting the embeddings too, at any rank, ended at the
  majority class, while projecting only the layers learns.

  **Rank floor** (``min_rank=None``: half of ``max_rank``). The layers' gradients of the same
  classifier are concentrated too: ``info_threshold`` alone keeps very small ranks, with which
  some seeds of the ablation still ended at the majority class. The information threshold still
  adapts the rank between the floor and ``max_rank``; since the state is ``max_rank`` wide
  whatever the effective rank, the floor costs no memory (only the projections' flops of the extra
  columns). The ablation's figures are in ``benchmarks/RESULTS.md``.

  Other defaults that the paper does not publish are our choices: ``info_threshold=0.9`` (keep 90%
  of the gradient's energy: gradients of trained layers are dominated by a few directions, so
  this gives small ranks without dropping the bulk of the signal), ``refresh_threshold=0.5``
  (refresh once half of the projected gradient norm has been optimised away, well above
  step-to-step noise), ``oversample=8`` and ``power_iters=1`` (the usual randomized-SVD settings:
  with one power iteration the leading subspace of a decaying spectrum is found to a few
  percent). The ablation measures them on the examples' tasks (see its table in
  ``benchmarks/RESULTS.md``).

  Args:
    max_rank: Largest rank (buffer width) of a projection. Static.
    min_rank: Smallest rank chosen at a refresh. Static. Default ``None``: ``max_rank // 2``
      (at least 1), see above.
    info_threshold: Fraction :math:`\eta \in (0, 1]` of :math:`\|G\|_F^2` the chosen rank keeps.
    refresh_threshold: Ratio :math:`\tau \in (0, 1]` of the projected gradient norm to its value
      at the last refresh below which the subspace is refreshed.
    max_refresh_interval: A subspace is refreshed at least every this many steps.
    oversample: Extra columns of the randomized range finder's sketch. Static.
    power_iters: Power iterations of the randomized range finder. Static.
    scale: Factor :math:`\alpha` applied to the updates of projected weights (as GaLore's scale).
    b1: Adam's decay rate for the first moment.
    b2: Adam's decay rate for the second moment.
    eps: Adam's term added to the denominator.
    seed: Seed of the random sketches; the key of each refresh is derived from it, the leaf index
      and the step count (and, for a stack of matrices, the matrix's index in it, so that a layer
      draws the same sketch whether its stack is updated whole or layer by layer by
      :func:`optax_memopt.make_layerwise_step`), so runs (and resumed runs) are reproducible.
    moment_transform: Carry moments into the new basis at a refresh (``True``) or reset them.
    weight_dimension_numbers: ``None`` (project every 2-D leaf, and each layer of a layer stack on
      its own: a stacked ``[L, m, n]`` leaf is ``L`` matrices with batch axis 0 (``[m, L, n]`` in a
      stack scanned on axis 1: batch axis 1), a stacked ``[L, d]`` (``[d, L]``) leaf ``L`` vectors
      with plain Adam; stacks are recognised as by
      :func:`optax_memopt.block_labels`), one
      :class:`AdaRankGradDimensionNumbers` for every leaf with at least 2 dimensions, a pytree of
      them (``None`` for a leaf means plain Adam), or a callable from params to such a pytree.
    projection_mask: ``"layers"`` (the default: only leaves inside the model's layers are
      projected, see above; with a pytree or callable ``weight_dimension_numbers`` those choose),
      ``None`` (every leaf the dimension numbers allow), a pytree of bools with the structure of
      the params, or a callable returning one; ``False`` leaves get plain Adam.
    state_dtype: Dtype of the moments and projectors; ``None`` uses each parameter's dtype (the
      linear algebra always runs in float32).
    stacks: The layer stacks' subtree paths, or ``{path: layer axis}``, as in
      :func:`optax_memopt.block_labels` (static): ``None`` recognises them by name and shape, ``()``
      takes no leaf for a stack.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`AdaRankGradState`.

  Raises:
    ValueError: for ``max_rank < 1``, ``min_rank < 1``, ``min_rank > max_rank``, thresholds
      outside ``(0, 1]``, or dimension numbers that do not fit a parameter.
    TypeError: at ``init``, for a non-float parameter (the message names its path).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optax_memopt import effective_ranks, scale_by_adarankgrad
    >>> u = jax.random.normal(jax.random.key(0), (32, 2))
    >>> v = jax.random.normal(jax.random.key(1), (2, 16))
    >>> grads = {'w': u @ v, 'b': jnp.ones((16,))}  # the matrix has rank 2
    >>> tx = scale_by_adarankgrad(max_rank=8, min_rank=1)  # no rank floor
    >>> state = tx.init(grads)
    >>> updates, state = tx.update(grads, state)
    >>> print(updates['w'].shape, effective_ranks(state))
    (32, 16) {'w': Array(2, dtype=int32)}

  References:
    Refael et al., `AdaRankGrad: Adaptive Gradient-Rank and Moments for Memory-Efficient LLMs
    Training and Fine-Tuning <https://arxiv.org/abs/2410.17881>`_, ICLR 2025.

    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
    <https://arxiv.org/abs/2403.03507>`_, 2024.

    Robert et al., `LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics
    <https://arxiv.org/abs/2410.16103>`_, 2024.
  """
  if min_rank is None:  # the default rank floor: half of the maximum rank
    min_rank = max(1, max_rank // 2) if _is_concrete(max_rank) else 1
  _validate(
      max_rank, min_rank, info_threshold, refresh_threshold, max_refresh_interval, oversample,
      power_iters,
  )
  if isinstance(projection_mask, str) and projection_mask != "layers":
    raise ValueError(
        f"projection_mask must be 'layers', None, a pytree of bools or a callable, got "
        f"{projection_mask!r}."
    )
  tx = _AdaRankGrad(
      max_rank=max_rank, min_rank=min_rank, info_threshold=info_threshold,
      refresh_threshold=refresh_threshold, max_refresh_interval=max_refresh_interval,
      oversample=oversample, power_iters=power_iters, scale=scale, b1=b1, b2=b2, eps=eps, seed=seed,
      moment_transform=moment_transform, weight_dimension_numbers=weight_dimension_numbers,
      projection_mask=projection_mask, state_dtype=state_dtype, stacks=stacks,
  )
  return optax.GradientTransformationExtraArgs(tx.init, tx.update)


def adarankgrad(
    learning_rate: optax.ScalarOrSchedule,
    *,
    max_rank: int = 128,
    min_rank: int | None = None,
    info_threshold: float = 0.9,
    refresh_threshold: float = 0.5,
    max_refresh_interval: int = 200,
    oversample: int = 8,
    power_iters: int = 1,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
    moment_transform: bool = True,
    weight_dimension_numbers: Any = None,
    projection_mask: Any = "layers",
    state_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
    stacks: str | tuple[str, ...] | dict[str, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaRankGrad: memory-efficient Adam(W) on adaptively low-rank projected gradients.

  ``chain(scale_by_adarankgrad(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``: the step of :func:`scale_by_adarankgrad` (Adam on
  :math:`Q^\top G` mapped back by :math:`Q`, with a rank chosen per matrix to keep a fraction
  ``info_threshold`` of :math:`\|G\|_F^2`, subspaces refreshed when the projected gradient has
  shrunk below ``refresh_threshold`` of its value at the last refresh or every
  ``max_refresh_interval`` steps, and moments carried into the new basis), plus decoupled weight
  decay applied in the full parameter space as in AdamW:

  .. math::
    w_{t+1} = w_t - \gamma_t \left(u_t + \lambda w_t\right).

  For the optimizer-state memory, a projected ``m x n`` weight costs :math:`r(\max(m,n) + 2
  \min(m,n))` numbers at rank ``max_rank`` instead of Adam's :math:`2mn`. The whole gradient still
  exists between ``jax.grad`` and ``tx.update``; :func:`optax_memopt.make_layerwise_step` (a layer
  stack run by :func:`optax_memopt.scan_layers`) applies this optimizer inside the backward pass,
  one layer at a time, so that no gradient larger than one layer's exists.

  Args:
    learning_rate: A fixed learning rate or a schedule.
    max_rank: Largest rank of a projection (static; see :func:`scale_by_adarankgrad`).
    min_rank: Smallest rank chosen at a refresh (static); default half of ``max_rank``.
    info_threshold: Fraction of the gradient's squared Frobenius norm the chosen rank keeps.
    refresh_threshold: Projected-gradient norm ratio below which a subspace is refreshed.
    max_refresh_interval: Maximum number of steps between refreshes.
    oversample: Extra sketch columns of the randomized SVD (static).
    power_iters: Power iterations of the randomized SVD (static).
    scale: Factor applied to the updates of projected weights.
    b1: Adam's decay rate for the first moment.
    b2: Adam's decay rate for the second moment.
    eps: Adam's term added to the denominator.
    seed: Seed of the random sketches (static).
    moment_transform: Carry moments into the new basis at a refresh, or reset them (static).
    weight_dimension_numbers: Which axes of each weight form its matrix (static; see
      :func:`scale_by_adarankgrad`).
    projection_mask: Which leaves are projected; the others get plain Adam (static). Default
      ``"layers"``: the matrices inside the model's layers, not the embeddings or heads.
    state_dtype: Dtype of moments and projectors; ``None`` for the parameters' dtype.
    weight_decay: Strength of the decoupled weight decay.
    mask: Which leaves get weight decay (a pytree of bools or a callable), as in
      ``optax.adamw``.
    stacks: The layer stacks' subtree paths (or ``{path: layer axis}``, e.g. ``{'decoder/layers':
      1}`` for Linen's ``nn.scan(..., variable_axes={'params': 1})``) when the guess cannot find
      them (static; see :func:`optax_memopt.block_labels`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Under ``optax.inject_hyperparams`` pass the arguments that fix shapes or Python control flow as
  ``static_args``, e.g. ``optax.inject_hyperparams(adarankgrad, static_args=('max_rank',
  'min_rank', 'oversample', 'power_iters', 'seed', 'max_refresh_interval'))``; booleans are
  static automatically.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optax_memopt import adarankgrad, effective_ranks
    >>> target = jnp.outer(jnp.arange(1.0, 9.0), jnp.ones(6))
    >>> loss = lambda p: jnp.sum((p['w'] - target) ** 2) + jnp.sum(p['b'] ** 2)
    >>> params = {'w': jnp.zeros((8, 6)), 'b': jnp.ones((6,))}
    >>> tx = adarankgrad(0.3, max_rank=4, min_rank=1)  # no rank floor
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    >>> print(f'{loss(params):.1f}')
    1230.0
    >>> for _ in range(200):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> print(loss(params) < 1e-3, effective_ranks(state))
    True {'w': Array(1, dtype=int32)}

  References:
    Refael et al., `AdaRankGrad: Adaptive Gradient-Rank and Moments for Memory-Efficient LLMs
    Training and Fine-Tuning <https://arxiv.org/abs/2410.17881>`_, ICLR 2025.

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return optax.chain(
      scale_by_adarankgrad(
          max_rank=max_rank,
          min_rank=min_rank,
          info_threshold=info_threshold,
          refresh_threshold=refresh_threshold,
          max_refresh_interval=max_refresh_interval,
          oversample=oversample,
          power_iters=power_iters,
          scale=scale,
          b1=b1,
          b2=b2,
          eps=eps,
          seed=seed,
          moment_transform=moment_transform,
          weight_dimension_numbers=weight_dimension_numbers,
          projection_mask=projection_mask,
          state_dtype=state_dtype,
          stacks=stacks,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _unwrap(x: Any) -> Any:
  """The array inside a Flax NNX ``Variable`` (as under ``nnx.Optimizer``), else ``x``."""
  if hasattr(x, "get_value"):
    return x.get_value()
  return x


def effective_ranks(opt_state: Any) -> dict[str, jax.Array]:
  """Current rank of every projected matrix, by dotted parameter path.

  Finds every :class:`AdaRankGradState` inside ``opt_state`` (a bare state, or one nested in
  ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``, ``optax.apply_if_finite``
  or ``flax.nnx.Optimizer`` states). Leaves trained with plain Adam are omitted. A leaf holding a
  stack of matrices gives an int32 array of ranks, one per matrix.

  Args:
    opt_state: An optimizer state containing AdaRankGrad.

  Returns:
    A dict from parameter path (as ``optax_memopt._tree.path_str``) to int32 rank arrays.

  Raises:
    ValueError: if ``opt_state`` contains no :class:`AdaRankGradState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optax_memopt import adarankgrad, effective_ranks
    >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.ones((3,))}
    >>> state = optax.MultiSteps(adarankgrad(1e-3, max_rank=2), 2).init(params)
    >>> effective_ranks(state)
    {'w': Array(0, dtype=int32)}
  """
  found = _tree.find_states(opt_state, AdaRankGradState)
  if not found:
    raise ValueError("effective_ranks: no AdaRankGradState found in the optimizer state.")
  ranks: dict[str, jax.Array] = {}
  for state in found:
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.rank)[0]:
      ranks[_tree.path_str(path)] = _unwrap(leaf)
  return ranks
