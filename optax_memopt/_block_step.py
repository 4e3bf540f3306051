"""The block-gradient training step: differentiate only BAdam's active block (and the leaves that
train at every step: always-active leaves, leaves another optimizer in ``tx`` trains).

Used as a drop-in gradient transformation, BAdam saves optimizer memory but ``jax.grad`` still computes
every weight gradient of the model. :func:`make_block_step` compiles one training step per block in
which only that block's leaves are differentiated: the other leaves enter the loss as constants, so
JAX's backward pass skips their weight-gradient matmuls and stops at the lowest active layer, and the
gradient buffers are one block's. The host knows which compiled step to call from the optimizer state:
it reads ``(active_block, block_step, switch_every)`` once at a block boundary (one small device read
per ``switch_every`` steps) and calls the same compiled step until the next possible switch. That
cache holds only while each call gets the state the previous call returned; any other state (a
fresh ``init``, a restored checkpoint) is read again.

Stacked layers: blocks that are the same slice of a set of stacked leaves (the default partition
of a scanned model: block ``j`` = layer ``j`` of every stacked weight) share *one* compiled step, in
which the slice index is read from the state on the device. With the stack run by
:func:`optax_memopt.scan_layers`, that step differentiates the active layer only (see ``_scan``).

Pieces: :class:`BlockStep` is the step object (the host's cache of compiled steps by block, the
schedule read at block boundaries); :func:`_step_labels` finds what each leaf is for the step (by
probing ``tx.update``); ``BlockStep._trace_block`` / ``_trace_stack`` trace one block's step (whole
leaves, or the traced layer slice of a stack, with :class:`_StackLoss`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import optax

from optax_memopt import _accumulate, _badam, _blocks, _jaxpr, _protocol, _scan, _stacks, _step, _tree
from optax_memopt._badam_ratio import BAdamRatioState


def _block_state(opt_state):
  found = _badam.find_block_state(opt_state)
  ratio = [s for s in found if isinstance(s, BAdamRatioState)]
  found = [s for s in found if isinstance(s, _badam.BlockCoordinateState)]
  if ratio and not found:
    raise TypeError(
        "make_block_step: badam_ratio trains a fraction of every tensor, so no layer can be left out "
        "of the backward pass; train it with jax.grad and tx.update instead"
    )
  if not found and _plain_block_state(opt_state):
    raise TypeError(
        "make_block_step: opt_state holds the BAdam state as plain dicts (keys "
        f"{', '.join(_badam.BlockCoordinateState._fields[:3])}, ...) instead of a "
        "BlockCoordinateState: a checkpoint restored without a target (orbax restores NamedTuples "
        "as dicts); restore with the state's structure as target, e.g. mngr.restore(step, "
        "args=ocp.args.StandardRestore(jax.eval_shape(tx.init, params)))"
    )
  if len(found) != 1:
    raise TypeError(
        "make_block_step: tx must contain exactly one optax_memopt.badam / block_coordinate stage "
        f"(alone or inside optax.chain, MultiSteps, inject_hyperparams); its state has {len(found)}"
    )
  return found[0]


def _plain_block_state(tree) -> bool:
  """Whether ``tree`` holds a mapping with a block-coordinate state's fields (a restored checkpoint
  whose NamedTuples came back as dicts)."""
  fields = set(_badam.BlockCoordinateState._fields)
  if isinstance(tree, dict):
    return fields <= set(tree) or any(_plain_block_state(v) for v in tree.values())
  if isinstance(tree, (list, tuple)):
    return any(_plain_block_state(v) for v in tree)
  return False


def _stack_groups(labels) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
  """Blocks that are one slice ``j`` of a fixed set of stacked leaves, grouped by that set.

  Returns ``block -> (leaves, table)`` where ``table[b]`` is block ``b``'s slice index for every
  block of the group (``-1`` for blocks outside it): such blocks share one compiled step with the
  slice index traced.
  """
  members: dict[int, list[tuple[int, int | None]]] = {}
  for unit in _blocks.units_of(labels):
    members.setdefault(unit.block, []).append((unit.leaf, unit.index))
  by_leaves: dict[tuple[int, ...], dict[int, int]] = {}
  for block, units in members.items():
    slices = {j for _, j in units}
    if None in slices or len(slices) != 1:
      continue  # a whole leaf, or slices at different depths: compiled on its own
    leaves = tuple(sorted({i for i, _ in units}))
    if len(leaves) != len(units):
      continue
    by_leaves.setdefault(leaves, {})[block] = slices.pop()
  out = {}
  d = _blocks.num_blocks(labels)
  for leaves, slice_of in by_leaves.items():
    if len(slice_of) < 2:
      continue
    table = tuple(slice_of.get(b, -1) for b in range(d))
    for block in slice_of:
      out[block] = (leaves, table)
  return out


def _unsliced_reason(stacked: list[Any], unmatched: list[list[tuple[tuple[int, ...], Any]]]) -> str:
  """The warning when the stacked leaves of the block step did not reach ``scan_layers`` as given:
  ``unmatched`` lists, per ``scan_layers`` call that ran without them, its leaves' (shape, dtype)."""
  cost = ("so the whole stack is differentiated for one layer's gradient (correct, not faster)")
  if not unmatched:
    return ("make_block_step: the layer stack does not run through optax_memopt.scan_layers, "
            f"{cost}; run the stack with optax_memopt.scan_layers for the savings")
  want = {(tuple(x.shape), jnp.dtype(x.dtype)) for x in stacked}
  got = {(shape, jnp.dtype(dt)) for call in unmatched for shape, dt in call}
  cast = sorted({f"{w[1].name} -> {g[1].name}" for w in want for g in got
                 if w[0] == g[0] and w[1] != g[1]})
  if cast:
    why = (f"they were cast before the scan ({', '.join(cast)}); cast them inside the layer "
           "function instead")
  else:
    why = ("they were replaced on the way (a jax.jit or jax.checkpoint / nnx.remat around the "
           "call to scan_layers traces them anew, or a copy); put jax.checkpoint on the layer "
           "function and call scan_layers on the params as given")
  return (f"make_block_step: optax_memopt.scan_layers ran, but not on the step's stacked params as "
          f"given: {why}; {cost}")


def _step_labels(tx, params, opt_state) -> list[Any]:
  """Per leaf of ``params``, the label the block step works from.

  The block-coordinate stage's labels (block ids, ``-1`` frozen, ``-2`` always active) for the
  leaves it sees; for the leaves it does not see (``optax.multi_transform`` gives it part of the
  tree), ``-2`` when the update ``tx`` computes for the leaf depends on the leaf's gradient (another
  optimizer trains it: the step must differentiate it), else ``-1`` (``optax.set_to_zero``).
  """
  closed, stage_labels, stage_paths = _probe_stage(tx, params, opt_state)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  labels: list[Any] = [None] * len(paths)
  for i, lab in zip(_stage_positions(stage_paths, paths), stage_labels):
    labels[i] = lab
  _stacks.refuse_other_axes(
      "make_block_step", _tree.leaf_paths(params),
      [_stacks.label_axis(lab) if isinstance(lab, tuple) else None for lab in labels])
  outside = [i for i, lab in enumerate(labels) if lab is None]
  trained = _jaxpr.own_gradient_reaches_update(closed.jaxpr, outside) if outside else set()
  return [(_blocks.ALWAYS_ACTIVE if i in trained else _blocks.FROZEN) if lab is None else lab
          for i, lab in enumerate(labels)]


def _probe_stage(tx, params, opt_state):
  """``tx.update``'s jaxpr (gradients -> update leaves), with the labels and key paths that its one
  block-coordinate stage reports over ``_protocol.LABELS_PROBE``."""
  probe: dict[Any, Any] = {}
  grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)

  def probed_update(grads, opt_state, params):
    updates, _ = tx.update(grads, opt_state, params, **{_protocol.LABELS_PROBE: probe})
    return jax.tree_util.tree_leaves(updates)

  closed = jax.make_jaxpr(probed_update)(grads, opt_state, params)
  if len(probe) != 1:
    raise TypeError(
        "make_block_step: tx must contain exactly one optax_memopt.badam / block_coordinate stage"
    )
  stage_labels, stage_paths = next(iter(probe.values()))
  return closed, stage_labels, stage_paths


def _stage_positions(stage_paths, paths) -> list[int]:
  """Where each leaf the block-coordinate stage sees sits among the step's ``paths``."""
  where = {p: i for i, p in enumerate(paths)}
  if all(p in where for p in stage_paths):
    return [where[p] for p in stage_paths]
  if len(stage_paths) == len(paths):
    return list(range(len(paths)))
  raise TypeError(
      "make_block_step: the block-coordinate stage sees parameters that are not those of the "
      f"step ({stage_paths[:2]} ...): a wrapper in tx changes the parameter tree; use jax.grad "
      "and tx.update"
  )


def _refuse_deleted(params, opt_state) -> None:
  deleted = next((f"{what} {p!r}" for what, tree in (("parameter", params), ("opt_state leaf", opt_state))
                  if (p := _step.deleted_leaf(tree)) is not None), None)
  if deleted is not None:
    raise RuntimeError(
        f"make_block_step: {deleted} was deleted: an earlier call donated it (donate=True reuses "
        "the buffers of params and opt_state, and nnx.split / nnx.state share a module's arrays, "
        "so the module's are deleted too); pass the params and state the last call returned "
        "(nnx.update(model, params) before using or splitting the module again), or "
        "make_block_step(..., donate=False)")


def _zeros_but(leaves, index, grads) -> list[Any]:
  """Per leaf of ``leaves``, a zero gradient, or ``grads``' entry for the leaves ``index``."""
  out = [jnp.zeros_like(x) for x in leaves]
  for i, g in zip(index, grads):
    out[i] = g
  return out


def _add_updates(leaves, update_leaves, index) -> list[Any]:
  """``leaves`` with the update added (in the leaf's dtype) to the leaves ``index``."""
  new_leaves = list(leaves)
  for i in index:
    new_leaves[i] = (leaves[i] + update_leaves[i]).astype(leaves[i].dtype)
  return new_leaves


def _stack_gradients(leaves, leaf_index, slice_grads, whole, whole_grads, k) -> list[Any]:
  """The full gradient tree's leaves: layer ``k``'s gradients of the stacked leaves ``leaf_index``
  (zero at the other layers), the whole gradients of the leaves ``whole``, zeros elsewhere."""
  # Zero outside layer k, as an elementwise expression XLA fuses into its consumers (BAdam
  # gathers layer k with a dynamic slice; a global-norm clip reduces over it): the stack-sized
  # gradient is never materialised.
  grads = [jnp.zeros_like(x) for x in leaves]
  for i, g in zip(leaf_index, slice_grads):
    x = leaves[i]
    layer = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    grads[i] = jnp.where(layer == k, g.astype(x.dtype)[None], jnp.zeros((), x.dtype))
  for i, g in zip(whole, whole_grads):
    grads[i] = g
  return grads


def _stack_write_back(leaves, update_leaves, leaf_index, whole, k) -> list[Any]:
  """``leaves`` updated: slice ``k`` of the stacked leaves ``leaf_index``, the leaves ``whole``."""
  new_leaves = list(leaves)
  for i in leaf_index:
    # Only slice k changes: written in place into the (donated) stacked leaf.
    new = (jax.lax.dynamic_index_in_dim(leaves[i], k, keepdims=False)
           + jax.lax.dynamic_index_in_dim(update_leaves[i], k, keepdims=False))
    new_leaves[i] = jax.lax.dynamic_update_index_in_dim(
        leaves[i], new.astype(leaves[i].dtype), k, 0)
  for i in whole:
    new_leaves[i] = (leaves[i] + update_leaves[i]).astype(leaves[i].dtype)
  return new_leaves


class _StackLoss:
  """The loss of the stacked step as a function of layer ``k``'s slices of the stacked leaves
  ``leaf_index`` and of the whole leaves ``whole``; it records the ``_scan._Active`` entries handed
  to ``scan_layers`` (``found``) and the ``scan_layers`` calls that matched none (``unmatched``)."""

  def __init__(self, step, leaves, treedef, leaf_index, whole, k, args, kwargs):
    self.step, self.leaves, self.treedef = step, leaves, treedef
    self.leaf_index, self.whole, self.k = leaf_index, whole, k
    self.args, self.kwargs = args, kwargs
    self.found: list[_scan._Active] = []
    self.unmatched: list[list[tuple[tuple[int, ...], Any]]] = []

  def __call__(self, active, always):
    full = list(self.leaves)
    entries = {}
    for i, a in zip(self.whole, always):
      full[i] = a
    for i, a in zip(self.leaf_index, active):
      full[i] = _scan.mark_active(self.leaves[i], a, self.k)
      entries[id(full[i])] = _scan._Active(a, self.k)
    with _scan.active_slices(entries, frozenset(id(full[i]) for i in self.whole)) as seen:
      out = self.step.loss_fn(jax.tree_util.tree_unflatten(self.treedef, full), *self.args,
                              **self.kwargs)
    self.unmatched.extend(seen)
    self.found.extend(entries.values())
    self.step.scalar_loss(out)
    return out


class BlockStep(_step.Step):
  """The step :func:`make_block_step` returns: ``step(params, opt_state, *args, **kwargs) ->
  (params, opt_state, loss)``, one compiled function per block (blocks that are layer slices of the
  same stacked leaves share one).

  Attributes:
    compiled_blocks: the blocks compiled so far (a live view of the cache's keys).
    trace_count: the number of traces (one per compiled function).
    warned: whether the warning that the layer stack did not run through ``scan_layers`` as given
      was issued (it is issued once per step object).
  """

  name = "make_block_step"

  def __init__(self, loss_fn, tx, *, has_aux: bool = False, donate: bool = True):
    _step.check_loss_fn(self.name, loss_fn)
    super().__init__(loss_fn, _step.as_transformation(self.name, tx), has_aux=has_aux, donate=donate)
    self.warned = False
    self._compiled: dict[int, Callable[..., Any]] = {}
    # The block the host last read from a state, how many calls it stays active, and the schedule
    # array of the state the last call returned: the cache holds for that state only.
    self._block: int | None = None
    self._calls_left = 0
    self._returned: Any = None

  @property
  def compiled_blocks(self):
    """The blocks whose step is compiled so far (a live view)."""
    return self._compiled.keys()

  def __call__(self, params, opt_state, *args, **kwargs):
    state = _block_state(opt_state)
    if self.donate:
      _refuse_deleted(params, opt_state)
    if state.count is not self._returned:
      # Not the state the previous call returned (the first call, a fresh init, a restored
      # checkpoint): the cached block says nothing about it.
      self._calls_left = 0
      if self.donate:
        # A fresh state (from tx.init) may hold one array in two places; donation needs distinct
        # buffers.
        params, opt_state = _step.distinct_buffers((params, opt_state))
        state = _block_state(opt_state)
    if self._calls_left <= 0:
      self._read_schedule(state)
    fn = self._compiled_for(self._block, params, opt_state)
    self._calls_left -= 1
    out = fn(params, opt_state, *args, **kwargs)
    self._returned = _block_state(out[1]).count
    return out

  def lower(self, block, params, opt_state, *args, **kwargs):
    """``jax.stages.Lowered`` of the step for ``block`` (inputs may be ``ShapeDtypeStruct``)."""
    return self._compiled_for(block, params, opt_state).lower(params, opt_state, *args, **kwargs)

  def _read_schedule(self, state) -> None:
    """Reads the active block from ``state`` (one small device read), and for how many calls it
    stays active."""
    block, block_step, period, micro, every = (int(x) for x in jax.device_get(
        (state.active_block, state.block_step, state.switch_every,
         state.accumulator.micro_step, state.accumulator.every)))
    # Each call advances the block's step by at most one (MultiSteps and apply_if_finite can
    # hold it back), and by none inside an accumulation window, so the active block cannot
    # change for at least this many calls.
    self._block, self._calls_left = block, _accumulate.calls_left(period, block_step, micro, every)

  def _compiled_for(self, block, params, opt_state):
    if block not in self._compiled:
      labels = _step_labels(self.tx, params, opt_state)
      shardings = _step.mesh_shardings((params, opt_state))
      group = _stack_groups(labels).get(block)
      if group is None:
        self._compiled[block] = self._build(block, labels, shardings)
      else:
        whole = tuple(_blocks.always_active_leaves(labels))
        fn = self._build_stack(group[0], group[1], whole, shardings)
        for b, j in enumerate(group[1]):
          if j >= 0:
            self._compiled[b] = fn
    return self._compiled[block]

  def _build(self, block, labels, shardings):
    """The compiled step of one block (whole leaves, or slices at a static index)."""
    # A stacked leaf with a slice in the block is differentiated whole (its other slices' updates
    # are zero); always-active leaves (and leaves another optimizer in tx trains) are in every step.
    index = [i for i, lab in enumerate(labels)
             if block in _blocks.label_ids(lab) or lab == _blocks.ALWAYS_ACTIVE]

    def one_step(params, opt_state, *args, **kwargs):
      return self._trace_block(block, index, shardings, params, opt_state, args, kwargs)

    return self.jit(one_step)

  def _trace_block(self, block, index, shardings, params, opt_state, args, kwargs):
    self.trace_count += 1
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def block_loss(active):
      full = list(leaves)
      for i, a in zip(index, active):
        full[i] = a
      out = self.loss_fn(jax.tree_util.tree_unflatten(treedef, full), *args, **kwargs)
      self.scalar_loss(out)
      return out

    out, block_grads = jax.value_and_grad(block_loss, has_aux=self.has_aux)(
        [leaves[i] for i in index]
    )
    grads = _zeros_but(leaves, index, block_grads)
    updates, opt_state = self.tx.update(
        jax.tree_util.tree_unflatten(treedef, grads),
        opt_state,
        params,
        **{_protocol.STATIC_BLOCK: block},
    )
    new_leaves = _add_updates(leaves, jax.tree_util.tree_leaves(updates), index)
    # On a device mesh, hand back params and state sharded as they came in: left alone, the
    # partitioner may pick another layout for a few outputs (e.g. a norm scale split over the
    # batch axis its gradient was reduced over).
    new_params, opt_state = _step.keep_shardings(
        (jax.tree_util.tree_unflatten(treedef, new_leaves), opt_state), shardings
    )
    return new_params, opt_state, out

  def _build_stack(self, leaf_index, table, whole, shardings):
    """One step for every block that is slice ``j`` of the stacked leaves ``leaf_index``: the slice
    is read from the state's active block on the device, so this compiles once. The leaves
    ``whole`` (always active) are differentiated whole in every block."""
    table = jnp.asarray(table, jnp.int32)

    def one_step(params, opt_state, *args, **kwargs):
      return self._trace_stack(leaf_index, table, whole, shardings, params, opt_state, args, kwargs)

    return self.jit(one_step)

  def _trace_stack(self, leaf_index, table, whole, shardings, params, opt_state, args, kwargs):
    self.trace_count += 1
    leaves, treedef = jax.tree_util.tree_flatten(params)
    k = table[_block_state(opt_state).active_block]
    slices = [jax.lax.dynamic_index_in_dim(leaves[i], k, keepdims=False) for i in leaf_index]
    block_loss = _StackLoss(self, leaves, treedef, leaf_index, whole, k, args, kwargs)
    out, (slice_grads, whole_grads) = jax.value_and_grad(
        block_loss, argnums=(0, 1), has_aux=self.has_aux)(slices, [leaves[i] for i in whole])
    if not all(e.used for e in block_loss.found) and not self.warned:
      self.warned = True
      warnings.warn(_unsliced_reason([leaves[i] for i in leaf_index], block_loss.unmatched),
                    stacklevel=_scan._caller_stacklevel())
    grads = _stack_gradients(leaves, leaf_index, slice_grads, whole, whole_grads, k)
    updates, opt_state = self.tx.update(
        jax.tree_util.tree_unflatten(treedef, grads), opt_state, params
    )
    new_leaves = _stack_write_back(leaves, jax.tree_util.tree_leaves(updates), leaf_index, whole, k)
    new_params, opt_state = _step.keep_shardings(
        (jax.tree_util.tree_unflatten(treedef, new_leaves), opt_state), shardings
    )
    return new_params, opt_state, out


def make_block_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable[..., tuple[Any, Any, Any]]:
  """A training step that differentiates only BAdam's active block.

  Returns ``step(params, opt_state, *args, **kwargs) -> (params, opt_state, loss)`` (``loss`` is
  ``(loss, aux)`` with ``has_aux``), which computes ``loss_fn(params, *args, **kwargs)`` and its
  gradient with respect to the active block's leaves only, feeds the optimizer, and writes back only
  the active block. It gives the same parameters as the drop-in path
  (``jax.grad`` of everything, then ``tx.update``) up to float32 rounding, at a fraction of the
  backward cost and with one block's gradient buffers.

  One function per block is compiled (lazily, the first time the block is active) and cached: over a
  run at most one compilation per block and none after the first block-epoch. Blocks that are layer
  slices of stacked leaves (a scanned model, labelled per layer as :func:`block_labels` does) share a
  single compiled step whatever their number: the active layer is a traced index. Run the stack with
  :func:`optax_memopt.scan_layers` so that this step differentiates the active layer only (the layers
  above it for their activations only, none below it); a stack run another way (``nnx.scan``,
  ``lax.scan``) gets the right gradient at the cost of the whole stack's backward pass, with a
  warning.

  Sharded training works as with any jitted step: pass params and state placed on a device mesh
  (``NamedSharding``); each block's step returns them with the shardings they had when that block was
  compiled, and only the active block's gradients and updates are computed. ``loss_fn`` may use
  ``jax.checkpoint`` / ``nnx.remat``: layers below the active block are never differentiated, so they
  are not recomputed in the backward pass either.

  Always-active leaves (``badam(always_active=...)``) are differentiated in every block's step,
  wherever they sit (beside the layers, or a whole stacked leaf inside a ``scan_layers`` stack, whose
  every layer is then differentiated). So is any leaf that an optimizer outside the block-coordinate
  stage trains, e.g. the head in ``optax.multi_transform({'head': optax.adamw(...), 'rest':
  badam(...)}, labels)``: a leaf the block-coordinate stage does not see is differentiated when the
  update ``tx`` computes for it depends on its gradient, and left out when it does not
  (``optax.set_to_zero()``). A ``tx`` that hands that stage a different parameter tree (e.g.
  ``optax.flatten``) is refused.

  Anything before the block-coordinate stage in ``tx`` sees the full gradient tree with zeros outside
  the active block (and the leaves above): a global-norm clip (``optax.clip_by_global_norm``) clips
  by the active block's norm (with the always-active leaves), as the reference implementation does.
  For gradient accumulation use ``badam(..., accumulate_every=N)`` (each call is then one
  micro-batch): its accumulator is one block's, in the optimizer state, so neither a full-size
  gradient nor a full-size accumulator ever exists. ``optax.MultiSteps`` works too, with its
  full-size accumulator.

  With Flax NNX, split the model and merge it inside the loss::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    def loss_fn(params, rest, batch):
      model = nnx.merge(graphdef, params, rest)
      return compute_loss(model, batch)
    step = optax_memopt.make_block_step(loss_fn, tx)
    opt_state = tx.init(params)
    params, opt_state, loss = step(params, opt_state, rest, batch)
    nnx.update(model, params)  # when the module is needed again

  With Linen, ``params`` is the ``variables['params']`` dict and ``loss_fn`` calls ``model.apply``.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
    tx: an optimizer containing exactly one :func:`badam` / :func:`block_coordinate` stage, alone or
      inside ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``, ``apply_if_finite``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    donate: donate ``params`` and ``opt_state`` to the compiled step (their buffers are reused for the
      outputs; do not use the arrays passed in after the call). With NNX, ``nnx.split`` shares the
      module's arrays: the module's parameters are deleted by the first call, so call
      ``nnx.update(model, params)`` with the returned params before using the module again.

  Returns:
    The step, a :class:`BlockStep` called like a function. Its attribute ``compiled_blocks`` is the
    set of blocks compiled so far, ``trace_count`` the number of traces, and
    ``lower(block, params, opt_state, *args)`` gives the ``jax.stages.Lowered`` step of one block (for
    XLA's cost and memory analyses).

  Raises:
    TypeError: ``tx`` has no block-coordinate stage, changes the parameter tree it hands that stage,
      or ``loss_fn`` does not return a scalar (at the first call).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_memopt
    >>> params = {'layers': [{'w': jnp.ones((2, 2))} for _ in range(3)]}
    >>> def loss_fn(params, x):
    ...   for layer in params['layers']:
    ...     x = jnp.tanh(x @ layer['w'])
    ...   return jnp.sum(x ** 2)
    >>> tx = optax_memopt.badam(1e-2, switch_every=2, switch_mode='ascending')
    >>> step = optax_memopt.make_block_step(loss_fn, tx)
    >>> opt_state = tx.init(params)
    >>> for _ in range(6):
    ...   params, opt_state, loss = step(params, opt_state, jnp.ones((1, 2)))
    >>> sorted(step.compiled_blocks)
    [0, 1, 2]
  """
  return BlockStep(loss_fn, tx, has_aux=has_aux, donate=donate)
