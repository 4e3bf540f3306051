"""Recognising a model's layers in a parameter pytree: lists of layers and layer stacks.

A *layer* is one transformer block's parameters (attention, MLP, norms). Layers come in two forms:

* a *list* of layers: one subtree per layer, told apart by an index in the key path, either an
  integer component after a container (``model.layers.3.mlp``, ``h.3``) or a Linen-style suffix
  (``layers_3``; Linen's automatic names ``Block_0, Block_1`` when those modules hold submodules
  rather than arrays, so Linen's own ``Dense_0`` / ``Embed_0`` are never layers);
* a *stack* of layers: one subtree whose leaves hold every layer along a shared *layer axis* of
  length ``L``, as ``nnx.vmap``/``nnx.scan``, Linen's ``nn.scan`` or ``jax.vmap`` of an init function
  produce. The layer axis is 0 (``[L, ...]``, what :func:`optax_memopt.scan_layers` runs) or 1
  (Linen's ``nn.scan(..., variable_axes={'params': 1})``, MaxText's ``param_scan_axis: 1``: kernels
  ``[d_in, L, d_out]``, norm scales ``[d, L]``). A per-layer scalar ``[L]`` in a stack on axis 1 has
  its layers on its only axis (:class:`StackKey` records each leaf's own layer axis).

Stacks are *recognised* by name and shape (the subtree under the first path component named like a
layer container, :data:`CONTAINER_NAMES`, or Linen's ``ScanBlock_0``, whose leaves share their leading
or second dimension; see :func:`find_stacks`) or *declared* with ``stacks=`` (a path, paths, or
``{path: layer axis}``; see :func:`stacks_spec`). Three consumers read this module: BAdam's partitioner
(:mod:`optax_memopt._blocks`, one block per layer), AdaRankGrad (which leaves are inside the layers,
and a stacked ``[L, m, n]`` leaf as ``L`` matrices) and the layer-wise step (which leaves it scans).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from optax_memopt._tree import leaf_paths

# Names of the attribute holding a transformer's layers, as a list (`layers.3`, Linen's `layers_3`) or
# as one stacked module (`layers` with leaves `[L, ...]`). Matched case-insensitively on one path
# component; Linen's automatic module names (`Dense_0`, `Block_1`) are not among them.
CONTAINER_NAMES = frozenset({
    "layers", "layer", "h", "blocks", "block", "decoder_layers", "encoder_layers", "layer_stack",
    "scan", "scanned_layers",
})
_INDEX = re.compile(r"^\d+$")
_SUFFIX_INDEX = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z][A-Za-z0-9]*)*)_(?P<idx>\d+)$")
# Linen's `nn.scan(Block, ...)` module without an explicit name is `ScanBlock_0`.
_LINEN_SCAN = re.compile(r"^Scan[A-Z][A-Za-z0-9]*_\d+$")
# Embeddings (outside the layers): trained as their own block only when asked (block_labels).
_EMBEDDING = re.compile(
    r"(^|[._])(embed\w*|embeddings?|wte|wpe|tok_embeddings|word_embeddings|position_embeddings"
    r"|token_type_embeddings|embed_tokens|embedder)($|[._])",
    re.IGNORECASE,
)
_ENCODER = re.compile(r"(^|[._])(enc\w*)($|[._])", re.IGNORECASE)
_DECODER = re.compile(r"(^|[._])(dec\w*)($|[._])", re.IGNORECASE)


def is_container(name: str) -> bool:
  """Whether one path component names a layer container (``layers``, ``h``, ``blocks``, ...)."""
  return name.lower() in CONTAINER_NAMES


def is_embedding(path: str) -> bool:
  """Whether a dotted path names an embedding (``embed``, ``wte``, ``embed_tokens``, ...)."""
  return bool(_EMBEDDING.search(path))


def input_to_output(container: str) -> int:
  """Sort key of a layer container: encoders before decoders (a dict's keys are flattened in
  alphabetical order, which puts ``decoder`` first); otherwise the order of first appearance."""
  if _ENCODER.search(container):
    return 0
  if _DECODER.search(container):
    return 2
  return 1


def _path_candidates(path: str) -> list[tuple[int, str, str, int]]:
  """Every component of ``path`` that may be a layer index: (depth below it, container path, suffix
  name (empty for an integer component), index)."""
  parts = path.split(".")
  found = []
  for i, part in enumerate(parts):
    if i > 0 and _INDEX.match(part):
      found.append((len(parts) - i, ".".join(parts[:i]), "", int(part)))
      continue
    m = _SUFFIX_INDEX.match(part)
    if m and not _LINEN_SCAN.match(part):
      name = m.group("name")
      found.append((len(parts) - i, ".".join(parts[:i] + [name]), name, int(m.group("idx"))))
  return found


def list_keys(paths: list[str]) -> list[tuple[str, int] | None]:
  """Per leaf, (container path, layer index) when it belongs to a python list of layers.

  An integer component after a container (``model.layers.3.mlp``, ``h.3``) is always a layer index.
  A Linen-style suffix ``name_3`` is one when ``name`` is a layer-container name (``layers_3``), or
  when the modules ``name_0, name_1, ...`` (at least two) each hold submodules rather than arrays
  (Linen's automatic names for a list of layers, ``Block_0.Dense_0.kernel``); Linen's own
  ``Dense_0`` / ``Embed_0`` / ``LayerNorm_0`` hold arrays directly and are never layers.

  Examples:
    >>> list_keys(['h.0.w', 'h.1.w', 'layers_2.w', 'Dense_0.kernel'])
    [('h', 0), ('h', 1), ('layers', 2), None]
  """
  candidates = [_path_candidates(path) for path in paths]
  # Suffix groups not named like a container must look like a list of layers: two or more
  # modules, none holding an array directly (that is what Linen's built-in modules do).
  indices: dict[str, set[int]] = {}
  shallow: set[str] = set()
  for found in candidates:
    for depth, container, name, idx in found:
      if name and not is_container(name):
        indices.setdefault(container, set()).add(idx)
        if depth < 3:
          shallow.add(container)
  accepted = {c for c, idx in indices.items() if len(idx) >= 2 and c not in shallow}

  def ok(c):
    return not c[2] or is_container(c[2]) or c[1] in accepted

  return [next(((c[1], c[3]) for c in found if ok(c)), None) for found in candidates]


def _prefix_of(path: str, prefix: str) -> bool:
  return path == prefix or path.startswith(prefix + ".")


class StackKey(NamedTuple):
  """Where a leaf sits in a layer stack: the stack's path, its number of layers and the leaf's layer
  axis (the stack's axis, 0 for a per-layer scalar ``[L]`` in a stack scanned on axis 1)."""

  prefix: str
  length: int
  axis: int


def _leaf_axis(shape: tuple[int, ...], axis: int) -> int:
  """The layer axis of a leaf of ``shape`` in a stack scanned on ``axis``: a leaf with no such axis
  (a per-layer scalar ``[L]`` stacked on axis 1) has its layers on its last axis."""
  return min(axis, len(shape) - 1)


def _shared_length(shapes: list[tuple[int, ...]], axis: int) -> int | None:
  """The number of layers when every leaf has it on its layer axis for a stack on ``axis``."""
  if not shapes or any(not s for s in shapes):
    return None
  lengths = {s[_leaf_axis(s, axis)] for s in shapes}
  return lengths.pop() if len(lengths) == 1 else None


def stacks_spec(stacks: Any) -> dict[str, int | None] | None:
  """``stacks=`` as ``{path: axis}`` (``None``: the axis is found from the shapes); validated.

  Accepts ``None``, a path, a sequence of paths, or a mapping ``{path: axis}``; paths are dotted or
  slashed (``"decoder.layers"``, ``"decoder/layers"``).

  Examples:
    >>> stacks_spec('decoder/layers'), stacks_spec({'layers': 1})
    ({'decoder.layers': None}, {'layers': 1})
  """
  if stacks is None:
    return None
  if isinstance(stacks, str):
    stacks = (stacks,)
  if isinstance(stacks, dict):
    items = list(stacks.items())
  elif isinstance(stacks, Sequence):
    items = [(path, None) for path in stacks]
  else:
    raise TypeError(
        f"stacks: expected a path, a sequence of paths or a dict {{path: layer axis}}, got {stacks!r}")
  out: dict[str, int | None] = {}
  for path, axis in items:
    if not isinstance(path, str):
      raise TypeError(f"stacks: a stack path must be a str, got {path!r}")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or axis < 0):
      raise ValueError(
          f"stacks: the layer axis of {path!r} must be an int >= 0 (0 for [L, ...] leaves, 1 for "
          f"Linen nn.scan(variable_axes={{'params': 1}})), got {axis!r}")
    out[path.replace("/", ".")] = axis
  return out


def _declared_stacks(
    paths: list[str], shapes: list[tuple[int, ...]], spec: dict[str, int | None]
) -> list[StackKey | None]:
  """The stack keys of ``stacks=`` (see :func:`stacks_spec`): every path must name a subtree whose
  leaves share the declared axis (axis 0, else axis 1, when none is declared)."""
  out: list[StackKey | None] = [None] * len(paths)
  for prefix, axis in spec.items():
    members = [i for i, p in enumerate(paths) if _prefix_of(p, prefix)]
    if not members:
      raise ValueError(
          f"stacks: {prefix!r} names no subtree of the parameters; paths look like {paths[:3]}"
      )
    found = [shapes[i] for i in members]
    shown = ", ".join(f"{paths[i]} {tuple(shapes[i])}" for i in members[:4])
    if axis is None:  # axis 0 unless only axis 1 is shared
      axis = 1 if _shared_length(found, 0) is None and _shared_length(found, 1) is not None else 0
    length = _shared_length(found, axis)
    if length is None:
      raise ValueError(
          f"stacks: the leaves under {prefix!r} do not share a layer axis {axis}: {shown}; declare "
          f"the axis their layers are on, e.g. stacks={{{prefix!r}: 1}} for Linen "
          "nn.scan(variable_axes={'params': 1}), or leave the subtree out of stacks")
    for i in members:
      out[i] = StackKey(prefix, length, _leaf_axis(shapes[i], axis))
  return out


def _guessed_axis(prefix: str, member_paths: list[str], found: list[tuple[int, ...]]) -> int | None:
  """The layer axis of a candidate stack's leaves (shapes ``found``), ``None`` if not a stack."""
  ndims = [len(s) for s in found]
  # [L] leaves (a per-layer scalar) only next to a leaf of 3+ dimensions: one unstacked layer's
  # [d, d] kernel and [d] bias would otherwise look like a stack of d layers.
  if min(ndims) >= (1 if max(ndims) >= 3 else 2) and _shared_length(found, 0) is not None:
    return 0
  if max(ndims) >= 3 and _shared_length(found, 1) is not None:
    return 1
  if min(ndims) >= 2 and _shared_length(found, 1) is not None and len(found) >= 2:
    raise ValueError(
        f"stacks: the leaves under {prefix!r} share axis 1 ({member_paths[0]} {found[0]}, ...) "
        "but not axis 0, and none has 3 dimensions: if they are a layer stack scanned on axis 1 "
        f"declare it, stacks={{{prefix!r}: 1}}; if not, pass stacks=() (no stack)")
  return None


def _guessed_stacks(
    paths: list[str], shapes: list[tuple[int, ...]], listed: list[Any]
) -> list[StackKey | None]:
  """The stack keys recognised by name and shape (see :func:`find_stacks`)."""
  out: list[StackKey | None] = [None] * len(paths)
  candidates: dict[str, list[int]] = {}
  for i, path in enumerate(paths):
    if listed[i] is not None:
      continue
    parts = path.split(".")
    for j, part in enumerate(parts[:-1]):
      if is_container(part) or _LINEN_SCAN.match(part):
        candidates.setdefault(".".join(parts[: j + 1]), []).append(i)
        break
  for prefix, members in candidates.items():
    every = [i for i, p in enumerate(paths) if _prefix_of(p, prefix)]
    found = [shapes[i] for i in members]
    if len(every) != len(members) or min(len(s) for s in found) < 1:
      continue
    axis = _guessed_axis(prefix, [paths[i] for i in members], found)
    if axis is not None:
      length = _shared_length(found, axis)
      for i in members:
        out[i] = StackKey(prefix, length, _leaf_axis(shapes[i], axis))
  return out


def find_stacks(
    paths: list[str], shapes: list[tuple[int, ...]], listed: list[Any], stacks: Any
) -> list[StackKey | None]:
  """Per leaf, its :class:`StackKey` when it belongs to a layer stack, else ``None``.

  Guessed (``stacks=None``): the subtree under the first path component named like a layer container
  (``layers``, ``h``, ``blocks``, ...; Linen's ``nn.scan`` default ``ScanBlock_0``), not in a list of
  layers (``listed``, from :func:`list_keys`), whose leaves share
  * their leading dimension ``L`` and have two or more dimensions (one-dimensional per-layer scalars
    ``[L]`` too, next to a leaf of three or more): a stack on axis 0; or else
  * their second dimension ``L`` (per-layer scalars ``[L]`` too), with a leaf of three or more
    dimensions (a kernel ``[d_in, L, d_out]``): a stack on axis 1 (Linen's ``nn.scan(...,
    variable_axes={'params': 1})``, MaxText's ``param_scan_axis: 1``). Two-dimensional leaves that
    share only their second axis are ambiguous and refused with ``ValueError``.
  Explicit: ``stacks`` names the subtrees (see :func:`stacks_spec`); each must exist and its leaves
  must share the declared axis (axis 0, else axis 1, when none is declared), else ``ValueError``.
  """
  spec = stacks_spec(stacks)
  if spec is not None:
    return _declared_stacks(paths, shapes, spec)
  return _guessed_stacks(paths, shapes, listed)


class Layers(NamedTuple):
  """The layers recognised in a pytree, one entry per leaf in ``jax.tree_util`` order."""

  paths: list[str]  # dotted key paths
  shapes: list[tuple[int, ...]]
  listed: list[tuple[str, int] | None]  # (container, layer index) in a list of layers
  stacked: list[StackKey | None]  # where the leaf sits in a layer stack

  def inside(self) -> list[bool]:
    """Per leaf: is it in a list of layers or a layer stack?"""
    return [lk is not None or sk is not None for lk, sk in zip(self.listed, self.stacked, strict=True)]


def find_layers(params: Any, stacks: Any = None) -> Layers:
  """The lists of layers and layer stacks of ``params`` (``stacks`` as for :func:`find_stacks`)."""
  paths = leaf_paths(params)
  shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(params)]
  listed = list_keys(paths)
  return Layers(paths, shapes, listed, find_stacks(paths, shapes, listed, stacks))


def stack_keys(params: Any, stacks: Any = None) -> list[StackKey | None]:
  """Per leaf of ``params`` (in ``jax.tree_util`` order), its :class:`StackKey` (stack, number of
  layers, layer axis), ``None`` if the leaf is not part of a recognised layer stack.

  Examples:
    >>> import jax.numpy as jnp
    >>> stack_keys({'embed': jnp.zeros((10, 4)), 'layers': {'w': jnp.zeros((2, 4, 4))}})
    [None, StackKey(prefix='layers', length=2, axis=0)]
  """
  return find_layers(params, stacks).stacked


def stack_lengths(params: Any, stacks: Any = None) -> list[int | None]:
  """Per leaf of ``params``, its layer-stack length, ``None`` outside the layer stacks."""
  return [None if k is None else k.length for k in stack_keys(params, stacks)]


def layer_leaves(params: Any, stacks: Any = None) -> list[bool]:
  """Per leaf: is it inside the model's layers (a list of layers or a layer stack)? All ``True``
  when no layers are recognised.

  Examples:
    >>> import jax.numpy as jnp
    >>> layer_leaves({'embed': jnp.zeros((10, 4)), 'layers': {'w': jnp.zeros((2, 4, 4))}})
    [False, True]
  """
  layers = find_layers(params, stacks)
  inside = layers.inside()
  if not any(inside):
    # One layer under a layer-container name (``layers.mlp.w``, no index or stack axis), as a
    # layer-wise step sees one layer of a stack: its leaves are the layer's, the rest is outside.
    inside = [any(is_container(str(k)) for k in path.split(".")) for path in layers.paths]
  return inside if any(inside) else [True] * len(layers.paths)


def refuse_other_axes(who: str, paths: list[str], axes: list[int | None]) -> None:
  """A one-line ``ValueError`` when a leaf's layer axis (``None``: not stacked) is not 0: the step
  builders run a stack through :func:`optax_memopt.scan_layers`, which scans axis 0."""
  bad = next((i for i, a in enumerate(axes) if a), None)
  if bad is None:
    return
  raise ValueError(
      f"{who}: {paths[bad]!r} is in a layer stack on axis {axes[bad]} (Linen nn.scan(variable_axes="
      "{'params': 1}), MaxText param_scan_axis: 1), but the step runs stacks through "
      "optax_memopt.scan_layers, which scans axis 0; store the stack with its layers on axis 0 "
      "(variable_axes={'params': 0}, param_scan_axis: 0), or train with jax.grad and tx.update "
      "(badam, badam_ratio and adarankgrad handle axis 1 as drop-in optimizers)")


class StackLabels(tuple):
  """The labels of a stacked leaf whose layers are on axis ``axis`` (not 0): one block id per slice
  ``x[:, l]`` (``axis=1``). :func:`optax_memopt.block_labels` gives these for a stack scanned on
  axis 1; a plain tuple (or 1-D integer array) labels the slices of the leading axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_memopt
    >>> params = {'layers': {'w': jnp.zeros((4, 3, 4))}}  # a stack of 3 layers on axis 1
    >>> labels = {'layers': {'w': optax_memopt.StackLabels((0, 1, 2), axis=1)}}
    >>> print(optax_memopt.describe_blocks(params, labels).splitlines()[1])
        0      16     64  layers.w[:, 0]
  """

  axis: int

  def __new__(cls, ids, axis: int = 0):
    out = super().__new__(cls, ids)
    out.axis = int(axis)
    return out

  def __repr__(self) -> str:
    return f"StackLabels({tuple(self)!r}, axis={self.axis})"

  def __reduce__(self):
    return (StackLabels, (tuple(self), self.axis))


def label_axis(label: Any) -> int:
  """The layer axis of a per-slice label (0 for a plain tuple)."""
  return getattr(label, "axis", 0)
