"""Layer-wise updates: the optimizer runs inside the backward pass, one layer at a time.

``jax.grad`` followed by ``tx.update`` holds the whole model's gradient at once (4 bytes per
parameter in float32). :func:`make_layerwise_step` instead hands each layer's gradient to the optimizer
as soon as the backward pass has computed it: the layer stack's backward scan (run by
:func:`optax_memopt.scan_layers`) computes layer ``l``'s weight gradient, applies ``tx.update`` to
layer ``l``'s slice of the weights and of every per-layer part of the optimizer state, writes the
new slices back and moves on to layer ``l - 1``, so at most one layer's gradient exists at a time.
The leaves outside the stacks (embedding, final norm, head) are updated after the backward pass.
With ``accumulate=N`` the step takes ``N`` micro-batches at once and sums each layer's gradient
over them (one micro-batch's pullback at a time) before that layer's single update.

Pieces: :func:`_make_plan` finds the stacks and which state leaves each one slices (from shapes);
:class:`_PerLayerCheck` refuses a ``tx`` whose update cannot run layer by layer (on ``tx.update``'s
jaxprs, analysed by ``_jaxpr``); :class:`LayerwiseStep` is the step object (host state, one compiled
function); :class:`_LayerwiseTrace` is one trace of it (the per-layer update :class:`_LayerUpdate`
handed to ``scan_layers``, then the leaves outside the stacks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_memopt import _badam, _badam_ratio, _jaxpr, _scan, _stacks, _step, _tree

# Integer optimizer-state slices travel through the backward pass as cotangents, which must be
# floats: they are bit-cast to a float of the same width and back (the bits are never computed on).
_CARRIER = {4: jnp.float32, 2: jnp.float16, 1: jnp.float8_e5m2}


def _to_carrier(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return jax.lax.bitcast_convert_type(x, _CARRIER[x.dtype.itemsize])


def _from_carrier(x: jax.Array, dtype: Any) -> jax.Array:
  if jnp.issubdtype(dtype, jnp.inexact):
    return x
  return jax.lax.bitcast_convert_type(x, dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How a params/state structure is trained layer by layer (found once, from shapes only)."""

  stack_names: tuple[str, ...]
  stack_of_leaf: tuple[int | None, ...]  # per params leaf: its stack, None outside stacks
  owner: tuple[int | None, ...]  # per state leaf: the stack whose layers it is sliced by
  lengths: tuple[int, ...]  # per stack, its number of layers


def _state_paths(opt_state: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]


def _refuse_known(opt_state: Any) -> None:
  """Clear errors for the transformations we know cannot run layer by layer."""
  kinds = (
      (optax.MultiStepsState, "optax.MultiSteps keeps a full-size gradient accumulator (the buffer "
       "layer-wise updates exist to avoid); pass the inner optimizer with "
       "make_layerwise_step(..., accumulate=N)"),
      (_badam.BlockCoordinateState, "badam / block_coordinate train one block at a time; use "
       "optax_memopt.make_block_step"),
      (_badam_ratio.BAdamRatioState, "badam_ratio's selection spans whole leaves; use the "
       "ordinary step"),
      (optax.contrib.ReduceLROnPlateauState, "optax.contrib.reduce_on_plateau needs the loss "
       "(tx.update(..., value=loss)), which the updates inside the backward pass are not given; "
       "use the ordinary step"),
  )

  for x in _tree.find_states(opt_state, tuple(k for k, _ in kinds)):
    for kind, why in kinds:
      if isinstance(x, kind):
        raise TypeError(f"make_layerwise_step: tx cannot be applied layer by layer: {why}")


def _check_state_is_for(tx, params, opt_state) -> None:
  """A one-line error when ``opt_state`` is not ``tx.init(params)``'s kind of state (made for other
  parameters, or by another optimizer), before anything blames ``tx``."""
  expected = jax.eval_shape(tx.init, params)
  got_leaves, got_def = jax.tree_util.tree_flatten(opt_state)
  want_leaves, want_def = jax.tree_util.tree_flatten(expected)
  got_paths, want_paths = _state_paths(opt_state), _state_paths(expected)
  if got_def != want_def:
    first = next((p for p in got_paths if p not in set(want_paths)), None)
    first = first or next((p for p in want_paths if p not in set(got_paths)), "its containers")
    raise ValueError(
        f"make_layerwise_step: opt_state does not have the structure of tx.init(params) (at "
        f"{first}): it was made for other parameters or by another optimizer; pass "
        "tx.init(params)")
  for path, got, want in zip(got_paths, got_leaves, want_leaves):
    if tuple(jnp.shape(got)) != tuple(want.shape):
      raise ValueError(
          f"make_layerwise_step: the state leaf {path} has shape {tuple(jnp.shape(got))}, but "
          f"tx.init(params) gives {tuple(want.shape)}: opt_state was made for other parameters; "
          "pass tx.init(params)")


def _make_plan(tx, params, opt_state, stacks) -> _Plan:
  leaves = jax.tree_util.tree_leaves(params)
  paths = _tree.leaf_paths(params)
  shapes = [tuple(jnp.shape(x)) for x in leaves]
  keys, names = _find_stacks(paths, shapes, stacks)
  for path, x in zip(paths, leaves):
    if not _tree.is_float(x):
      raise TypeError(
          f"make_layerwise_step: parameter {path!r} has dtype {x.dtype}; only float parameters "
          "can be trained (keep other arrays out of params)"
      )
  stack_of_leaf = tuple(None if k is None else names.index(k[0]) for k in keys)
  lengths = tuple(next(k[1] for k in keys if k is not None and k[0] == n) for n in names)
  _refuse_known(opt_state)
  _check_state_is_for(tx, params, opt_state)
  owner = _state_owners(tx, params, opt_state, names, stack_of_leaf, lengths)
  return _Plan(tuple(names), stack_of_leaf, owner, lengths)


def _find_stacks(paths, shapes, stacks) -> tuple[list[Any], list[str]]:
  """Per params leaf its stack key (``None`` outside stacks), and the stacks' names in order."""
  keys = _stacks.find_stacks(paths, shapes, _stacks.list_keys(paths), stacks)
  _stacks.refuse_other_axes("make_layerwise_step", paths, [None if k is None else k.axis for k in keys])
  names: list[str] = []
  for k in keys:
    if k is not None and k[0] not in names:
      names.append(k[0])
  if not names:
    raise ValueError(
        "make_layerwise_step: no layer stack found in params (stacked leaves [L, ...] under a "
        f"name like 'layers'; paths look like {paths[:3]}); name it with stacks=..."
    )
  return keys, names


def _state_owners(tx, params, opt_state, names, stack_of_leaf, lengths) -> tuple[int | None, ...]:
  """Per state leaf, the stack whose layers it is sliced by (``None``: shared by all layers)."""
  state_leaves, state_def = jax.tree_util.tree_flatten(opt_state)
  state_paths = _state_paths(opt_state)
  owner: list[int | None] = [None] * len(state_leaves)
  for a, name in enumerate(names):
    # One layer is seen as a stack of one ([1, ...]): tx recognises it as it recognises the stack (a
    # stack of square matrices' layer [d, d] would look like a stack of d vectors), and decides on
    # its ndim as on the stack's. A stack of one is probed as two, to tell its layers' state apart.
    probe = 1 if lengths[a] > 1 else 2
    view_leaves = _layer_view_state(tx, params, stack_of_leaf, a, probe, state_def, name)
    for j, (full, one, path) in enumerate(zip(state_leaves, view_leaves, state_paths)):
      if not _is_layer_state(full, one, path, probe, lengths[a], name):
        continue
      if owner[j] is not None:
        raise ValueError(f"make_layerwise_step: the state leaf {path} belongs to two stacks")
      if not jnp.issubdtype(one.dtype, jnp.inexact) and one.dtype.itemsize not in _CARRIER:
        raise TypeError(
            f"make_layerwise_step: the state leaf {path} has dtype {one.dtype}; per-layer state "
            "must be a float or an integer of 8, 16 or 32 bits"
        )
      owner[j] = a
  return tuple(owner)


def _layer_view_state(tx, params, stack_of_leaf, a, probe, state_def, name) -> list[Any]:
  """The leaves of ``tx.init``'s state (shapes only) with stack ``a``'s leaves cut to ``probe``
  layers."""
  leaves = jax.tree_util.tree_leaves(params)
  view = [jax.ShapeDtypeStruct((probe,) + tuple(jnp.shape(x))[1:], x.dtype) if st == a
          else jax.ShapeDtypeStruct(tuple(jnp.shape(x)), x.dtype) for x, st in zip(leaves, stack_of_leaf)]
  params_def = jax.tree_util.tree_structure(params)
  view_state = jax.eval_shape(tx.init, jax.tree_util.tree_unflatten(params_def, view))
  view_leaves, view_def = jax.tree_util.tree_flatten(view_state)
  if view_def != state_def:
    raise ValueError(
        "make_layerwise_step: tx.init gives a state of another structure for one layer of the "
        f"stack {name!r} than opt_state has; tx cannot be applied layer by layer"
    )
  return view_leaves


def _is_layer_state(full, one, path, probe, length, name) -> bool:
  """Whether the state leaf ``full`` is the stack of its layers' states ``one`` (``probe`` layers):
  ``False`` when the leaf does not change with the layers (shared), an error when it does otherwise."""
  full_shape = tuple(jnp.shape(full))
  if full_shape == tuple(one.shape):
    return False
  if (not one.shape or one.shape[0] != probe or full_shape != (length,) + tuple(one.shape[1:])
      or jnp.result_type(full) != one.dtype):
    raise ValueError(
        f"make_layerwise_step: the state leaf {path} has shape {full_shape}, but for one layer "
        f"of the stack {name!r} tx keeps {(1,) + tuple(one.shape[1:])}: it is not the stack of "
        "its layers' states, so tx cannot be applied layer by layer"
    )
  return True


class _PerLayerCheck:
  """Raises a one-line error when an update computed layer by layer would differ: the update of a
  stack's layer (or its state) reads another stack's or an outer leaf's gradient, or the update of
  an outer leaf (or a shared state leaf such as a step count) reads a stack's; it draws random
  numbers from a key shared by every layer; the ordinary update of a stacked leaf reads other
  inputs than one layer's, or reduces over the layer axis.

  Found on ``tx.update``'s jaxprs (shapes only): the one-layer update, whose inputs are tagged
  ``("g", i)``, ``("s", j)``, ``("p", i)`` (gradient, state, value leaves) and ``("layer", 0)``,
  and the ordinary update on the whole stacked leaves.
  """

  def __init__(self, tx, plan: _Plan, params, opt_state):
    self.tx, self.plan = tx, plan
    self.leaves, self.params_def = jax.tree_util.tree_flatten(params)
    self.state_leaves, self.state_def = jax.tree_util.tree_flatten(opt_state)
    self.paths = _tree.leaf_paths(params)
    self.state_paths = _state_paths(opt_state)
    n, m = len(self.leaves), len(self.state_leaves)
    # Input ids: ("g", i), ("s", j), ("p", i) in the order make_jaxpr flattened them.
    self.in_ids = ([frozenset({("g", i)}) for i in range(n)] + [frozenset({("s", j)}) for j in range(m)]
                   + [frozenset({("p", i)}) for i in range(n)] + [frozenset({("layer", 0)})])

  def run(self) -> None:
    out = _jaxpr.deps(self._layer_jaxpr(), self.in_ids)
    n, plan = len(self.leaves), self.plan
    u_deps, s_deps = out[:n], out[n:]
    # Per output of the update: (its stack, what it is, what it depends on).
    self.outputs = (
        [(plan.stack_of_leaf[i], f"the update of {self.paths[i]!r}", d) for i, d in enumerate(u_deps)]
        + [(plan.owner[j], f"the new state leaf {self.state_paths[j]}", d)
           for j, d in enumerate(s_deps)])
    self._check_reads()
    self._check_random()
    whole = self._ordinary_jaxpr()
    self._check_same_reads(whole)
    self._check_layer_axis(whole)

  def _apply(self, g, s, p, **extra):
    u, new_s = self.tx.update(
        jax.tree_util.tree_unflatten(self.params_def, g), jax.tree_util.tree_unflatten(self.state_def, s),
        jax.tree_util.tree_unflatten(self.params_def, p), **extra)
    return jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(new_s)

  def _layer_jaxpr(self):
    """The jaxpr of the update of one layer of every stack (stacked leaves seen as ``[1, ...]``)."""
    plan = self.plan

    def view_shape(x, stack):
      s = tuple(jnp.shape(x))
      return (1,) + s[1:] if stack is not None else s

    g = [jax.ShapeDtypeStruct(view_shape(x, a), x.dtype) for x, a in zip(self.leaves, plan.stack_of_leaf)]
    s = [jax.ShapeDtypeStruct(view_shape(x, a), jnp.result_type(x))
         for x, a in zip(self.state_leaves, plan.owner)]
    mask = [a is not None for a in plan.stack_of_leaf]

    def update(g, s, p, layer):
      return self._apply(g, s, p, **{_tree.LAYER_SLICE_ARG: (mask, layer)})

    return jax.make_jaxpr(update)(g, s, g, jax.ShapeDtypeStruct((), jnp.int32))

  def _ordinary_jaxpr(self):
    """The jaxpr of the ordinary update on the whole stacked leaves."""
    full = [jax.ShapeDtypeStruct(tuple(jnp.shape(x)), jnp.result_type(x)) for x in self.leaves]
    full_s = [jax.ShapeDtypeStruct(tuple(jnp.shape(x)), jnp.result_type(x)) for x in self.state_leaves]
    return jax.make_jaxpr(self._apply)(full, full_s, full)

  def _where(self, kind, k):
    """The stack of an input and its description."""
    if kind == "s":
      return self.plan.owner[k], f"the state leaf {self.state_paths[k]}"
    what = "gradient" if kind == "g" else "value"
    return self.plan.stack_of_leaf[k], f"the {what} of {self.paths[k]!r}"

  def _stack_name(self, a):
    return "outside the layer stacks" if a is None else f"in the layer stack {self.plan.stack_names[a]!r}"

  def _check_reads(self) -> None:
    for a, what, deps in self.outputs:
      for kind, k in _real(deps):
        b, source = self._where(kind, k)
        # A layer's update may read outer values and state (they are the step's inputs in both
        # places); it may not read an outer gradient, nor anything of another stack. An outer update
        # may read nothing of a stack.
        bad = (b != a and b is not None) or (a is not None and b is None and kind == "g") or (
            a is None and b is not None)
        if bad:
          raise ValueError(
              f"make_layerwise_step: tx cannot be applied layer by layer: {what} ({self._stack_name(a)}) "
              f"depends on {source} ({self._stack_name(b)}); a transformation that needs the whole "
              "gradient (optax.clip_by_global_norm, apply_if_finite, ...) must run in the ordinary "
              "step"
          )

  def _check_random(self) -> None:
    # Random numbers: a layer's draw must come from a key that depends on the layer (the layer index
    # passed as LAYER_SLICE_ARG, or the layer's own state), else every layer gets the same numbers.
    for a, what, deps in self.outputs:
      for d in deps:
        if a is None or d[0] != "rand":
          continue
        key = d[1]
        if ("layer", 0) in key or any(self._where(kind, k)[0] == a for kind, k in _real(key)):
          continue
        raise ValueError(
            f"make_layerwise_step: tx cannot be applied layer by layer: {what} adds random numbers "
            "drawn from a key shared by every layer (optax.add_noise, noisy_sgd, ...), so every "
            "layer would get the same draw; use the ordinary step")

  def _check_same_reads(self, whole) -> None:
    # The ordinary update on the whole stacked leaves: it must read what one layer's update reads
    # (a callable mask or a choice made on a leaf's shape sees a stacked leaf [L, d] and one layer's
    # [d] differently), and must not reduce over a stacked leaf's layer axis.
    for (_, what, deps), whole_deps in zip(self.outputs, _jaxpr.deps(whole, self.in_ids[:-1])):
      one, every = _real(deps), _real(whole_deps)
      if one == every:
        continue
      kind, k = sorted(set(one) ^ set(every))[0]
      reads = "reads" if (kind, k) in every else "does not read"
      raise ValueError(
          f"make_layerwise_step: tx cannot be applied layer by layer: in the ordinary step {what} "
          f"{reads} {self._where(kind, k)[1]}, for one layer of the stack it does "
          f"{'not ' * (reads == 'reads')}"
          "(a callable mask or a choice made on a leaf's shape, e.g. adamw(mask=lambda p: ... ndim "
          "...), sees a stacked leaf [L, ...] and one layer differently); pass the mask as a tree of "
          "bools computed from the params, or use the ordinary step")

  def _check_layer_axis(self, whole) -> None:
    plan = self.plan
    axes_in = ([_jaxpr.Axis(None if a is None else 0) for a in plan.stack_of_leaf]
               + [_jaxpr.Axis(None if a is None else 0) for a in plan.owner]
               + [_jaxpr.Axis(None if a is None else 0) for a in plan.stack_of_leaf])
    for (a, what, _), got in zip(self.outputs, _jaxpr.axes(whole, axes_in, None)):
      if a is not None and got.mix:
        raise ValueError(
            f"make_layerwise_step: tx cannot be applied layer by layer: {what} uses a number "
            f"computed across the layers of the stacked leaf, in {sorted(got.mix)[0]} (a "
            "transformation that reduces over a whole leaf: optax.lamb, lars, fromage, adafactor, "
            "clip_by_block_rms, ...); one layer at a time it would differ, use the ordinary step")


def _real(deps):
  """The parameter and state inputs among ``deps`` (not the layer index, not random draws)."""
  return sorted(d for d in deps if d[0] in ("g", "s", "p"))


class _LayerUpdate:
  """The update of one layer of stack ``a``, called by ``scan_layers``' backward pass:
  ``(layer, grads, weights, states) -> (new weights, new state carriers)``."""

  def __init__(self, trace: _LayerwiseTrace, a: int):
    self.trace, self.a = trace, a
    self.members, self.owned = trace.members_of[a], trace.owned_of[a]
    self.mask = [b == a for b in trace.plan.stack_of_leaf]

  def __call__(self, layer, grads, weights, states):
    trace, members, owned = self.trace, self.members, self.owned
    u, new_s = trace.view_update(
        {i: g[None] for i, g in zip(members, grads)},
        {i: w[None] for i, w in zip(members, weights)},
        {j: _from_carrier(c, jnp.result_type(trace.state_leaves[j]))[None]
         for j, c in zip(owned, states)},
        {_tree.LAYER_SLICE_ARG: (self.mask, layer)},
    )
    new_w = [(w + u[i][0]).astype(w.dtype) for i, w in zip(members, weights)]
    new_c = [_to_carrier(new_s[j][0]) for j in owned]
    return new_w, new_c


class _LayerwiseTrace:
  """One trace of the layer-wise step on ``params`` and ``opt_state`` laid out by ``plan``: the
  forward and backward pass (the stacks' layers updated inside it), then the update of the leaves
  outside the stacks."""

  def __init__(self, step: LayerwiseStep, plan: _Plan, params, opt_state, args, kwargs):
    self.step, self.plan, self.args, self.kwargs = step, plan, args, kwargs
    self.leaves, self.params_def = jax.tree_util.tree_flatten(params)
    self.state_leaves, self.state_def = jax.tree_util.tree_flatten(opt_state)
    self.paths = _tree.leaf_paths(params)
    self.n_stacks = len(plan.stack_names)
    self.members_of = [[i for i, a in enumerate(plan.stack_of_leaf) if a == s] for s in range(self.n_stacks)]
    self.owned_of = [[j for j, a in enumerate(plan.owner) if a == s] for s in range(self.n_stacks)]
    self.outer = [i for i, a in enumerate(plan.stack_of_leaf) if a is None]

  def view_update(self, grads, weights, states, extra):
    """tx.update on the params' structure, stacked leaves seen as one layer (a stack of one,
    ``[1, ...]``); ``grads``, ``weights``, ``states``: {leaf index: value} for the leaves that
    matter, zeros elsewhere."""
    plan = self.plan
    g = [grads[i] if i in grads else _zeros_view(x, a is not None)
         for i, (x, a) in enumerate(zip(self.leaves, plan.stack_of_leaf))]
    p = [weights[i] if i in weights else (x if a is None else _zeros_view(x, True))
         for i, (x, a) in enumerate(zip(self.leaves, plan.stack_of_leaf))]
    s = [states[j] if j in states else (x if a is None else _zeros_view(x, True))
         for j, (x, a) in enumerate(zip(self.state_leaves, plan.owner))]
    u, new_s = self.step.tx.update(
        jax.tree_util.tree_unflatten(self.params_def, g),
        jax.tree_util.tree_unflatten(self.state_def, s),
        jax.tree_util.tree_unflatten(self.params_def, p),
        **extra,
    )
    return jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(new_s)

  def run(self):
    """``(new params, new state, loss_fn's output)``."""
    leaves, state_leaves = self.leaves, self.state_leaves
    stacked = [[leaves[i] for i in self.members_of[a]] for a in range(self.n_stacks)]
    carriers = [[_to_carrier(state_leaves[j]) for j in self.owned_of[a]] for a in range(self.n_stacks)]
    misuse_box: list[list[str]] = []

    def f(outer_leaves, bundle):
      out, misuse = self.loss_of(outer_leaves, *bundle)
      misuse_box.append(misuse)
      loss = out[0] if self.step.has_aux else out
      return loss, out

    (_, out), (g_outer, (new_stacked, new_carriers)) = jax.value_and_grad(
        f, argnums=(0, 1), has_aux=True)([leaves[i] for i in self.outer], (stacked, carriers))
    for misuse in misuse_box:
      if misuse:
        raise ValueError(
            f"make_layerwise_step: the stacked weight {misuse[0]!r} is used outside "
            "optax_memopt.scan_layers in loss_fn; under layer-wise updates every use of a "
            "stacked weight must be inside the scanned layer function"
        )
    new_params, new_state = self.assemble(g_outer, new_stacked, new_carriers)
    return new_params, new_state, out

  def assemble(self, g_outer, new_stacked, new_carriers):
    """The new params and state: the stacks' from the backward pass, the others' updated now."""
    leaves, state_leaves, plan = self.leaves, self.state_leaves, self.plan
    # The leaves outside the stacks, and the shared state (step counts, ...), after the backward
    # pass; the stacks' slices given to this update are zeros and their results are dropped.
    u, new_s = self.view_update(dict(zip(self.outer, g_outer)), {}, {}, {})
    new_leaves = list(leaves)
    for i in self.outer:
      new_leaves[i] = (leaves[i] + u[i]).astype(leaves[i].dtype)
    for a in range(self.n_stacks):
      for i, w in zip(self.members_of[a], new_stacked[a]):
        new_leaves[i] = w
    new_state = list(state_leaves)
    for j, a in enumerate(plan.owner):
      if a is None:
        new_state[j] = new_s[j]
    for a in range(self.n_stacks):
      for j, c in zip(self.owned_of[a], new_carriers[a]):
        new_state[j] = _from_carrier(c, jnp.result_type(state_leaves[j]))
    new_params = jax.tree_util.tree_unflatten(self.params_def, new_leaves)
    new_state = jax.tree_util.tree_unflatten(self.state_def, new_state)
    if self.step.shardings is not None:
      new_params, new_state = _step.keep_shardings((new_params, new_state), self.step.shardings)
    return new_params, new_state

  def loss_of(self, outer_leaves, stacked, carriers):
    """``loss_fn``'s output on the params with the given outer leaves and stacks (whose layers
    ``scan_layers`` updates in its backward pass), and the stacked weights used outside it."""
    full = list(self.leaves)
    for i, x in zip(self.outer, outer_leaves):
      full[i] = x
    members: dict[int, _scan._Member] = {}
    stack_objs = []
    misuse: list[str] = []
    for a in range(self.n_stacks):
      obj = _scan._Stack(self.plan.stack_names[a], len(self.members_of[a]), list(carriers[a]),
                         _LayerUpdate(self, a), micro_batches=self.step.accumulate)
      stack_objs.append(obj)
      for k, (i, w) in enumerate(zip(self.members_of[a], stacked[a])):
        full[i] = _watch(w, self.paths[i], misuse)
        members[id(full[i])] = _scan._Member(obj, k, w)
    with _scan.layerwise_stacks(members):
      out = self.call_loss(jax.tree_util.tree_unflatten(self.params_def, full))
    for obj in stack_objs:
      _check_stack_used(obj)
    self.step.scalar_loss(out)
    return out, misuse

  def call_loss(self, tree):
    step = self.step
    if step.accumulate is None:
      return step.loss_fn(tree, *self.args, **self.kwargs)
    # loss_fn on each micro-batch (a vmap over the micro-batch axis); the loss is their mean,
    # so each layer's gradient, summed over the micro-batches in scan_layers' backward pass,
    # is the window's mean gradient, as optax.MultiSteps averages it.
    batched, fixed = step.micro.split(self.args, self.kwargs, step.accumulate)

    def one(batched):
      a, kw = step.micro.merge(batched, fixed)
      out = step.loss_fn(tree, *a, **kw)
      step.scalar_loss(out)
      return out

    outs = jax.vmap(one)(batched)
    return (jnp.mean(outs[0]), outs[1]) if step.has_aux else jnp.mean(outs)


def _zeros_view(x, stacked):
  shape = (1,) + tuple(jnp.shape(x))[1:] if stacked else tuple(jnp.shape(x))
  return jnp.zeros(shape, jnp.result_type(x))


def _check_stack_used(obj: _scan._Stack) -> None:
  """A one-line error unless the stack ran through ``scan_layers`` exactly once."""
  if obj.used == 0:
    raise ValueError(
        f"make_layerwise_step: the leaves of the layer stack {obj.name!r} never reached "
        "optax_memopt.scan_layers as given: pass them from params to scan_layers unchanged "
        "(cast them, e.g. to bfloat16, inside the layer function, not before the scan) and "
        "not from inside a nested jax.jit or jax.checkpoint (put jax.checkpoint on the layer "
        "function); a stack run by lax.scan or nnx.scan must use scan_layers instead"
    )
  if obj.used != 1:
    raise ValueError(
        f"make_layerwise_step: the layer stack {obj.name!r} must run through "
        f"optax_memopt.scan_layers exactly once in loss_fn (it ran {obj.used} times)"
    )


class LayerwiseStep(_step.Step):
  """The step :func:`make_layerwise_step` returns: ``step(params, opt_state, *args, **kwargs) ->
  (params, opt_state, loss)``, one compiled function.

  Attributes:
    trace_count: the number of traces (one per compilation).
    stacks: the stacks' subtree paths as given (``None``: found by :func:`block_labels`' guess).
    accumulate: the number of micro-batches per optimizer step (``None``: no micro-batch axis).
    micro: which arguments carry the micro-batch axis (``_MicroBatches``) with ``accumulate``,
      else ``None``.
    shardings: per leaf of ``(params, opt_state)`` its mesh sharding at the first call, or ``None``
      when nothing is on a mesh.
  """

  name = "make_layerwise_step"

  def __init__(self, loss_fn, tx, *, has_aux: bool = False, donate: bool = True, stacks=None,
               accumulate: int | None = None, batch_argnums=None):
    _step.check_loss_fn(self.name, loss_fn)
    if isinstance(tx, optax.MultiSteps):
      raise TypeError(
          "make_layerwise_step: tx cannot be applied layer by layer: optax.MultiSteps keeps a "
          "full-size gradient accumulator (the buffer layer-wise updates exist to avoid); pass the "
          "inner optimizer and accumulate=N instead"
      )
    micro = _check_accumulate(accumulate, batch_argnums)
    super().__init__(loss_fn, _step.as_transformation(self.name, tx), has_aux=has_aux, donate=donate)
    self.stacks, self.accumulate, self.micro = stacks, accumulate, micro
    self.shardings: list[Any] | None = None
    self._fn: Callable[..., Any] | None = None
    # The (structure, shapes) of the params and states whose per-layer update was checked.
    self._checked: set[Any] = set()

  def __call__(self, params, opt_state, *args, **kwargs):
    if self.donate:
      params, opt_state = _step.distinct_buffers((params, opt_state))
    return self._compiled(params, opt_state)(params, opt_state, *args, **kwargs)

  def lower(self, params, opt_state, *args, **kwargs):
    """``jax.stages.Lowered`` of the step (inputs may be ``jax.ShapeDtypeStruct``)."""
    return self._compiled(params, opt_state).lower(params, opt_state, *args, **kwargs)

  def _compiled(self, params, opt_state):
    if self._fn is None:
      shardings = _step.mesh_shardings((params, opt_state))
      self.shardings = shardings if any(s is not None for s in shardings) else None
      self._fn = self.jit(self._one_step)
    return self._fn

  def _one_step(self, params, opt_state, *args, **kwargs):
    self.trace_count += 1
    plan = _make_plan(self.tx, params, opt_state, self.stacks)
    key = (jax.tree_util.tree_structure((params, opt_state)),
           tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves((params, opt_state))))
    if key not in self._checked:
      _PerLayerCheck(self.tx, plan, params, opt_state).run()
      self._checked.add(key)
    return _LayerwiseTrace(self, plan, params, opt_state, args, kwargs).run()


def make_layerwise_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    stacks: str | tuple[str, ...] | None = None,
    accumulate: int | None = None,
    batch_argnums: int | tuple[int, ...] | None = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """A training step that applies ``tx`` inside the backward pass, one layer at a time.

  Returns ``step(params, opt_state, *args, **kwargs) -> (params, opt_state, loss)`` (``loss`` is
  ``(loss, aux)`` with ``has_aux``). ``loss_fn(params, *args, **kwargs)`` must run its layer stack
  (stacked leaves ``[L, ...]``, recognised as :func:`block_labels` does) through
  :func:`optax_memopt.scan_layers`. The backward scan then computes one layer's weight gradient,
  feeds it to ``tx.update`` together with that layer's slices of the parameters and of the
  optimizer state, writes the new slices back and drops the gradient: no gradient larger than one
  layer's is ever held. Leaves outside the stack (embedding, final norm, head) are updated after
  the backward pass, with their ordinary gradients.

  **Which transformations.** Any ``tx`` whose update of a leaf reads only that leaf's gradient,
  value and state (plus shared scalars such as the step count): ``optax.adamw``, ``adam``,
  ``lion``, ``sgd``, schedules, ``inject_hyperparams``, ``add_decayed_weights``, masks, and
  :func:`optax_memopt.adarankgrad`. Each layer of a stack is updated as a leaf of its own (as if
  the stack were a list of layers); for these transformations, and for AdaRankGrad (which projects
  each layer of a stack on its own), that is the ordinary step's update, and the parameters equal
  the ordinary step's (``jax.grad`` + ``tx.update``) to float32 rounding. A transformation that
  needs the whole gradient is refused at the first call with a one-line error naming the leaf and
  what it reads: ``optax.clip_by_global_norm``, ``apply_if_finite`` (found by following the
  dependencies through ``tx.update``'s jaxpr), ``optax.MultiSteps`` (its accumulator is a whole
  gradient), BAdam (use :func:`make_block_step`). So is a ``tx`` whose ordinary update of a stacked
  leaf would differ from its layers' updates, found by comparing ``tx.update``'s jaxpr on the whole
  stacked leaves with the one-layer update: a norm over a whole leaf (across its layers: ``lamb``,
  ``lars``, ``fromage``, ``adafactor``, ``clip_by_block_rms``), a callable mask that sees ``[L, d]``
  and one layer differently (e.g. by size; pass the mask as a tree of bools instead), and random
  numbers drawn from a key that does not depend on the layer (``add_noise``, ``noisy_sgd``: every
  layer would get the same draw). ``tx`` sees one layer as a stack of one (leaves ``[1, ...]``), so
  it recognises the layer as it recognises the stack, and a choice on ``ndim`` is the stack's. The
  optimizer state is the ordinary ``tx.init(params)``: every state leaf of a stacked leaf must be
  the stack of its layers' states (leading axis ``L``), which is checked.

  **Gradient accumulation** (``accumulate=N``). ``optax.MultiSteps`` keeps a whole gradient, so
  it is refused; instead the step takes all ``N`` micro-batches of an optimizer step at once,
  stacked along a leading axis (``tokens: [N, b, ...]``), and makes one update from their mean
  gradient, as ``optax.MultiSteps(tx, N)`` fed them one by one does (and as the ordinary step on
  their concatenation does when the loss is a mean over equal-sized micro-batches). ``loss_fn``
  runs once per micro-batch (a ``jax.vmap`` over the leading axis; the loss returned is the mean
  of theirs, an ``aux`` is stacked per micro-batch). In the backward pass each layer's pullback
  runs one micro-batch at a time (a ``lax.scan``), the layer's weight gradients are summed (in
  float32 for lower-precision weights) and ``tx`` updates the layer once, from the window's mean
  gradient: AdaRankGrad refreshes its subspaces from that full mean gradient, exactly as under
  ``MultiSteps``, and no accumulator beyond one layer's gradient exists. The arguments after
  ``params`` (and the keyword arguments) all need the micro-batch axis, unless ``batch_argnums``
  names the ones that have it. Dropout or any randomness drawn from a key passed unbatched is the
  same draw for every micro-batch: pass per-micro-batch keys (``[N]``) among the batched arguments.

  **Memory.** Live at once: the weights, the optimizer state, the activations saved by the forward
  pass (use ``jax.checkpoint`` on the layer function to keep only each layer's input), one layer's
  gradient, and the gradients of the leaves outside the stack. With ``accumulate=N`` the forward
  pass keeps only each layer's input for every micro-batch (``N x L`` carries, as a big batch of
  ``N`` micro-batches under ``jax.checkpoint`` would) and the backward pass recomputes one layer
  for one micro-batch at a time. The forward pass runs each layer, and the parts of ``loss_fn``
  outside the stacks (embedding, head, loss) run, on all ``N`` micro-batches at once, as on a big
  batch (one layer's activations at a time for the stack; the logits of the whole window). With
  ``donate=True`` the weights and the state are updated in place. For pure low-precision training
  keep the parameters in bfloat16 (no float32 master copy) and choose the state dtype of ``tx``
  (e.g. AdaRankGrad's ``state_dtype``); the update arithmetic follows ``tx``.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``)
      whose layer stack runs through :func:`optax_memopt.scan_layers`, every use of a stacked weight
      inside the scanned layer function.
    tx: the optimizer (see above).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    donate: donate ``params`` and ``opt_state`` (do not use the arrays passed in after the call).
    stacks: the stacks' subtree paths when :func:`block_labels`' guess does not find them.
    accumulate: ``N``, the number of micro-batches per optimizer step (see above); ``None`` (the
      default): one batch per step, no micro-batch axis.
    batch_argnums: with ``accumulate``, the positions of ``loss_fn``'s arguments that carry the
      micro-batch axis (``params`` is position 0, so ``loss_fn(params, rest, batch)`` takes
      ``batch_argnums=2``); keyword arguments are then not micro-batched. Default: every
      argument after ``params`` and every keyword argument.

  Returns:
    The step, a :class:`LayerwiseStep` called like a function; ``step.lower(params, opt_state,
    *args)`` gives its ``jax.stages.Lowered`` (inputs may be ``jax.ShapeDtypeStruct``), for XLA's
    memory analysis, and ``step.trace_count`` counts its traces.

  Raises:
    TypeError, ValueError: at the first call, when ``params`` has no layer stack, ``tx`` cannot be
      applied layer by layer, the stack does not run through ``scan_layers`` or a stacked weight is
      used outside it, or a micro-batched argument lacks the leading axis of size ``accumulate``;
      at construction, for an ``accumulate`` that is not a whole number >= 1.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_memopt
    >>> params = {'layers': {'w': jnp.stack([jnp.eye(2)] * 3)}, 'head': jnp.ones((2,))}
    >>> def loss_fn(params, x):
    ...   x = optax_memopt.scan_layers(lambda l, x: jnp.tanh(x @ l['w']), params['layers'], x)
    ...   return jnp.sum((x @ params['head'] - 1.0) ** 2)
    >>> tx = optax.adamw(1e-2)
    >>> step = optax_memopt.make_layerwise_step(loss_fn, tx)
    >>> opt_state = tx.init(params)
    >>> for _ in range(3):
    ...   params, opt_state, loss = step(params, opt_state, jnp.ones((4, 2)))
    >>> params['layers']['w'].shape
    (3, 2, 2)

    Four micro-batches of 2 examples per update, stacked ``[4, 2, ...]``:

    >>> step = optax_memopt.make_layerwise_step(loss_fn, tx, accumulate=4)
    >>> params, opt_state, loss = step(params, opt_state, jnp.ones((4, 2, 2)))
    >>> loss.shape
    ()
  """
  return LayerwiseStep(loss_fn, tx, has_aux=has_aux, donate=donate, stacks=stacks,
                       accumulate=accumulate, batch_argnums=batch_argnums)


def _check_accumulate(accumulate, batch_argnums) -> _MicroBatches | None:
  """The micro-batched arguments of an accumulated step (``None`` without ``accumulate``), after
  one-line errors for bad options."""
  if accumulate is None:
    if batch_argnums is not None:
      raise ValueError("make_layerwise_step: batch_argnums is for accumulate=N; pass both or neither")
    return None
  if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
    raise ValueError(
        f"make_layerwise_step: accumulate must be a whole number of micro-batches >= 1, got "
        f"{accumulate!r}")
  if batch_argnums is not None:
    nums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
    if not nums or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in nums):
      raise ValueError(
          f"make_layerwise_step: batch_argnums are positions of loss_fn's arguments after params "
          f"(1, 2, ...), got {batch_argnums!r}")
  else:
    nums = None
  return _MicroBatches(nums, batch_argnums)


class _MicroBatches:
  """Which of ``loss_fn``'s arguments carry the micro-batch axis: those at the positions ``nums``
  (``params`` is 0), or every argument and keyword argument (``nums`` is ``None``)."""

  def __init__(self, nums: tuple[int, ...] | None, batch_argnums: Any):
    self.nums, self.batch_argnums = nums, batch_argnums

  def split(self, args, kwargs, n):
    """The micro-batched arguments (checked) and the others."""
    nums = self.nums
    if nums is None:
      chosen, names = (tuple(args), dict(kwargs)), None
    else:
      if max(nums) > len(args):
        raise ValueError(
            f"make_layerwise_step: batch_argnums={self.batch_argnums!r}, but loss_fn is given "
            f"{len(args)} argument(s) after params")
      chosen, names = (tuple(args[i - 1] for i in nums), {}), nums
    _check_micro_batched(chosen, names, n)
    rest = args if nums is None else tuple(None if i + 1 in nums else a for i, a in enumerate(args))
    return chosen, (rest, kwargs)

  def merge(self, chosen, fixed):
    """``(args, kwargs)`` for ``loss_fn`` from one micro-batch of ``chosen`` and the others."""
    (c_args, c_kwargs), (rest, kwargs) = chosen, fixed
    if self.nums is None:
      return c_args, c_kwargs
    it = iter(c_args)
    return tuple(next(it) if i + 1 in self.nums else a for i, a in enumerate(rest)), kwargs


def _check_micro_batched(chosen, names, n) -> None:
  if not jax.tree_util.tree_leaves(chosen):
    raise ValueError(
        f"make_layerwise_step(accumulate={n}): no micro-batched argument: pass the {n} "
        f"micro-batches to the step stacked along a leading axis ([{n}, ...])")
  for path, x in jax.tree_util.tree_flatten_with_path(chosen)[0]:
    shape = tuple(jnp.shape(x))
    if not shape or shape[0] != n:
      where = _argument_name(path, names)
      raise ValueError(
          f"make_layerwise_step(accumulate={n}): the micro-batched argument {where} has shape "
          f"{shape}; it needs a leading micro-batch axis of size {n} (stack the {n} "
          f"micro-batches, [{n}, ...]), or leave it out of batch_argnums")


def _argument_name(path, nums) -> str:
  """A leaf of the micro-batched ``(args, kwargs)``, named as loss_fn sees it: ``argument 2['x']``
  (params is argument 0) or ``keyword mask``."""
  if path[0].idx == 1:
    return f"keyword {path[1].key}{jax.tree_util.keystr(path[2:])}"
  k = path[1].idx
  return f"argument {k + 1 if nums is None else nums[k]}{jax.tree_util.keystr(path[2:])}"


def _watch(w: jax.Array, path: str, misuse: list[str]) -> jax.Array:
  """``w`` by value; a nonzero cotangent reaching it (a use outside scan_layers) is recorded."""

  @jax.custom_vjp
  def watch(w):
    return w

  def fwd(w):
    return w.value, None

  def bwd(_, ct):
    if not isinstance(ct, jax.custom_derivatives.SymbolicZero):
      misuse.append(path)
    return (None,)

  watch.defvjp(fwd, bwd, symbolic_zeros=True)
  return watch(w)
