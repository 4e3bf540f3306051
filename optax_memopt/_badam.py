"""BAdam: block coordinate descent with Adam as the inner solver, as an Optax transformation.

The parameters are split into ``D`` blocks (by default one per transformer layer). The optimizer
works on one *active* block at a time for ``switch_every`` steps, then moves on; every other leaf gets a
zero update. Optimizer state exists only for the active block.

Design: the slot.
  The state cannot hold "the active block's leaves" directly, because which leaves those are changes
  at run time while a compiled function needs static shapes. So the state holds a *slot*: a short
  tuple of arrays that can hold the leaves of any one block. Leaves of like shape and dtype share a
  slot position across blocks, so for the default partition of identical transformer layers the slot
  is exactly one layer, and the inner optimizer's state on it is exactly one layer's AdamW state. At
  each step the active block's gradients are gathered into the slot with ``lax.switch`` on the
  active-block index (only the selected branch runs, so the gather costs one block's copy; a layer
  slice of a stacked leaf is a ``dynamic_slice`` at the active layer's index instead), the inner
  transformation runs on the slot, and the slot's updates are written back to their leaves. The
  schedule (global step, step within the block, active block, the current block-epoch's order, the
  PRNG key) lives in the state as int32/uint32 scalars and vectors, so resuming from a checkpoint is
  exact and block switches never recompile.

  The slot is per-leaf state rather than one flat buffer: each slot array has the shape of the
  parameter it stands for, so under ``jax.jit`` with sharded parameters it takes (and keeps) the
  sharding of those parameters, with no reshard into or out of a flat vector.

Memory bound.
  Let ``S`` be the bytes of the slot (for each (shape, dtype, group) class, the largest number of
  leaves of that class in any one block, times their size). The state is ``inner_state(S)`` plus, for
  bf16/fp16 parameters, a float32 master copy of the slot (``4/itemsize × S``), plus the schedule
  (``4·D + 20`` bytes). With AdamW as the inner solver ``inner_state(S) = 2·S·(4/itemsize)`` and for
  identical blocks ``S`` is one block. With unlike blocks (e.g. an embedding block beside the layers)
  ``S ≤ Σ_classes max_b size``: never more than the largest block plus every other class's largest
  use, and never more than the sum of the blocks' sizes.

Code layout.
  ``_Plan`` is the slot of one parameter tree (built once per tree structure, at trace time) with
  the operations between the tree and the slot: ``gather``, ``scatter``, the master copy's
  ``master_of`` / ``follow_applied`` / ``apply_to_master``. ``_BlockCoordinate`` is one
  :func:`block_coordinate` stage; its ``update`` gathers the slot, resets the inner state at a
  switch (``_reset_at_switch``), accumulates and runs ``inner`` (``_step_slot``), scatters the
  slot's updates and advances the schedule (``_advance_schedule``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_memopt import _accumulate, _protocol, _stacks
from optax_memopt import _blocks as blocks_lib
from optax_memopt._badam_ratio import BAdamRatioState
from optax_memopt._tree import (
    check_float_leaves,
    check_same_structure,
    find_states,
    is_params_placeholder,
    path_str,
    zeros_like_placed,
)

SWITCH_MODES = ("random", "ascending", "descending", "fixed")
_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _keep_hyperparams(fresh: Any, old: Any) -> Any:
  """``fresh`` with the hyperparameters (and their count and schedule states) of every
  ``optax.inject_hyperparams`` state inside ``old``: a block switch resets the inner optimizer's
  moments, not a learning rate the user set (``opt_state.hyperparams['learning_rate'] = ...``)
  or a schedule's position."""
  is_injected = lambda x: isinstance(x, _INJECTED)  # noqa: E731
  keep = lambda f, o: f._replace(**{k: getattr(o, k) for k in f._fields if k != "inner_state"})  # noqa: E731
  return jax.tree.map(lambda f, o: keep(f, o) if is_injected(f) else f, fresh, old, is_leaf=is_injected)
_LOW_PRECISION = (jnp.bfloat16, jnp.float16)

# The extra keyword argument this module passes to its inner transformation (see badam).
GLOBAL_STEP_ARG = "global_step"
# Those it accepts from the step builders: see optax_memopt._protocol.
STATIC_BLOCK_ARG = _protocol.STATIC_BLOCK
LABELS_PROBE_ARG = _protocol.LABELS_PROBE


class BlockCoordinateState(NamedTuple):
  """State of :func:`block_coordinate`.

  Attributes:
    count: int32 scalar, number of updates done so far (the global step).
    block_step: int32 scalar, updates done in the current block period, in ``[0, switch_every)``.
    active_block: int32 scalar, the block the next update trains.
    order: int32 ``[D]``, the visiting order of the current block-epoch (a permutation of the
      blocks; every entry ``start_block`` in ``fixed`` mode).
    key: uint32 ``[2]``, raw PRNG key data; block-epoch ``e`` of ``random`` mode draws its order
      from ``fold_in(key, e)``.
    inner_state: the inner transformation's state on the slot (see the module docstring); with
      ``reset_always_active=False``, a pair: the state on the block's positions, the state on the
      always-active leaves' positions.
    master: dict ``group -> tuple`` of float32 arrays, the master copy of the slot's bf16/fp16
      positions (empty when all parameters are float32).
    switch_every: int32 scalar, the (constant) block period ``K``; kept so that a host loop can
      tell from the state alone how many updates remain before the next switch.
    accumulator: a :class:`SlotAccumulator` (``accumulate_every > 1``): the micro-step in the
      current accumulation window and the running mean of its gradients, float32 arrays shaped like
      the slot (one block's size, whichever block is active); holds no array of the slot's shape
      when ``accumulate_every == 1``.

  No field has the structure of the params, so ``optax.tree_utils.tree_map_params`` applies its
  function to none of them and ``transform_non_params`` to each field whole.
  """

  count: jax.Array
  block_step: jax.Array
  active_block: jax.Array
  order: jax.Array
  key: jax.Array
  inner_state: Any
  master: Any
  switch_every: jax.Array
  accumulator: _accumulate.SlotAccumulator


def _validate_schedule(switch_every, switch_mode, start_block):
  for name, value in (("switch_every", switch_every), ("start_block", start_block)):
    if isinstance(value, (jax.Array, jax.core.Tracer)):
      raise TypeError(
          f"{name} decides the schedule's Python control flow and must be a Python int; under "
          f"optax.inject_hyperparams pass static_args=({name!r}, ...)"
      )
  if not isinstance(switch_every, int) or isinstance(switch_every, bool) or switch_every < 1:
    raise ValueError(f"switch_every must be an int >= 1, got {switch_every!r}")
  if switch_mode not in SWITCH_MODES:
    raise ValueError(f"switch_mode must be one of {SWITCH_MODES}, got {switch_mode!r}")
  if start_block is not None and (not isinstance(start_block, int) or start_block < 0):
    raise ValueError(f"start_block must be None or an int >= 0, got {start_block!r}")


def _block_order(mode, d, start, key, epoch):
  """Visiting order of block-epoch ``epoch`` (int32 [d]); pure function of its inputs."""
  ar = jnp.arange(d, dtype=jnp.int32)
  if mode == "ascending":
    return (start + ar) % d
  if mode == "descending":
    return (start - ar) % d
  if mode == "fixed":
    return jnp.full((d,), start, jnp.int32)
  perm = jax.random.permutation(
      jax.random.fold_in(jax.random.wrap_key_data(key), epoch), d
  ).astype(jnp.int32)
  # In the first block-epoch, start_block goes first: swap it with whatever was drawn first.
  pos = jnp.argmax(perm == start)
  swapped = perm.at[pos].set(perm[0]).at[0].set(start)
  return jnp.where(epoch == 0, swapped, perm) if start is not None else perm


class _Plan:
  """The slot of one parameter tree: its static facts (computed at trace time) and the operations
  between the parameter tree and the slot ``{group: tuple of arrays}``.

  Attributes:
    labels: per leaf, its block label (an int, or per layer slice for a stacked leaf).
    units: whole leaves and slices of stacked leaves, in leaf order.
    where: per unit, its ``(group, slot position)``.
    slot: ``group -> [(shape, dtype)]``, the slot's positions.
    members: per block, ``{slot position: unit}``.
    master_positions: ``group -> slot positions`` with a float32 master copy.
    always: always-active leaf -> its own slot position.
    master_weights: whether bf16/fp16 positions are trained on a float32 master copy.
    keeps: whether the always-active leaves have an inner state of their own, never reset
      (``reset_always_active=False`` and some leaf always active).
  """

  def __init__(self, labels, units, where, slot, members, master_positions, always,
               master_weights: bool, keeps: bool):
    self.labels: list[blocks_lib.Label] = labels
    self.units: list[blocks_lib.Unit] = units
    self.where: list[tuple[str, int]] = where
    self.slot: dict[str, list[tuple[tuple[int, ...], Any]]] = slot
    self.members: list[dict[tuple[str, int], blocks_lib.Unit]] = members
    self.master_positions: dict[str, list[int]] = master_positions
    self.always: dict[int, tuple[str, int]] = always
    self.master_weights = master_weights
    self.keeps = keeps
    self.num_blocks = len(members)
    self.always_positions = frozenset(always.values())

  @classmethod
  def build(cls, tree, blocks, always_active, groups, master_weights, reset_always_active) -> _Plan:
    """The plan of ``tree`` (arrays or ``jax.ShapeDtypeStruct``) for these options."""
    labels = blocks_lib.resolve_blocks(blocks, tree, always_active)
    leaves = jax.tree_util.tree_leaves(tree)
    always = blocks_lib.always_active_leaves(labels)
    check_float_leaves(tree, "block_coordinate: always_active", only=[
        i in always for i in range(len(leaves))])
    check_float_leaves(
        tree, "block_coordinate", only=[max(blocks_lib.label_ids(lab)) >= 0 for lab in labels]
    )
    group_names = _group_names(tree, labels, groups)
    units = blocks_lib.units_of(labels)
    slot, where = blocks_lib.group_leaves(
        units, group_names, [x.shape for x in leaves], [jnp.dtype(x.dtype) for x in leaves]
    )
    members = [{} for _ in range(blocks_lib.num_blocks(labels))]
    for unit, w in zip(units, where):
      members[unit.block][w] = unit
    # Each always-active leaf has a slot position of its own, after the blocks' positions: in every
    # block's slot, so the inner state covers it (and is reset with the block's at every switch).
    always_at = {}
    for i in always:
      positions = slot.setdefault(group_names[i], [])
      positions.append((tuple(leaves[i].shape), jnp.dtype(leaves[i].dtype)))
      always_at[i] = (group_names[i], len(positions) - 1)
    master_positions = {
        g: [j for j, (_, dt) in enumerate(sigs) if master_weights and dt in _LOW_PRECISION]
        for g, sigs in slot.items()
    }
    keeps = not reset_always_active and bool(always_at)
    return cls(labels, units, where, slot, members, master_positions, always_at, master_weights,
               keeps)

  # -- the slot's layout

  def working_dtype(self, dt):
    """The dtype the inner solver sees for a slot position of dtype ``dt``."""
    return jnp.float32 if self.master_weights and dt in _LOW_PRECISION else dt

  def block_positions(self) -> list[tuple[str, int]]:
    """The slot positions that hold the active block's units (not the always-active leaves)."""
    return [(g, j) for g, sigs in self.slot.items() for j in range(len(sigs))
            if (g, j) not in self.always_positions]

  def parts(self, slot_values):
    """``(block positions, always-active positions)`` of a slot dict, each ``{group: tuple}``."""
    out = ({}, {})
    for g, values in slot_values.items():
      for part, mine in zip(out, (False, True)):
        picked = tuple(v for j, v in enumerate(values) if ((g, j) in self.always_positions) == mine)
        if picked:
          part[g] = picked
    return out

  def joined(self, block_part, always_part):
    """The slot dict of ``parts``' two halves."""
    out = {}
    for g, sigs in self.slot.items():
      its = {False: iter(block_part.get(g, ())), True: iter(always_part.get(g, ()))}
      out[g] = tuple(next(its[(g, j) in self.always_positions]) for j in range(len(sigs)))
    return out

  # -- parameter tree -> slot

  def gather(self, block, *trees):
    """For each ``(leaves, dtype_of)`` in ``trees``, the slot filled with ``block``'s units (zeros
    where the block has none), cast by ``dtype_of`` (``None``: kept).

    With a traced block, a slot position that every block fills from slices of one stacked leaf
    (the layers of a scanned model) is a ``dynamic_slice`` at the block's slice index: no
    conditional, so nothing upstream has to be materialised whole (a gradient that is zero outside
    the active layer stays an unmaterialised expression). Every other position is gathered by one
    ``lax.switch`` on the block, which runs only the selected branch.
    """
    positions = self.block_positions()
    if isinstance(block, int):
      filled = [self._fill(block, leaves, dtype_of, positions) for leaves, dtype_of in trees]
    else:
      sliced = self._sliced_positions(positions)
      filled = self._gather_switched(block, trees, [w for w in positions if w not in sliced])
      self._gather_sliced(block, trees, sliced, filled)
    for i, w in self.always.items():
      for out, (leaves, dtype_of) in zip(filled, trees):
        out[w] = _cast(leaves[i], self.slot[w[0]][w[1]][1], dtype_of)
    return tuple(
        {g: tuple(out[(g, j)] for j in range(len(sigs))) for g, sigs in self.slot.items()}
        for out in filled
    )

  def _fill(self, b, leaves, dtype_of, positions):
    """``{position: array}`` of block ``b``'s units at ``positions`` (zeros where it has none)."""
    out = {}
    for g, j in positions:
      shape, dt = self.slot[g][j]
      unit = self.members[b].get((g, j))
      out[(g, j)] = (_cast(unit.take(leaves[unit.leaf]), dt, dtype_of) if unit is not None
                     else jnp.zeros(shape, dtype_of(dt) if dtype_of else dt))
    return out

  def _sliced_positions(self, positions):
    """The positions every block fills from slices of one stacked leaf: ``position -> (leaf, per
    block its slice index or -1, layer axis)``."""
    sliced = {}
    for w in positions:
      units = [self.members[b].get(w) for b in range(self.num_blocks)]
      used = {u.leaf for u in units if u is not None}
      if len(used) == 1 and all(u is None or u.index is not None for u in units):
        axis = next(u.axis for u in units if u is not None)
        sliced[w] = (used.pop(), [-1 if u is None else u.index for u in units], axis)
    return sliced

  def _gather_switched(self, block, trees, switched):
    """Per tree, ``{position: array}`` at ``switched`` by one ``lax.switch`` on a traced block."""
    if not switched:
      return [{} for _ in trees]
    need = sorted({u.leaf for b in range(self.num_blocks) for w in switched
                   if (u := self.members[b].get(w)) is not None})

    def branch(b, operands):
      return [self._fill(b, dict(zip(need, ops)), dtype_of, switched)
              for ops, (_, dtype_of) in zip(operands, trees)]

    operands = [[leaves[i] for i in need] for leaves, _ in trees]
    return jax.lax.switch(
        block, [functools.partial(branch, b) for b in range(self.num_blocks)], operands)

  def _gather_sliced(self, block, trees, sliced, filled):
    """Adds to each of ``filled`` the ``sliced`` positions, a ``dynamic_slice`` at a traced block."""
    for w, (leaf, table, axis) in sliced.items():
      dt = self.slot[w[0]][w[1]][1]
      index = jnp.asarray(table, jnp.int32)[block]
      for out, (leaves, dtype_of) in zip(filled, trees):
        x = _cast(jax.lax.dynamic_index_in_dim(leaves[leaf], jnp.maximum(index, 0), axis,
                                               keepdims=False), dt, dtype_of)
        out[w] = x if min(table) >= 0 else jnp.where(index >= 0, x, jnp.zeros_like(x))

  # -- slot -> parameter tree

  def scatter(self, slot_values, block, like):
    """Full-shaped updates: the slot's values at the active block's units, zeros elsewhere."""
    by_leaf: dict[int, list[tuple[blocks_lib.Unit, tuple[str, int]]]] = {}
    for unit, w in zip(self.units, self.where):
      by_leaf.setdefault(unit.leaf, []).append((unit, w))
    out = []
    for i, leaf in enumerate(like):
      entries = by_leaf.get(i, [])
      if i in self.always:
        g, j = self.always[i]
        out.append(slot_values[g][j].astype(leaf.dtype))
      elif not entries:
        out.append(zeros_like_placed(leaf))
      elif isinstance(self.labels[i], int):
        out.append(_scatter_whole(slot_values, block, leaf, *entries[0]))
      elif isinstance(block, int):
        out.append(_scatter_slices_static(slot_values, block, leaf, entries))
      else:
        out.append(self._scatter_slices_traced(slot_values, block, leaf, entries))
    return out

  def _scatter_slices_traced(self, slot_values, block, leaf, entries):
    """A stacked leaf's update at a traced block: per slot position, the slice it fills for each
    block (-1: none), and a select along the stack axis (elementwise, fused into the output like
    the whole-leaf case)."""
    slices: dict[tuple[str, int], list[int]] = {}
    for unit, w in entries:
      slices.setdefault(w, [-1] * self.num_blocks)[unit.block] = unit.index
    axis = entries[0][0].axis
    layer = jax.lax.broadcasted_iota(jnp.int32, leaf.shape, axis)
    new = zeros_like_placed(leaf)
    for (g, j), table in slices.items():
      index = jnp.asarray(table, jnp.int32)[block]
      value = jnp.expand_dims(slot_values[g][j].astype(leaf.dtype), axis)
      new = jnp.where(layer == index, value, new)
    return new

  # -- the float32 master copy

  def master_of(self, slot_params):
    """A fresh master copy: the slot params at the master positions, in float32."""
    return {
        g: tuple(slot_params[g][j].astype(jnp.float32) for j in self.master_positions[g])
        for g in self.slot
    }

  def working_params(self, slot_params, master):
    """The slot params the inner solver sees: the master copy where there is one."""
    out = {}
    for g, values in slot_params.items():
      values = list(values)
      for m, j in zip(master[g], self.master_positions[g]):
        values[j] = m
      out[g] = tuple(values)
    return out

  def follow_applied(self, slot_params, master):
    """The master copy moved by whatever was applied since the last update.

    The last update asked for ``round(master) - params``; a stage after this one (a ``scale``, a
    learning rate, ``reduce_on_plateau``) may have applied something else. Adding the difference
    between the params now and ``round(master)`` makes the master copy follow what was applied
    (zero when the update was applied as returned; exactly zero right after a reset).
    """
    out = {}
    for g, values in master.items():
      out[g] = tuple(
          m + (slot_params[g][j].astype(jnp.float32)
               - m.astype(slot_params[g][j].dtype).astype(jnp.float32))
          for m, j in zip(values, self.master_positions[g])
      )
    return out

  def apply_to_master(self, inner_updates, master, slot_params):
    """``(new master, slot updates)``: the master copy moved by the inner updates, and the slot's
    updates with ``round(new master) - params`` at the master positions."""
    new_master = {
        g: tuple(m + inner_updates[g][j].astype(jnp.float32)
                 for m, j in zip(master[g], self.master_positions[g]))
        for g in self.slot
    }
    slot_updates = {}
    for g, values in inner_updates.items():
      values = list(values)
      for m, j in zip(new_master[g], self.master_positions[g]):
        p = slot_params[g][j]
        values[j] = (m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32)).astype(p.dtype)
      slot_updates[g] = tuple(values)
    return new_master, slot_updates

  # -- errors

  def check_state_fits(self, params, expected, actual):
    """Raises naming a parameter whose slot position the state (built at init) lacks or shapes
    differently: the params gained a leaf or changed shape between init and update."""
    want, want_def = jax.tree_util.tree_flatten_with_path(expected)
    have, have_def = jax.tree_util.tree_flatten_with_path(actual)
    sig = lambda x: (tuple(x.shape), jnp.dtype(x.dtype))  # noqa: E731
    if want_def == have_def and all(sig(a) == sig(b) for (_, a), (_, b) in zip(want, have)):
      return
    have_sig = {p: sig(x) for p, x in have}
    bad = next(((p, x) for p, x in want if have_sig.get(p) != sig(x)), None)
    group = pos = None
    for key in bad[0] if bad else ():
      if isinstance(key, jax.tree_util.DictKey) and key.key in self.slot:
        group = key.key
      elif isinstance(key, jax.tree_util.SequenceKey) and group is not None and pos is None:
        pos = key.idx
    unit = next((u for u, w in zip(self.units, self.where) if w == (group, pos)), None)
    unit = unit or next((blocks_lib.Unit(i, None, blocks_lib.ALWAYS_ACTIVE)
                         for i, w in self.always.items() if w == (group, pos)), None)
    if unit is None:
      detail = "the slot differs"
    else:
      name = unit.name(path_str(jax.tree_util.tree_flatten_with_path(params)[0][unit.leaf][0]))
      shape, dtype = self.slot[group][pos]
      found = have_sig.get(bad[0])
      detail = (f"parameter {name!r} {tuple(shape)} {dtype} needs a slot position that the state "
                f"has as {found[0] if found else 'nothing'}")
    raise ValueError(
        "block_coordinate: the state does not fit the params (built at init for another parameter "
        "tree: a leaf was added or changed shape); " + detail
        + "; re-run tx.init"
    )


def _cast(x, dt, dtype_of):
  """``x`` as a slot position of dtype ``dt`` holds it, converted by ``dtype_of`` (``None``: kept)."""
  return x.astype(dtype_of(dt) if dtype_of else dt)


def _group_names(tree, labels, groups) -> list[str]:
  """Per leaf, the name of its group (``"params"`` for every leaf without ``groups``)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if groups is None:
    return ["params"] * len(leaves)
  # Groups see the parameters as the slot holds them: a leaf labelled per slice as one slice.
  as_trained = jax.tree_util.tree_unflatten(treedef, [
      jax.ShapeDtypeStruct(blocks_lib.Unit(0, 0 if isinstance(lab, tuple) else None, 0,
                                           _stacks.label_axis(lab)).shape(x.shape), x.dtype)
      for x, lab in zip(leaves, labels)
  ])
  group_names = [str(g) for g in jax.tree_util.tree_leaves(groups(as_trained))]
  if len(group_names) != len(leaves):
    raise ValueError("groups must return a tree with the structure of the parameters")
  return group_names


def _scatter_whole(slot_values, block, leaf, unit, w):
  """A whole leaf's update: its slot position's value where its block is active, else zeros."""
  g, j = w
  value = slot_values[g][j].astype(leaf.dtype)
  if isinstance(block, int):
    return value if unit.block == block else zeros_like_placed(leaf)
  return jnp.where(block == unit.block, value, jnp.zeros_like(value))


def _scatter_slices_static(slot_values, block, leaf, entries):
  """A stacked leaf's update for a static block: its active slices written into zeros."""
  new = zeros_like_placed(leaf)
  for unit, (g, j) in entries:
    if unit.block == block:
      new = jax.lax.dynamic_update_index_in_dim(
          new, slot_values[g][j].astype(leaf.dtype), unit.index, unit.axis)
  return new


def block_coordinate(
    inner: optax.GradientTransformation,
    *,
    blocks: blocks_lib.BlockSpec = None,
    always_active: blocks_lib.AlwaysActiveSpec = None,
    reset_always_active: bool = True,
    switch_every: int = 100,
    switch_mode: str = "random",
    start_block: int | None = None,
    seed: int = 0,
    master_weights: bool = True,
    groups: Callable[[Any], Any] | None = None,
    accumulate_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on one active block of parameters at a time, cycling the blocks.

  With blocks :math:`B_0, \dots, B_{D-1}` and :math:`K` = ``switch_every``, update :math:`t` trains
  block :math:`\pi_e(j)` where :math:`j = \lfloor t/K \rfloor \bmod D` is the position in block-epoch
  :math:`e = \lfloor t/(KD) \rfloor` and :math:`\pi_e` is that epoch's order. Each block gets exactly
  :math:`K` consecutive updates (the first block included); at the start of each block period
  ``inner``'s state is re-initialised on the new block. Every leaf outside the active block, and every
  leaf labelled ``-1``, gets a zero update.

  Always-active leaves (``always_active``, e.g. a randomly initialised task head) are trained at
  every update whatever the active block, as the reference's ``active_modules``: they are in every
  block's slot, so ``inner`` sees them beside the active block's leaves and their state is
  re-initialised with the block's at every switch (the reference wipes their Adam moments at each
  switch too). The state then holds one block's slot plus the always-active leaves' (see
  :func:`describe_blocks`). A leaf both in a block and always active is always active (it leaves
  its block); a block left with no leaf is an error. With ``reset_always_active=False`` their state
  is kept across switches instead: a second instance of ``inner`` runs on them alone, never
  re-initialised (one uninterrupted Adam run for a head, say); ``inner``'s tree-wide operations
  (a clip inside ``inner``) then see the block and the always-active leaves separately.

  ``inner`` sees the active block as a dict ``{group: tuple of arrays}`` (the *slot*, see the module
  docstring), so it must not depend on parameter names: elementwise optimizers (Adam, Lion, SGD,
  sign-based methods) and tree-wide operations (clipping) work. Use ``groups`` to give different
  leaves different treatment (e.g. weight decay only on matrices).

  Schedules: ``inner``'s whole state is re-initialised at every block switch, its step counts
  included, so an Optax schedule *inside* ``inner`` (``optax.adam(schedule)``, a
  ``scale_by_schedule``) restarts at every block: with ``switch_every=10`` a linear decay gives step
  sizes ``lr(0) .. lr(9)``, then ``lr(0) .. lr(9)`` again. That is BAdam's reset (Adam's moments and
  bias correction restart); it cannot be undone for the counts alone, since ``inner``'s state is
  opaque. A schedule on the global step goes either to :func:`badam` (``learning_rate=schedule``)
  or to a stage *after* this one, whose state is outside the reset:
  ``optax.chain(block_coordinate(optax.scale_by_adam()), optax.scale_by_learning_rate(schedule))``
  (with bf16 parameters too, see mixed precision below). ``inner.update`` also receives the extra
  keyword argument ``global_step`` (int32, updates since ``init``), which a transformation written
  for it can read (:func:`badam`'s learning-rate stage does).

  Orders (``switch_mode``):
    * ``"random"``: each block-epoch visits every block once, in a fresh random permutation drawn
      from ``seed`` and the epoch number (random reshuffling, the paper's choice);
    * ``"ascending"`` / ``"descending"``: block ids up / down, wrapping around (block 0 is the one
      nearest the input for :func:`block_labels`);
    * ``"fixed"``: always ``start_block``.
    ``start_block`` (default 0) is the first block in every mode; in ``random`` mode the first
    epoch's permutation is changed by swapping ``start_block`` to the front.

  Mixed precision: when ``master_weights`` is true, slot positions whose parameters are bf16/fp16
  keep a float32 master copy in the state, ``inner`` runs on float32 gradients and master weights,
  and the returned update is ``round(master_new) - params`` in the parameters' dtype. Applying it
  with ``optax.apply_updates`` reproduces the rounded master copy wherever that difference is
  representable in the parameters' dtype, which is every element except, rarely, one whose sign
  flips while its magnitude changes scale. The master copy follows what was actually applied: at
  the start of each update it moves by ``params - round(master)`` (zero when the previous update
  was applied as returned, so the master keeps its sub-ulp precision), so stages chained after this
  one (``optax.scale``, a learning rate after ``block_coordinate(optax.scale_by_adam())``,
  ``reduce_on_plateau``) change the trajectory as they would for float32 parameters, up to the bf16
  rounding of each applied step. Float32 parameters get no copy.

  Gradient accumulation (``accumulate_every=N``): each call of ``update`` is one micro-batch; the
  gradients of ``N`` consecutive calls are averaged and ``inner`` runs once on their mean, at the
  window's last call; the other calls return zero updates. This is ``optax.MultiSteps(tx, N)``'s
  semantics (its float32 running mean, the same arithmetic), but the accumulator holds only the
  active block: it lives in the slot (float32, one block's size plus the always-active leaves'),
  because the active block changes only on optimizer steps, never inside a window. Every count in
  the schedule (``switch_every``, ``global_step``, a schedule on it) counts optimizer steps, not
  micro-batches. The micro-step and the running mean are in the state, so resuming in the middle
  of a window is exact. A stage before this one (``optax.clip_by_global_norm``) sees each
  micro-batch's gradient; to clip the window's mean gradient instead, clip inside ``inner``
  (``block_coordinate(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr)), ...)``).

  Args:
    inner: the Optax transformation to run on the active block, e.g. ``optax.adam(1e-4)``.
    blocks: the partition: ``None`` for :func:`block_labels` (one block per transformer layer,
      embedding and head frozen); a pytree of int labels with the structure of the params (``-1``
      frozen); a callable ``params -> labels``; or a list of regular expressions over dotted key
      paths, one block per expression, matched on whole path components (``r"layers\.1"`` never
      matches ``layers.10``; a leaf matched by several belongs to the first). A label tree may
      label whole leaves ``-2``: always active, and a stacked leaf per layer slice (a tuple or 1-D
      int array for the leading axis; ``block_labels``' ``StackLabels`` for a stack on axis 1,
      e.g. ``blocks=lambda p: block_labels(p, stacks={'decoder/layers': 1})``).
    always_active: leaves trained at every update whatever the active block: ``None`` (none), a
      list of regular expressions over dotted key paths (matched on whole path components as in
      ``blocks``; each must match a leaf), a pytree of bools with the structure of the params, or a
      callable ``params -> bools``. Whole leaves only (a stacked leaf ``[L, ...]`` is always active
      in all its layers).
    reset_always_active: re-initialise the always-active leaves' state at every switch with the
      block's (default, as the reference does), or keep it for the whole run (``False``).
    switch_every: number of consecutive updates per block (``K``, the paper uses 50 to 100).
    switch_mode: ``"random"``, ``"ascending"``, ``"descending"`` or ``"fixed"``.
    start_block: the first block (default 0).
    seed: seed of the ``random`` order.
    master_weights: keep a float32 master copy of the active block's bf16/fp16 leaves.
    groups: optional callable ``params -> pytree of str`` naming the group of each leaf; leaves of
      different groups never share a slot position and ``inner`` sees them under different keys.
    accumulate_every: micro-batches per optimizer step (``None`` or ``1``: no accumulation); see
      gradient accumulation above. Use it with :func:`make_block_step`, so that no full-size
      gradient exists at all.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`BlockCoordinateState`.

  Raises:
    ValueError: unknown ``switch_mode``, ``switch_every < 1``, ``start_block`` out of range, a block
      or ``always_active`` spec that matches no parameter, a block emptied by ``always_active`` (at
      ``init``).
    TypeError: a non-float parameter inside a block or always active (at ``init``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_memopt
    >>> params = {'layers': [{'w': jnp.ones(3)}, {'w': jnp.ones(3)}]}
    >>> tx = optax_memopt.block_coordinate(optax.sgd(0.1), switch_every=2,
    ...                                    switch_mode='ascending')
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> [[round(float(x), 3) for x in layer['w']] for layer in params['layers']]
    [[0.8, 0.8, 0.8], [0.9, 0.9, 0.9]]
    >>> int(optax_memopt.active_block(state))
    1

  References:
    Luo, Yu, Li, `BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language
    Models <https://arxiv.org/abs/2404.02827>`_, NeurIPS 2024.
  """
  _validate_schedule(switch_every, switch_mode, start_block)
  _accumulate.validate_every(accumulate_every)
  if not isinstance(reset_always_active, bool):
    raise TypeError(
        "reset_always_active decides the state's structure and must be a Python bool; under "
        "optax.inject_hyperparams pass static_args=('reset_always_active', ...)"
    )
  if isinstance(always_active, str):
    raise TypeError(
        "always_active: a single string is ambiguous; pass a list of regular expressions, e.g. "
        f"[{always_active!r}]"
    )
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  stage = _BlockCoordinate(
      inner, blocks=blocks, always_active=always_active, reset_always_active=reset_always_active,
      switch_every=switch_every, switch_mode=switch_mode, start_block=start_block, seed=seed,
      master_weights=master_weights, groups=groups, accumulate_every=accumulate_every,
  )
  return optax.GradientTransformationExtraArgs(stage.init, stage.update)


class _BlockCoordinate:
  """One :func:`block_coordinate` stage: its validated options, its plans and its init and update.

  ``token`` identifies the stage to :func:`optax_memopt.make_block_step`'s labels probe (see
  ``optax_memopt._protocol``).
  """

  def __init__(self, inner, *, blocks, always_active, reset_always_active, switch_every,
               switch_mode, start_block, seed, master_weights, groups, accumulate_every):
    self.inner = optax.with_extra_args_support(inner)
    self.blocks, self.always_active, self.groups = blocks, always_active, groups
    self.reset_always_active, self.master_weights = reset_always_active, master_weights
    self.switch_every, self.switch_mode, self.seed = switch_every, switch_mode, seed
    self.start_block = start_block
    self.first = 0 if start_block is None else start_block
    self.n_acc = 1 if accumulate_every is None else accumulate_every
    self.token = object()
    self._plan_for = functools.lru_cache(maxsize=8)(self._build_plan)

  def _build_plan(self, treedef, shapes) -> _Plan:
    skeleton = jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    )
    return _Plan.build(skeleton, self.blocks, self.always_active, self.groups, self.master_weights,
                       self.reset_always_active)

  def plan(self, tree) -> _Plan:
    """The plan of ``tree``'s shapes and dtypes (cached)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return self._plan_for(treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves))

  # -- the inner transformation on the slot (twice, with a state kept for the always-active leaves)

  def inner_init(self, plan: _Plan, work):
    if not plan.keeps:
      return self.inner.init(work)
    return tuple(self.inner.init(part) for part in plan.parts(work))

  def inner_update(self, plan: _Plan, grads, inner_state, work, **kwargs):
    if not plan.keeps:
      return self.inner.update(grads, inner_state, work, **kwargs)
    outs = [self.inner.update(g, st, w, **kwargs)
            for g, st, w in zip(plan.parts(grads), inner_state, plan.parts(work))]
    return plan.joined(outs[0][0], outs[1][0]), (outs[0][1], outs[1][1])

  # -- init

  def init(self, params):
    if is_params_placeholder(params):
      # optax.tree.map_params applies its function to the parts of a state shaped like the params
      # (with any extra params-shaped trees). Nothing here is: the slot's inner state and master
      # copy are shaped like one block's slot, not like the params, so every field is a non-param
      # (``transform_non_params`` gets each field whole).
      return BlockCoordinateState(*(jnp.zeros([], jnp.int32) for _ in BlockCoordinateState._fields))
    plan = self.plan(params)
    d = plan.num_blocks
    if self.start_block is not None and self.start_block >= d:
      raise ValueError(f"start_block={self.start_block} is out of range for {d} blocks")
    key = jax.random.key_data(jax.random.key(self.seed)).astype(jnp.uint32)
    order = _block_order(self.switch_mode, d, jnp.int32(self.first), key, jnp.int32(0))
    (slot_params,) = plan.gather(self.first, (jax.tree_util.tree_leaves(params), None))
    master = plan.master_of(slot_params)
    inner_state = self.inner_init(plan, plan.working_params(slot_params, master))
    return BlockCoordinateState(
        jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), order[0], order, key, inner_state,
        master, jnp.asarray(self.switch_every, jnp.int32), _accumulate.init(slot_params, self.n_acc),
    )

  # -- update: gather, reset at a switch, accumulate, inner update, scatter, advance the schedule

  def update(self, updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("block_coordinate requires params: call tx.update(grads, state, params)")
    static_block = extra_args.pop(STATIC_BLOCK_ARG, None)
    probe = extra_args.pop(LABELS_PROBE_ARG, None)
    check_same_structure("block_coordinate", updates, "grads", params, "params")
    plan = self.plan(params)
    if probe is not None:
      # The labels, and the key paths of the leaves this stage sees (a wrapper such as
      # optax.multi_transform hands it part of the tree): make_block_step maps them to its own.
      probe[self.token] = (plan.labels, [jax.tree_util.keystr(p) for p, _ in
                                         jax.tree_util.tree_flatten_with_path(params)[0]])
    if state.order.shape != (plan.num_blocks,):
      raise ValueError(
          f"block_coordinate: the params have {plan.num_blocks} blocks but the state was built at "
          f"init for {state.order.shape[0]}; the parameter tree changed between init and update "
          "(re-run tx.init)"
      )
    param_leaves = jax.tree_util.tree_leaves(params)
    grad_leaves, treedef = jax.tree_util.tree_flatten(updates)
    block = state.active_block if static_block is None else static_block
    slot_params, slot_grads = plan.gather(
        block, (param_leaves, None), (grad_leaves, plan.working_dtype)
    )
    inner_state, master = self._reset_at_switch(plan, state, slot_params, params)
    slot_updates, inner_state, master, emit, acc_grads = self._step_slot(
        plan, state, slot_params, slot_grads, inner_state, master, extra_args)
    new_updates = jax.tree_util.tree_unflatten(
        treedef, plan.scatter(slot_updates, block, param_leaves)
    )
    new_state = BlockCoordinateState(
        *self._advance_schedule(state, emit, plan.num_blocks), state.key, inner_state, master,
        state.switch_every, _accumulate.advance(state.accumulator, acc_grads, emit, self.n_acc),
    )
    return new_updates, new_state

  def _reset_at_switch(self, plan: _Plan, state, slot_params, params):
    """``(inner state, master copy)`` to step from: fresh ones on the first update of a block
    period (the always-active leaves' kept when ``plan.keeps``), else the state's; the master copy
    then follows what was applied since the last update."""
    fresh = state.block_step == 0
    fresh_master = plan.master_of(slot_params)
    fresh_state = (self.inner_init(plan, plan.working_params(slot_params, fresh_master)), fresh_master)
    plan.check_state_fits(params, fresh_state, (state.inner_state, state.master))
    fresh_state = (_keep_hyperparams(fresh_state[0], state.inner_state), fresh_master)
    # An elementwise select rather than lax.cond: the fresh state (zeros for Adam) fuses into the
    # inner update, where a conditional would materialise a copy of the whole slot state.
    if plan.keeps:  # the always-active leaves' state and master copy are never reset
      inner_state = (optax.tree.where(fresh, fresh_state[0][0], state.inner_state[0]),
                     state.inner_state[1])
      master = {g: tuple(old if (g, j) in plan.always_positions else jnp.where(fresh, new, old)
                         for j, new, old in zip(plan.master_positions[g], fresh_state[1][g],
                                                state.master[g]))
                for g in plan.slot}
    else:
      inner_state, master = optax.tree.where(fresh, fresh_state, (state.inner_state, state.master))
    return inner_state, plan.follow_applied(slot_params, master)

  def _step_slot(self, plan: _Plan, state, slot_params, slot_grads, inner_state, master, extra_args):
    """Accumulates the micro-batch and runs ``inner`` on the slot.

    Returns ``(slot updates, inner state, master copy, emit, accumulated grads)``: with
    accumulation, ``inner`` runs on the window's mean at every micro-step and its results are
    kept only where the window ends (``emit``), as ``optax.MultiSteps`` does: one block's
    elementwise work.
    """
    work = plan.working_params(slot_params, master)
    slot_grads, emit, acc_grads = _accumulate.add(state.accumulator, slot_grads, self.n_acc)
    held = (inner_state, master)
    inner_updates, inner_state = self.inner_update(
        plan, slot_grads, inner_state, work, **extra_args, **{GLOBAL_STEP_ARG: state.count}
    )
    if self.n_acc > 1:
      inner_updates = jax.tree.map(lambda u: jnp.where(emit, u, jnp.zeros((), u.dtype)), inner_updates)
    new_master, slot_updates = plan.apply_to_master(inner_updates, master, slot_params)
    if self.n_acc > 1:
      inner_state, new_master = _accumulate.on_emit(emit, (inner_state, new_master), held)
    return slot_updates, inner_state, new_master, emit, acc_grads

  def _advance_schedule(self, state, emit, d):
    """``(count, block_step, active_block, order)`` after this update (unchanged inside an
    accumulation window)."""
    k = self.switch_every
    count = optax.safe_increment(state.count)
    block_step = (state.block_step + 1) % k
    period = count // k
    epoch = period // d
    new_epoch = (block_step == 0) & (period % d == 0)
    order = jax.lax.cond(
        new_epoch,
        lambda: _block_order(self.switch_mode, d, jnp.int32(self.first), state.key, epoch),
        lambda: state.order,
    )
    active = jnp.where(block_step == 0, order[period % d], state.active_block)
    schedule = (count, block_step, active.astype(jnp.int32), order)
    if self.n_acc > 1:
      schedule = _accumulate.on_emit(
          emit, schedule, (state.count, state.block_step, state.active_block, state.order))
    return schedule


def _scale_by_learning_rate_on_global_step(learning_rate: optax.ScalarOrSchedule):
  """``-learning_rate`` scaling whose schedule reads the ``global_step`` extra argument."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params
    if callable(learning_rate):
      lr = learning_rate(extra_args[GLOBAL_STEP_ARG])
    else:
      lr = learning_rate
    return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _add_decayed_weights(weight_decay: Any, mask: Callable[[Any], Any] | None):
  """``updates + weight_decay * params`` where ``mask(params)`` (every leaf for ``None``).

  As ``optax.add_decayed_weights``, but its state is ``EmptyState`` whatever the mask and the
  value, and a Python ``0`` adds nothing (so ``badam(weight_decay=0.0)`` computes plain Adam).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
      return updates, state
    keep = jax.tree.map(lambda _: True, params) if mask is None else mask(params)
    updates = jax.tree.map(
        lambda u, p, m: (u + weight_decay * p).astype(u.dtype) if m else u, updates, params, keep
    )
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def default_weight_decay_mask(params: Any) -> Any:
  """True for leaves with two or more dimensions (matrices, kernels), False for norms and biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def badam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: blocks_lib.BlockSpec = None,
    always_active: blocks_lib.AlwaysActiveSpec = None,
    reset_always_active: bool = True,
    switch_every: int = 100,
    switch_mode: str = "random",
    start_block: int | None = None,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = "matrices",
    master_weights: bool = True,
    accumulate_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""BAdam: block coordinate descent with AdamW on the active block.

  :func:`block_coordinate` with AdamW as the inner solver. On the active block, update :math:`t`
  (:math:`s` = steps into the block period, restarting at 1 at every switch) is

  .. math::
    m_s = \beta_1 m_{s-1} + (1-\beta_1) g_t, \quad v_s = \beta_2 v_{s-1} + (1-\beta_2) g_t^2, \\
    u_t = -\eta_t \left( \frac{m_s / (1-\beta_1^s)}{\sqrt{v_s / (1-\beta_2^s)} + \epsilon}
          + \lambda \theta_t \right),

  with :math:`m_0 = v_0 = 0` at the start of every block period, and :math:`\eta_t` the learning
  rate schedule evaluated at the *global* step :math:`t` (it does not restart at a switch). Leaves
  outside the active block get :math:`u_t = 0`. Optimizer state: AdamW's two moments for one block
  (plus a float32 master copy of it when params are bf16/fp16), see :func:`block_coordinate`.

  As a drop-in (``jax.grad``, then ``tx.update``) BAdam saves optimizer memory only: the backward
  pass still computes every weight gradient. :func:`optax_memopt.make_block_step` differentiates
  only the active block, which also saves the backward pass below it and all but one block's
  gradient buffers; run a scanned layer stack with :func:`optax_memopt.scan_layers` so that every
  layer block shares one compiled step.

  Leaves named in ``always_active`` (e.g. a new classification head) take the update above at every
  step whatever the active block, with their moments reset at each switch together with the block's
  (the reference's ``active_modules``; ``reset_always_active=False`` keeps them, and their bias
  correction, for the whole run); their state is added to the block's.

  Args:
    learning_rate: a scalar or an ``optax`` schedule on the global step.
    blocks: the partition, see :func:`block_coordinate` (default: one block per transformer layer,
      embedding and head frozen; see :func:`block_labels`).
    always_active: leaves trained at every step whatever the active block: ``None``, a list of
      regular expressions over dotted key paths (e.g. ``['classifier']``), a pytree of bools or a
      callable ``params -> bools``; see :func:`block_coordinate`.
    reset_always_active: reset the always-active leaves' moments at every switch (default, as the
      reference), or keep them for the whole run (``False``).
    switch_every: Adam steps per block (``K``).
    switch_mode: ``"random"`` (default), ``"ascending"``, ``"descending"`` or ``"fixed"``.
    start_block: first block (default 0).
    seed: seed of the ``random`` order.
    b1, b2, eps: Adam's coefficients.
    weight_decay: decoupled weight decay :math:`\lambda` (AdamW). It may be injected with
      ``optax.inject_hyperparams``: the state's structure does not depend on its value.
    weight_decay_mask: which leaves are decayed: ``"matrices"`` (default) for leaves with
      ``ndim >= 2`` (not norm scales or biases), ``None`` for every leaf, or a pytree of bools or a
      callable ``params -> bools`` (then decayed and other leaves never share a slot position, and
      the slot has the groups ``"decay"`` and ``"no_decay"``, whatever ``weight_decay``).
    master_weights: keep a float32 master copy of the active block's bf16/fp16 leaves.
    accumulate_every: micro-batches per optimizer step (``None`` or ``1``: none): the gradients
      of ``accumulate_every`` consecutive calls are averaged in a float32 accumulator of the
      active block's size and one AdamW step is taken on their mean, as
      ``optax.MultiSteps(badam(...), accumulate_every)`` does with a full-size accumulator;
      ``switch_every`` and the learning-rate schedule count optimizer steps. See
      :func:`block_coordinate`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_memopt
    >>> params = {'layers': [{'w': jnp.ones((2, 2))} for _ in range(3)]}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  optax_memopt.badam(1e-2, switch_every=2, switch_mode='ascending'))
    >>> state = tx.init(params)
    >>> loss = lambda p: sum(jnp.sum(l['w'] ** 2) for l in p['layers'])
    >>> for _ in range(2):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(l['w'][0, 0]), 3) for l in params['layers']]
    [0.98, 1.0, 1.0]

    A head trained at every step beside the active layer:

    >>> params = {'layers': [{'w': jnp.ones(2)} for _ in range(3)], 'head': jnp.ones(2)}
    >>> tx = optax_memopt.badam(1e-2, switch_mode='ascending', always_active=['head'])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> [round(float(u[0]), 3) for u in (updates['layers'][0]['w'], updates['layers'][1]['w'],
    ...                                  updates['head'])]
    [-0.01, 0.0, -0.01]

    Gradient accumulation over two micro-batches, with an accumulator of one layer's size:

    >>> params = {'layers': [{'w': jnp.ones(2)} for _ in range(3)]}
    >>> tx = optax_memopt.badam(1e-2, switch_mode='ascending', accumulate_every=2)
    >>> state = tx.init(params)
    >>> [g.shape for g in state.accumulator.grads['params']]
    [(2,)]
    >>> for g in (1.0, 3.0):
    ...   updates, state = tx.update(jax.tree.map(lambda p: g * p, params), state, params)
    ...   print(round(float(updates['layers'][0]['w'][0]), 3), int(state.count))
    0.0 0
    -0.01 1

  References:
    Luo, Yu, Li, `BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language
    Models <https://arxiv.org/abs/2404.02827>`_, NeurIPS 2024.
  """
  # The slot's grouping and the state's structure depend on the mask only, never on the value of
  # weight_decay: under optax.inject_hyperparams it is an array (possibly 0.0), and the state must
  # be the one badam builds for the same arguments.
  if isinstance(weight_decay_mask, str) and weight_decay_mask != "matrices":
    raise ValueError(
        f"weight_decay_mask must be 'matrices', None, a pytree of bools or a callable "
        f"params -> bools, got {weight_decay_mask!r}"
    )
  if weight_decay_mask is None:
    groups, decay_mask = None, None
  elif isinstance(weight_decay_mask, str):
    # Decided by a slot position's shape, which every leaf it holds shares: no groups needed.
    groups, decay_mask = None, lambda slot: jax.tree.map(lambda x: x.ndim >= 2, slot)
  else:
    mask_fn = blocks_lib.as_callable_mask(weight_decay_mask)
    groups = lambda params: jax.tree.map(lambda m: "decay" if m else "no_decay", mask_fn(params))
    decay_mask = lambda slot: {g: tuple(g == "decay" for _ in v) for g, v in slot.items()}
  inner = optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      _add_decayed_weights(weight_decay, decay_mask),
      _scale_by_learning_rate_on_global_step(learning_rate),
  )
  return block_coordinate(
      inner,
      blocks=blocks,
      always_active=always_active,
      reset_always_active=reset_always_active,
      switch_every=switch_every,
      switch_mode=switch_mode,
      start_block=start_block,
      seed=seed,
      master_weights=master_weights,
      groups=groups,
      accumulate_every=accumulate_every,
  )


def find_block_state(opt_state: Any) -> list[Any]:
  """All block-coordinate states (BAdam and its ratio variant) inside any optimizer state."""
  return find_states(opt_state, (BlockCoordinateState, BAdamRatioState))


def active_block(opt_state: Any) -> jax.Array:
  """The active block of a :func:`badam` / :func:`block_coordinate` stage inside ``opt_state``.

  Works on the state of the transformation itself or of anything that wraps it (``optax.chain``,
  ``optax.MultiSteps``, ``optax.inject_hyperparams``, ``optax.apply_if_finite``, ...). For
  :func:`badam_ratio` it is the index of the current selection period.

  Raises:
    ValueError: ``opt_state`` holds no block-coordinate state, or more than one.
  """
  found = find_block_state(opt_state)
  if len(found) != 1:
    raise ValueError(
        f"active_block: expected exactly one block-coordinate state in opt_state, found {len(found)}"
    )
  return jnp.asarray(found[0].active_block)
