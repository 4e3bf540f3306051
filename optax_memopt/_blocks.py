"""Partitioning a parameter pytree into blocks for block coordinate descent.

A partition is a pytree with the structure of the params whose leaves are *labels*: an ``int`` block
id for a whole leaf (``0 .. D-1``, ``-1`` frozen, ``-2`` always active: trained at every step whatever
the active block), or, for a stacked leaf ``[L, ...]`` (a layer stack
run by a scan), a 1-D integer array or list/tuple of ``L`` ids, one per slice along the leading
axis. :func:`block_labels` infers the usual one-block-per-transformer-layer partition from the
layers :mod:`optax_memopt._stacks` recognises (lists of layers and layer stacks alike);
:func:`resolve_blocks` turns every
accepted ``blocks=`` spec into a flat list of labels (one per leaf, in ``jax.tree_util`` order:
``int`` or ``tuple[int, ...]``) and validates it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from optax_memopt import _stacks
from optax_memopt._stacks import StackLabels, label_axis
from optax_memopt._tree import leaf_paths

BlockSpec = Any  # None | label pytree | Callable[[params], labels] | Sequence[str] of regexes
# None | pytree of bools | Callable[[params], bools] | Sequence[str] of regexes
AlwaysActiveSpec = Any
# One block id for a whole leaf, or one per slice of its layer axis (a tuple: axis 0; StackLabels: any).
Label = int | tuple[int, ...]
FROZEN = -1
# The label of a leaf trained at every step whatever the active block (a whole leaf only).
ALWAYS_ACTIVE = -2



def _per_slice(ids: Sequence[int], axis: int) -> tuple[int, ...]:
  return tuple(ids) if axis == 0 else StackLabels(ids, axis)


def _default_labels(
    params: Any, include_embedding: bool, include_lm_head: bool, stacks: Any
) -> list[Label]:
  paths, _, listed, stacked = _stacks.find_layers(params, stacks)
  if not any(k is not None for k in listed + stacked):
    return _top_level_blocks(paths)

  # Layer containers (lists and stacks) from input to output, their layers in index order.
  containers: list[str] = []
  for lk, sk in zip(listed, stacked):
    c = lk[0] if lk is not None else sk[0] if sk is not None else None
    if c is not None and c not in containers:
      containers.append(c)
  containers.sort(key=_stacks.input_to_output)
  layer_ids = {(containers.index(k[0]), k[1]) for k in listed if k is not None}
  for k in stacked:
    if k is not None:
      layer_ids.update((containers.index(k[0]), s) for s in range(k[1]))
  is_embedding = [lk is None and sk is None and _stacks.is_embedding(p)
                  for lk, sk, p in zip(listed, stacked, paths)]
  offset = 1 if include_embedding and any(is_embedding) else 0
  layer_block = {lk: offset + i for i, lk in enumerate(sorted(layer_ids))}
  head_block = offset + len(layer_ids)

  labels: list[Label] = []
  for lk, sk, emb in zip(listed, stacked, is_embedding):
    if lk is not None:
      labels.append(layer_block[(containers.index(lk[0]), lk[1])])
    elif sk is not None:
      c = containers.index(sk.prefix)
      labels.append(_per_slice([layer_block[(c, s)] for s in range(sk.length)], sk.axis))
    elif emb:
      labels.append(0 if include_embedding else -1)
    else:
      labels.append(head_block if include_lm_head else -1)
  return labels


def block_labels(
    params: Any,
    *,
    include_embedding: bool = False,
    include_lm_head: bool = False,
    stacks: str | Sequence[str] | dict[str, int] | None = None,
    always_active: AlwaysActiveSpec = None,
) -> Any:
  """Infers one block per transformer layer from the key paths and shapes of ``params``.

  Two forms of layers are recognised, and give the same blocks:

  * a *list* of layers: an integer path component after a container (``model.layers.3.mlp``,
    ``h.3``, ``blocks[3]``), or a Linen-style suffix (``layers_3``; Linen's automatic names
    ``Block_0, Block_1`` when those modules hold submodules). Linen's ``Dense_0``, ``Embed_0``,
    ``LayerNorm_0`` are never taken for layers;
  * a *stack* of layers (what ``nnx.vmap``/``nnx.scan``, Linen's ``nn.scan`` and ``jax.vmap`` of an
    init function produce): the subtree under a container name (``layers``, ``layer``, ``h``,
    ``blocks``, ``block``, Linen's ``ScanBlock_0``, ...) whose leaves all have a leading axis of the
    same length ``L`` (per-layer scalars ``[L]`` included). Its leaves get a tuple of ``L`` labels,
    one block per layer slice ``[l]``. A stack scanned on axis 1 (Linen's ``nn.scan(...,
    variable_axes={'params': 1})``, MaxText's ``param_scan_axis: 1``: kernels ``[d_in, L, d_out]``,
    norm scales ``[d, L]``) is recognised when its leaves share axis 1 but not axis 0 and one has
    three dimensions (leaves sharing both are taken for a stack on axis 0); its leaves get a
    :class:`StackLabels` ``(ids, axis=1)``, one block per slice ``[:, l]``. Name the stack
    subtrees (and their axis) with ``stacks`` when the guess cannot.

  NNX's trailing ``.value`` is ignored. Blocks are numbered from the input to the output: the
  embedding block (when included), then the layers in index order (several layer containers in
  order of first appearance, except that a container named like an encoder comes before one named
  like a decoder), then one head block (everything after the
  layers that is not an embedding: final norm, ``lm_head``, classifier; when included). A tree
  without any layer structure gets one block per top-level entry, and a single array is one block.
  :func:`describe_blocks` prints what was inferred.

  Args:
    params: any pytree of arrays (dicts, lists, ``nnx.State``, ``jax.ShapeDtypeStruct`` leaves).
    include_embedding: train the embedding (token and position embeddings) as a block of its own.
    include_lm_head: train the output head and final norm as a block of their own.
    stacks: ``None`` to recognise layer stacks by name and shape; otherwise the dotted (or slashed)
      path, or a sequence of paths, of each stacked subtree, e.g. ``"model.decoder"`` (its layer
      axis found from the shapes: axis 0 unless only axis 1 is shared), or a dict ``{path: axis}``
      declaring the layer axis, e.g. ``{"decoder/layers": 1}``. No other subtree is then taken for
      a stack; ``()`` turns stack recognition off.
    always_active: leaves trained at every step whatever the active block (e.g. a new task head),
      as for :func:`badam`: ``None``, a list of regular expressions over dotted key paths, a pytree
      of bools or a callable ``params -> bools``. They get the label ``-2`` (whole leaves, also out
      of any block they would otherwise be in); passing these labels as ``blocks=`` to
      :func:`badam` keeps them always active.

  Returns:
    A pytree with the structure of ``params`` whose leaves are ``int`` block ids (``-1`` for frozen
    leaves, ``-2`` for always-active ones) or, for the leaves of a layer stack, a tuple of one block
    id per layer slice.

  Raises:
    ValueError: a path in ``stacks`` names no subtree, or its leaves do not share the declared layer
      axis; two-dimensional leaves under a layer-container name share their second axis only
      (ambiguous: declare ``stacks={path: 1}``, or pass ``stacks=()``); an ``always_active`` spec
      matches nothing or empties a block.

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

    The same model with its layers stacked (one leaf ``[2, 4, 4]``):

    >>> stacked = {'embed': jnp.zeros((10, 4)), 'layers': {'w': jnp.zeros((2, 4, 4))},
    ...            'lm_head': jnp.zeros((4, 10))}
    >>> optax_memopt.block_labels(stacked)
    {'embed': -1, 'layers': {'w': (0, 1)}, 'lm_head': -1}

    Its layers on axis 1 instead (Linen's ``nn.scan(..., variable_axes={'params': 1})``):

    >>> on_axis_1 = {'layers': {'up': jnp.zeros((4, 2, 8)), 'down': jnp.zeros((8, 2, 4))}}
    >>> optax_memopt.block_labels(on_axis_1)
    {'layers': {'down': StackLabels((0, 1), axis=1), 'up': StackLabels((0, 1), axis=1)}}

    When the leaves share both axes (``{'w': [4, 2, 4], 'scale': [4, 2]}``) axis 0 is taken; declare
    the axis then: ``block_labels(params, stacks={'layers': 1})``.

    A new task head trained at every step:

    >>> optax_memopt.block_labels(params, always_active=['lm_head'])
    {'embed': -1, 'layers': [{'w': 0}, {'w': 1}], 'lm_head': -2}
  """
  labels = _default_labels(params, include_embedding, include_lm_head, stacks)
  if always_active is not None:
    labels = _with_always_active(labels, resolve_always_active(always_active, params), params)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def _top_level_blocks(paths: list[str]) -> list[int]:
  tops: list[str] = []
  for p in paths:
    top = p.split(".")[0]
    if top not in tops:
      tops.append(top)
  return [tops.index(p.split(".")[0]) for p in paths]


def _regex_hits(pattern: str, paths: list[str], what: str) -> list[int]:
  """The leaves whose dotted path ``pattern`` matches on whole components; raises if none."""
  if not isinstance(pattern, str):
    raise TypeError(f"{what}: expected a regular expression (str), got {pattern!r}")
  try:
    regex = re.compile(r"(?:^|\.)(?:" + pattern + r")(?:\.|$)")
  except re.error as e:
    raise ValueError(f"{what}: {pattern!r} is not a valid regular expression: {e}") from None
  hits = [i for i, p in enumerate(paths) if regex.search(p)]
  if not hits:
    raise ValueError(
        f"{what}: the expression {pattern!r} matches no parameter; parameter paths look like "
        f"{paths[:3]}"
    )
  return hits


def _regex_labels(patterns: Sequence[str], paths: list[str]) -> list[int]:
  labels = [-1] * len(paths)
  for b, pattern in enumerate(patterns):
    hits = _regex_hits(pattern, paths, "blocks")
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


def _flat_labels(labels: Any, tree: Any) -> list[Any]:
  """The label leaves of a label tree, one per leaf of ``tree`` (a label may be a list/tuple)."""
  treedef = jax.tree_util.tree_structure(tree)
  try:
    return treedef.flatten_up_to(labels)
  except (ValueError, TypeError):
    pass
  flat = jax.tree_util.tree_leaves(labels)
  raise ValueError(
      f"blocks: the label tree has {len(flat)} leaves but the parameters have "
      f"{treedef.num_leaves}; it must have the structure of the parameters (a stacked leaf's "
      "label may be a 1-D integer array or a list/tuple of ints)"
  )


def _is_int(x: Any) -> bool:
  if isinstance(x, bool):
    return False
  if isinstance(x, int):
    return True
  dtype = getattr(x, "dtype", None)
  return dtype is not None and getattr(x, "ndim", None) == 0 and jax.numpy.issubdtype(
      dtype, jax.numpy.integer)


def _label(x: Any, path: str, shape: tuple[int, ...]) -> Label:
  """One label leaf as an ``int`` or a tuple of ints (one per slice of the leading axis)."""
  if _is_int(x):
    return int(x)
  if isinstance(x, (list, tuple)) or getattr(x, "ndim", None) == 1:
    if getattr(x, "ndim", None) == 1 and not jax.numpy.issubdtype(x.dtype, jax.numpy.integer):
      raise TypeError(
          f"blocks: the label of {path!r} has dtype {x.dtype}; labels must be integers"
      )
    values = list(x.tolist()) if hasattr(x, "tolist") else list(x)
    if not all(_is_int(v) for v in values):
      raise TypeError(
          f"blocks: the label of {path!r} is {x!r}; a per-slice label must hold integers only"
      )
    axis = label_axis(x)
    if len(shape) <= axis or len(values) != shape[axis]:
      raise ValueError(
          f"blocks: the label of {path!r} has {len(values)} entries but the leaf has shape "
          f"{tuple(shape)}; a per-slice label needs one block id per slice of the layer axis "
          f"({axis}{'' if axis else ', the leading one; StackLabels(ids, axis=1) for axis 1'})"
      )
    return _per_slice([int(v) for v in values], axis)
  raise TypeError(
      f"blocks: the label of {path!r} is {x!r}; labels must be integers (block ids, -1 for frozen) "
      "or 1-D integer arrays (one per slice of a stacked leaf)"
  )


def label_ids(label: Label) -> tuple[int, ...]:
  """The block ids a label uses (``-1`` included)."""
  return label if isinstance(label, tuple) else (label,)


def resolve_always_active(spec: AlwaysActiveSpec, tree: Any) -> list[bool]:
  """Per leaf of ``tree``, whether the ``always_active=`` spec selects it; validated.

  Raises:
    ValueError: an expression matches no parameter, a mask selects none, or it does not fit the tree.
    TypeError: the spec is of an unsupported kind, or a mask leaf is not a bool.
  """
  paths = leaf_paths(tree)
  if spec is None or (isinstance(spec, (list, tuple)) and not spec):
    return [False] * len(paths)
  if isinstance(spec, str):
    raise TypeError(
        "always_active: a single string is ambiguous; pass a list of regular expressions, e.g. "
        f"[{spec!r}]"
    )
  if isinstance(spec, Sequence) and all(isinstance(x, str) for x in spec):
    flags = [False] * len(paths)
    for pattern in spec:
      for i in _regex_hits(pattern, paths, "always_active"):
        flags[i] = True
    return flags
  mask = spec(tree) if callable(spec) else spec
  treedef = jax.tree_util.tree_structure(tree)
  try:
    values = treedef.flatten_up_to(mask)
  except (ValueError, TypeError):
    raise ValueError(
        f"always_active: the mask has {len(jax.tree_util.tree_leaves(mask))} leaves but the "
        f"parameters have {treedef.num_leaves}; it must be a pytree of bools with the structure of "
        "the parameters (or a list of regular expressions over their paths)"
    ) from None
  flags = []
  for value, path in zip(values, paths):
    dtype = getattr(value, "dtype", None)
    if not (isinstance(value, bool) or (dtype is not None and getattr(value, "ndim", None) == 0
                                        and jax.numpy.dtype(dtype) == jax.numpy.bool_)):
      raise TypeError(
          f"always_active: the mask entry of {path!r} is {value!r}; the mask must hold one bool per "
          "leaf (a whole leaf is always active or not)"
      )
    flags.append(bool(value))
  if not any(flags):
    raise ValueError(
        "always_active: the mask selects no parameter; pass always_active=None for none"
    )
  return flags


def _with_always_active(labels: list[Label], flags: list[bool], tree: Any) -> list[Label]:
  """``labels`` with the always-active leaves labelled ``ALWAYS_ACTIVE`` (out of their blocks).

  Raises:
    ValueError: a block loses every member to ``always_active``.
  """
  before = {i for lab in labels for i in label_ids(lab)} - {FROZEN, ALWAYS_ACTIVE}
  out = [ALWAYS_ACTIVE if f else lab for lab, f in zip(labels, flags)]
  after = {i for lab in out for i in label_ids(lab)}
  emptied = sorted(before - after)
  if emptied:
    paths = leaf_paths(tree)
    members = [paths[i] for i, lab in enumerate(labels) if emptied[0] in label_ids(lab)]
    raise ValueError(
        f"always_active: every leaf of block {emptied[0]} ({', '.join(members[:3])}"
        f"{', ...' if len(members) > 3 else ''}) is always active, so the block would be empty; "
        "leave these leaves out of blocks= (label -1) or out of always_active"
    )
  return out


def resolve_blocks(blocks: BlockSpec, tree: Any, always_active: AlwaysActiveSpec = None) -> list[Label]:
  """Flat labels (one per leaf of ``tree``) for any ``blocks=`` and ``always_active=`` spec; validated.

  Each entry is an ``int`` (the whole leaf's block, ``-1`` frozen, ``-2`` always active) or a tuple
  of ints with one block id (or ``-1``) per slice of the leaf's leading (layer) axis. A leaf selected
  by ``always_active`` is always active, whatever block ``blocks`` puts it in.

  Raises:
    ValueError: a spec matches no parameter, leaves a block id empty, or does not fit the tree.
    TypeError: a spec is of an unsupported kind, or a label is not an integer.
  """
  paths = leaf_paths(tree)
  shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(tree)]
  n = len(paths)
  if n == 0:
    raise ValueError("blocks: the parameter tree has no leaves")
  if blocks is None:
    labels = _default_labels(tree, False, False, None)
  elif isinstance(blocks, str):
    raise TypeError(
        "blocks: a single string is ambiguous; pass a list of regular expressions, e.g. "
        f"[{blocks!r}]"
    )
  elif isinstance(blocks, Sequence) and blocks and all(isinstance(b, str) for b in blocks):
    labels = _regex_labels(blocks, paths)
  elif callable(blocks):
    labels = _flat_labels(blocks(tree), tree)
  else:
    labels = _flat_labels(blocks, tree)

  labels = [_label(x, p, s) for x, p, s in zip(labels, paths, shapes)]
  for lab, p in zip(labels, paths):
    if isinstance(lab, tuple) and min(lab) < FROZEN:
      raise ValueError(
          f"blocks: the per-slice label of {p!r} holds {min(lab)}; a slice's label is a block id "
          "(>= 0) or -1 (always-active, -2, applies to whole leaves only)"
      )
    if isinstance(lab, int) and lab < ALWAYS_ACTIVE:
      raise ValueError(
          "blocks: block ids must be >= 0, -1 for frozen leaves or -2 for always-active ones; "
          f"{p!r} has {lab}"
      )
  if always_active is not None:
    labels = _with_always_active(labels, resolve_always_active(always_active, tree), tree)
  ids = {i for lab in labels for i in label_ids(lab)}
  used = sorted(ids - {FROZEN, ALWAYS_ACTIVE})
  if not used:
    if ALWAYS_ACTIVE in ids:
      raise ValueError(
          "blocks: every trained leaf is always active and no block is left to cycle; put the "
          "other leaves in blocks, or use a plain optimizer (optax.adamw) for what trains every step"
      )
    raise ValueError(
        "blocks: the block spec matches no parameter (every leaf is frozen); parameter paths look "
        f"like {paths[:3]}. Pass include_embedding/include_lm_head, regexes, or a label tree."
    )
  missing = sorted(set(range(used[-1] + 1)) - set(used))
  if missing:
    raise ValueError(f"blocks: block ids must be 0..{used[-1]} without gaps; no leaf has {missing}")
  return labels


def always_active_leaves(labels: list[Label]) -> list[int]:
  """The leaves (indices in leaf order) labelled always active."""
  return [i for i, lab in enumerate(labels) if isinstance(lab, int) and lab == ALWAYS_ACTIVE]


def num_blocks(labels: list[Label]) -> int:
  return max(max(label_ids(lab)) for lab in labels) + 1


class Unit(NamedTuple):
  """What one slot position holds for one block: a whole leaf, or one slice of a stacked leaf."""

  leaf: int
  index: int | None  # the slice along the layer axis; None for the whole leaf
  block: int
  axis: int = 0  # the leaf's layer axis (for a slice)

  def shape(self, leaf_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of this unit of a leaf of ``leaf_shape``: the leaf's, or one slice's."""
    shape = tuple(leaf_shape)
    return shape if self.index is None else shape[:self.axis] + shape[self.axis + 1:]

  def name(self, path: str) -> str:
    """``path`` with the slice this unit is: ``w``, ``w[3]`` (axis 0), ``w[:, 3]`` (axis 1)."""
    return path if self.index is None else f"{path}[{':, ' * self.axis}{self.index}]"

  def take(self, x: Any) -> Any:
    """This unit of the leaf ``x`` (a static slice along the layer axis)."""
    return x if self.index is None else jax.lax.index_in_dim(x, self.index, self.axis, keepdims=False)


def units_of(labels: list[Label]) -> list[Unit]:
  """The trainable units of a partition: whole leaves and slices of stacked leaves, leaf order."""
  out = []
  for i, lab in enumerate(labels):
    if isinstance(lab, tuple):
      out.extend(Unit(i, s, b, label_axis(lab)) for s, b in enumerate(lab) if b >= 0)
    elif lab >= 0:
      out.append(Unit(i, None, lab))
  return out


def group_leaves(
    units: list[Unit], groups: list[str], shapes: list[tuple[int, ...]], dtypes: list[Any]
) -> tuple[dict[str, list[tuple[tuple[int, ...], Any]]], list[tuple[str, int]]]:
  """Plans the slot: per-group positions that can hold the units of any one block.

  Units (whole leaves, or slices of stacked leaves) of like shape, dtype and group share a slot
  position across blocks, so a partition of identical layers needs exactly one block's worth of
  positions, whether the layers are a list or a stack; unlike blocks need the union of their
  (shape, dtype) multisets, position by position the largest count over the blocks.

  Returns:
    ``(slot, where)``: ``slot[group]`` lists the (shape, dtype) of each position; ``where[u]`` is
    ``(group, position)`` of unit ``u`` in its block's slot.
  """
  slot: dict[str, list[tuple[tuple[int, ...], Any]]] = {}
  where: list[tuple[str, int]] = [("", -1)] * len(units)
  taken: dict[tuple[int, str], set[int]] = {}
  for u, unit in sorted(enumerate(units), key=lambda x: x[1].block):
    i = unit.leaf
    g = groups[i]
    shape = unit.shape(shapes[i])
    positions = slot.setdefault(g, [])
    used = taken.setdefault((unit.block, g), set())
    sig = (shape, dtypes[i])
    pos = next((j for j, s in enumerate(positions) if s == sig and j not in used), None)
    if pos is None:
      positions.append(sig)
      pos = len(positions) - 1
    used.add(pos)
    where[u] = (g, pos)
  return slot, where


def _size(shape: tuple[int, ...]) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


def describe_blocks(params: Any, blocks: BlockSpec = None, *, always_active: AlwaysActiveSpec = None) -> str:
  r"""A printable table of a BAdam partition: each block's members, parameter count and bytes.

  Stacked leaves appear with the layer slice a block owns (``layers.mlp.kernel[3]``); always-active
  leaves are summed on a line ``always`` and frozen leaves on a line ``frozen``. The last line gives
  what the optimizer state covers: one block at a time plus the always-active leaves.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    blocks: any ``blocks=`` spec of :func:`badam` (``None``: :func:`block_labels`' default).
    always_active: any ``always_active=`` spec of :func:`badam`.

  Returns:
    A multi-line string.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_memopt
    >>> params = {'embed': jnp.zeros((10, 4)), 'layers': {'w': jnp.zeros((2, 4, 4))}}
    >>> print(optax_memopt.describe_blocks(params))
    block   params  bytes  members
         0      16     64  layers.w[0]
         1      16     64  layers.w[1]
    frozen      40    160  embed
    2 blocks; the largest has 16 parameters

    With the embedding trained at every step:

    >>> print(optax_memopt.describe_blocks(params, always_active=['embed']))
    block   params  bytes  members
         0      16     64  layers.w[0]
         1      16     64  layers.w[1]
    always      40    160  embed
    2 blocks; the largest has 16 parameters; always active: 40 parameters (state: one block plus these)
  """
  labels = resolve_blocks(blocks, params, always_active)
  paths = leaf_paths(params)
  leaves = jax.tree_util.tree_leaves(params)
  rows: dict[int, list[tuple[str, int, int]]] = {}
  for unit in units_of(labels):
    x = leaves[unit.leaf]
    name = unit.name(paths[unit.leaf])
    size = _size(unit.shape(x.shape))
    rows.setdefault(unit.block, []).append((name, size, jax.numpy.dtype(x.dtype).itemsize))

  def whole_or_slices(label):
    units = [Unit(i, None, lab) if isinstance(lab, int) else Unit(i, s, b, label_axis(lab))
             for i, lab in enumerate(labels)
             for s, b in (((None, lab),) if isinstance(lab, int) else enumerate(lab))]
    return [(u.name(paths[u.leaf]), _size(u.shape(leaves[u.leaf].shape)),
             jax.numpy.dtype(leaves[u.leaf].dtype).itemsize)
            for u in units if u.block == label]

  table = [("block", "params", "bytes", "members")]

  def add(name, entries):
    members = [m for m, _, _ in entries]
    shown = ", ".join(members[:4]) + (f", ... (+{len(members) - 4})" if len(members) > 4 else "")
    table.append((name, f"{sum(s for _, s, _ in entries):,}",
                  f"{sum(s * k for _, s, k in entries):,}", shown))

  for b in sorted(rows):
    add(str(b), rows[b])
  always = whole_or_slices(ALWAYS_ACTIVE)
  if always:
    add("always", always)
  frozen = whole_or_slices(FROZEN)
  if frozen:
    add("frozen", frozen)
  widths = [max(len(r[c]) for r in table) for c in range(3)]
  lines = [f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
           for r in table]
  lines[0] = f"{'block':<{widths[0]}}  {'params':>{widths[1]}}  {'bytes':>{widths[2]}}  members"
  largest = max(sum(s for _, s, _ in r) for r in rows.values())
  summary = f"{len(rows)} blocks; the largest has {largest:,} parameters"
  if always:
    summary += (f"; always active: {sum(s for _, s, _ in always):,} parameters "
                "(state: one block plus these)")
  lines.append(summary)
  return "\n".join(lines)


def as_callable_mask(mask: Any) -> Callable[[Any], Any] | None:
  if mask is None or callable(mask):
    return mask
  return lambda _: mask
