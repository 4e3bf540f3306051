"""Small pytree helpers shared by the optimizers: key paths as dotted strings, dtype checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Extra argument of ``tx.update`` under :func:`optax_memopt.make_layerwise_step`: ``(mask, layer)``
# where ``mask`` has one bool per leaf of the updates (True: the leaf is layer ``layer`` of a layer
# stack, seen as a stack of one: leading axis of length 1) and ``layer`` is an int32 scalar.
# Transformations that draw random numbers per matrix (AdaRankGrad's sketches) use it to draw for a
# layer what they draw for that member of the stacked leaf; every other transformation ignores it.
LAYER_SLICE_ARG = "optax_memopt_layer_slice"


def layer_separable_any(x: jax.Array) -> jax.Array:
  """``jnp.any(x)`` as the predicate of a ``lax.cond`` that only skips work: each entry's result is
  the same whether the branch runs for it or not (e.g. a refresh applied with ``jnp.where(need, ...)``
  per matrix). :func:`optax_memopt.make_layerwise_step` checks that no update reduces over a stacked
  leaf's layer axis; this reduction, recognised by its name in the jaxpr, is not counted."""
  return _layer_separable_any(x)


def _any(x: jax.Array) -> jax.Array:
  return jnp.any(x)


_any.__name__ = LAYER_SEPARABLE_ANY = "optax_memopt_layer_separable_any"
_layer_separable_any = jax.jit(_any)


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(getattr(key, "key", key))


def path_str(path: tuple[Any, ...]) -> str:
  """Dotted key path, e.g. ``model.layers.3.mlp.kernel``.

  Flax NNX's trailing ``value`` (the attribute holding a ``Variable``'s array) is dropped, so the
  same parameter has the same name in a plain dict, an ``nnx.State`` and under ``nnx.Optimizer``.
  """
  parts = [_key_name(k) for k in path]
  if len(parts) > 1 and parts[-1] in ("value", "raw_value"):
    parts = parts[:-1]
  return ".".join(parts)


def leaf_paths(tree: Any) -> list[str]:
  """Dotted key paths of the leaves of ``tree``, in ``jax.tree_util`` leaf order."""
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [path_str(p) for p, _ in leaves_with_path]


def is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, jnp.floating)


def check_float_leaves(tree: Any, what: str, only: list[bool] | None = None) -> None:
  """Raises ``TypeError`` naming the first non-float leaf of ``tree`` (optionally of ``only``)."""
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  for i, (path, leaf) in enumerate(leaves_with_path):
    if only is not None and not only[i]:
      continue
    if not is_float(leaf):
      raise TypeError(
          f"{what}: parameter {path_str(path)!r} has dtype {leaf.dtype}; only floating-point "
          "parameters can be optimized (freeze it or exclude it with a mask)."
      )


def is_params_placeholder(params: Any) -> bool:
  """True for the stand-in object ``optax.tree.map_params`` passes to ``init``."""
  return type(params).__name__ == "_ParamsPlaceholder"


def zeros_like_placed(x: jax.Array) -> jax.Array:
  """Zeros shaped, typed and (under ``jax.jit`` on a device mesh) sharded like ``x``.

  ``jnp.zeros_like`` inside ``jax.jit`` is a constant with no tie to ``x``, so automatic sharding
  replicates it; selecting against ``x`` lets the partitioner give it ``x``'s sharding (XLA folds the
  select away).
  """
  return jnp.where(False, x, jnp.zeros((), x.dtype))


def find_states(opt_state: Any, kinds: type | tuple[type, ...]) -> list[Any]:
  """The states of type ``kinds`` inside ``opt_state``, outermost first, in leaf order.

  Looks through any wrapper (``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``,
  ``optax.apply_if_finite``, ``optax.multi_transform``, ...); a state found is not searched further
  (a state nested inside it is not listed).
  """
  # Not optax.tree_utils.tree_get_all_with_path(opt_state, name): it matches NamedTuples by class
  # name rather than type, and also lists states nested inside a state it found.
  is_kind = lambda x: isinstance(x, kinds)  # noqa: E731
  return [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_kind) if is_kind(s)]


def check_same_structure(what: str, tree: Any, name: str, like: Any, like_name: str) -> None:
  """Raises a one-line ``ValueError`` naming the first leaf path where ``tree`` and ``like`` differ."""
  if jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(like):
    return
  paths, like_paths = leaf_paths(tree), leaf_paths(like)
  only = [p for p in paths if p not in set(like_paths)]
  like_only = [p for p in like_paths if p not in set(paths)]
  if only:
    detail = f"{name} have {only[0]!r}, which {like_name} have not"
  elif like_only:
    detail = f"{like_name} have {like_only[0]!r}, which {name} have not"
  else:
    detail = f"same paths, different containers ({len(paths)} leaves)"
  raise ValueError(f"{what}: {name} and {like_name} must have the same tree structure; {detail}")
