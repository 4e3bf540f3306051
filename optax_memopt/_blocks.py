"""Partitioning a parameter pytree into blocks for block coordinate descent.

A partition is a pytree of ``int`` block ids with the structure of the params: ``0 .. D-1`` for the
blocks, ``-1`` for frozen leaves. :func:`block_labels` infers the usual one-block-per-transformer-layer
partition from key paths; :func:`resolve_blocks` turns every accepted ``blocks=`` spec into a flat list
of ids (one per leaf, in ``jax.tree_util`` order) and validates it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from optax_memopt._tree import leaf_paths

# A path component naming a list of layers followed by the index (`layers.3`, `h.3`, `blocks.3`), or
# the Linen-style `layers_3`.
_INDEX = re.compile(r"^\d+$")
_SUFFIX_INDEX = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z][A-Za-z0-9]*)*)_(?P<idx>\d+)$")
_EMBEDDING = re.compile(
    r"(^|[._])(embed\w*|embeddings?|wte|wpe|tok_embeddings|word_embeddings|position_embeddings"
    r"|token_type_embeddings|embed_tokens|embedder)($|[._])",
    re.IGNORECASE,
)

BlockSpec = Any  # None | label pytree | Callable[[params], labels] | Sequence[str] of regexes


def _layer_key(path: str) -> tuple[str, int] | None:
  """(container path, layer index) of the first layer-index component in a dotted path."""
  parts = path.split(".")
  for i, part in enumerate(parts):
    if i > 0 and _INDEX.match(part):
      return ".".join(parts[:i]), int(part)
    m = _SUFFIX_INDEX.match(part)
    if m:
      return ".".join(parts[:i] + [m.group("name")]), int(m.group("idx"))
  return None


def block_labels(
    params: Any, *, include_embedding: bool = False, include_lm_head: bool = False
) -> Any:
  """Infers one block per transformer layer from the key paths of ``params``.

  Layers are recognised by an integer path component after a container (``model.layers.3.mlp``,
  ``h.3``, ``blocks[3]``) or a Linen-style suffix (``layers_3``); NNX's trailing ``.value`` is
  ignored. Blocks are numbered from the input to the output: the embedding block (when included),
  then the layers in index order (several layer stacks, e.g. an encoder and a decoder, in order of first
  appearance), then one head block (everything after the layers that is not an embedding: final norm,
  ``lm_head``, classifier; when included). A tree without any layer structure gets one block per
  top-level entry, and a single array is one block.

  Args:
    params: any pytree of arrays (dicts, lists, ``nnx.State``, ``jax.ShapeDtypeStruct`` leaves).
    include_embedding: train the embedding (token and position embeddings) as a block of its own.
    include_lm_head: train the output head and final norm as a block of their own.

  Returns:
    A pytree with the structure of ``params`` whose leaves are ``int`` block ids, ``-1`` for frozen
    leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_memopt
    >>> params = {'embed': jnp.zeros((10, 4)),
    ...           'layers': [{'w': jnp.zeros((4, 4))}, {'w': jnp.zeros((4, 4))}],
    ...           'lm_head': jnp.zeros((4, 10))}
    >>> optax_memopt.block_labels(params)
    {'embed': -1, 'layers': [{'w': 0}, {'w': 1}], 'lm_head': -1}
    >>> optax_memopt.block_labels(params, include_embedding=True, include_lm_head=True)
    {'embed': 0, 'layers': [{'w': 1}, {'w': 2}], 'lm_head': 3}
  """
  paths = leaf_paths(params)
  treedef = jax.tree_util.tree_structure(params)
  keys = [_layer_key(p) for p in paths]
  if not any(k is not None for k in keys):
    return jax.tree_util.tree_unflatten(treedef, _top_level_blocks(paths))

  containers: list[str] = []
  for k in keys:
    if k is not None and k[0] not in containers:
      containers.append(k[0])
  layer_ids = sorted({(containers.index(k[0]), k[1]) for k in keys if k is not None})
  offset = 1 if include_embedding and any(
      k is None and _EMBEDDING.search(p) for k, p in zip(keys, paths)) else 0
  layer_block = {lk: offset + i for i, lk in enumerate(layer_ids)}
  head_block = offset + len(layer_ids)

  labels = []
  for k, p in zip(keys, paths):
    if k is not None:
      labels.append(layer_block[(containers.index(k[0]), k[1])])
    elif _EMBEDDING.search(p):
      labels.append(0 if include_embedding else -1)
    else:
      labels.append(head_block if include_lm_head else -1)
  return jax.tree_util.tree_unflatten(treedef, labels)


def _top_level_blocks(paths: list[str]) -> list[int]:
  tops: list[str] = []
  for p in paths:
    top = p.split(".")[0]
    if top not in tops:
      tops.append(top)
  return [tops.index(p.split(".")[0]) for p in paths]


def _regex_labels(patterns: Sequence[str], paths: list[str]) -> list[int]:
  labels = [-1] * len(paths)
  for b, pattern in enumerate(patterns):
    try:
      regex = re.compile(r"(?:^|\.)(?:" + pattern + r")(?:\.|$)")
    except re.error as e:
      raise ValueError(f"blocks: {pattern!r} is not a valid regular expression: {e}") from None
    hits = [i for i, p in enumerate(paths) if regex.search(p)]
    if not hits:
      raise ValueError(
          f"blocks: the expression {pattern!r} matches no parameter; parameter paths look like "
          f"{paths[:3]}"
      )
    for i in hits:
      if labels[i] == -1:  # the first expression that matches a leaf owns it
        labels[i] = b
  for b, pattern in enumerate(patterns):
    if b not in labels:
      raise ValueError(
          f"blocks: every parameter matched by {pattern!r} is already claimed by an earlier "
          "expression, so its block would be empty"
      )
  return labels


def resolve_blocks(blocks: BlockSpec, tree: Any) -> list[int]:
  """Flat block ids (one per leaf of ``tree``) for any ``blocks=`` spec; validated.

  Raises:
    ValueError: the spec matches no parameter, leaves a block id empty, or does not fit the tree.
    TypeError: the spec is of an unsupported kind.
  """
  paths = leaf_paths(tree)
  n = len(paths)
  if n == 0:
    raise ValueError("blocks: the parameter tree has no leaves")
  if blocks is None:
    labels = jax.tree_util.tree_leaves(block_labels(tree))
  elif isinstance(blocks, str):
    raise TypeError(
        "blocks: a single string is ambiguous; pass a list of regular expressions, e.g. "
        f"[{blocks!r}]"
    )
  elif isinstance(blocks, Sequence) and blocks and all(isinstance(b, str) for b in blocks):
    labels = _regex_labels(blocks, paths)
  elif callable(blocks):
    labels = jax.tree_util.tree_leaves(blocks(tree))
  else:
    labels = jax.tree_util.tree_leaves(blocks)

  if len(labels) != n:
    raise ValueError(
        f"blocks: the label tree has {len(labels)} leaves but the parameters have {n}; it must "
        "have the structure of the parameters"
    )
  for path, x in zip(paths, labels):
    _check_label(path, x)
  try:
    labels = [int(x) for x in labels]
  except (TypeError, ValueError):
    raise TypeError("blocks: labels must be integers (block ids, -1 for frozen)") from None
  if any(x < -1 for x in labels):
    raise ValueError("blocks: block ids must be >= 0, or -1 for frozen leaves")
  used = sorted(set(labels) - {-1})
  if not used:
    raise ValueError(
        "blocks: the block spec matches no parameter (every leaf is frozen); parameter paths look "
        f"like {paths[:3]}. Pass include_embedding/include_lm_head, regexes, or a label tree."
    )
  missing = sorted(set(range(used[-1] + 1)) - set(used))
  if missing:
    raise ValueError(f"blocks: block ids must be 0..{used[-1]} without gaps; no leaf has {missing}")
  return labels


def _check_label(path: str, label: Any) -> None:
  """Raises ``TypeError`` unless ``label`` is an integer (Python, NumPy or JAX; an integer array is
  accepted, a float never: ``0.5`` must not silently become block 0)."""
  if isinstance(label, bool):
    bad = True
  elif isinstance(label, int):
    bad = False
  else:
    dtype = getattr(label, "dtype", None)
    bad = dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.integer)
  if bad:
    raise TypeError(
        f"blocks: labels must be integers (block ids, -1 for frozen); parameter {path!r} has "
        f"{label!r}"
    )


def num_blocks(labels: list[int]) -> int:
  return max(labels) + 1


def group_leaves(
    labels: list[int], groups: list[str], shapes: list[tuple[int, ...]], dtypes: list[Any]
) -> tuple[dict[str, list[tuple[tuple[int, ...], Any]]], list[tuple[str, int] | None]]:
  """Plans the slot: per-group positions that can hold the leaves of any one block.

  Leaves of like shape, dtype and group share a slot position across blocks, so a partition of
  identical layers needs exactly one block's worth of positions; unlike blocks need the union of
  their (shape, dtype) multisets, position by position the largest count over the blocks.

  Returns:
    ``(slot, where)``: ``slot[group]`` lists the (shape, dtype) of each position; ``where[i]`` is
    ``(group, position)`` of leaf ``i`` in its block's slot, or ``None`` for frozen leaves.
  """
  d = num_blocks(labels)
  slot: dict[str, list[tuple[tuple[int, ...], Any]]] = {}
  where: list[tuple[str, int] | None] = [None] * len(labels)
  for b in range(d):
    taken: dict[str, set[int]] = {}
    for i, lab in enumerate(labels):
      if lab != b:
        continue
      g = groups[i]
      positions = slot.setdefault(g, [])
      used = taken.setdefault(g, set())
      sig = (tuple(shapes[i]), dtypes[i])
      pos = next((j for j, s in enumerate(positions) if s == sig and j not in used), None)
      if pos is None:
        positions.append(sig)
        pos = len(positions) - 1
      used.add(pos)
      where[i] = (g, pos)
  return slot, where


def as_callable_mask(mask: Any) -> Callable[[Any], Any] | None:
  if mask is None or callable(mask):
    return mask
  return lambda _: mask
