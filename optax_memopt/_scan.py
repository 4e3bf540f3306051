"""``scan_layers``: run a stack of like layers so that a block step differentiates one layer only.

Large JAX models keep their decoder layers stacked (one leaf ``[L, ...]`` per weight) and run them
with ``jax.lax.scan``. Differentiating such a model with respect to one layer slice the ordinary way
(``jax.grad`` through ``lax.scan``) costs the full backward pass: the scan's transpose computes every
layer's weight gradient and every layer's activation gradient, then the unwanted ones are dropped.

:func:`scan_layers` is a ``lax.scan`` over the layers with a custom backward pass:

* under plain ``jax.grad`` / ``jax.vjp`` it computes what ``lax.scan`` computes (the forward pass
  keeps each layer's residuals, the backward pass runs the layers in reverse), and it skips the
  weight-gradient work of any stacked leaf that is not being differentiated (a frozen base, a LoRA
  model) and the activation gradients below the stack when nothing there is differentiated;
* inside :func:`optax_memopt.make_block_step`, when the active block is one layer slice ``k`` of the
  stack, the backward pass runs layers ``L-1 .. k+1`` for activation gradients only (no
  weight-gradient matmuls), layer ``k`` for its weight and activation gradients, and stops there
  (layers below ``k`` ran forward only, unless something below the stack is differentiated). ``k``
  is a traced index: one compiled step serves every layer of the stack.

The block step finds the stack by identity: it hands ``loss_fn`` the stacked leaves of the active
block as marked arrays, and ``scan_layers`` recognises them among its ``layers``. A model whose stack
does not go through ``scan_layers`` (or that transforms the stacked leaves before scanning them)
still gets the right gradient from the block step, at the cost of the whole stack's backward pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

# The active layer slices of the block step being traced: id(marked stacked leaf) -> _Active.
_ACTIVE: contextvars.ContextVar[dict[int, _Active] | None] = contextvars.ContextVar(
    "optax_memopt_scan_active", default=None
)


@dataclasses.dataclass
class _Active:
  value: jax.Array  # the active slice, the array the block step differentiates
  index: jax.Array  # int32 scalar, its position along the stack axis
  used: bool = False  # set when a scan_layers call consumed it


@contextlib.contextmanager
def active_slices(entries: dict[int, _Active]) -> Iterator[None]:
  """While tracing a block step's loss: the marked stacked leaves and their active slices."""
  token = _ACTIVE.set(entries)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def mark_active(stacked: jax.Array, active: jax.Array, index: jax.Array) -> jax.Array:
  """``stacked`` (by value), differentiable with respect to ``active`` = ``stacked[index]``.

  Used wherever the stacked leaf is used, the cotangent of ``active`` is the cotangent of the whole
  leaf at ``index`` (right for any use, at the cost of the whole leaf's gradient); inside
  :func:`scan_layers` the mark is recognised and only layer ``index`` is differentiated.
  """

  @jax.custom_vjp
  def mark(stacked, active, index):
    del active, index
    return stacked

  def fwd(stacked, active, index):
    del active
    return stacked, index

  def bwd(index, ct):
    return None, jax.lax.dynamic_index_in_dim(ct, index, keepdims=False), None

  mark.defvjp(fwd, bwd)
  return mark(stacked, active, index)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def scan_layers(fn: Callable[..., Any], layers: Any, carry: Any, *shared: Any) -> Any:
  """Runs ``carry = fn(layer, carry, *shared)`` for each layer of a stacked ``layers`` tree.

  Equivalent to ``jax.lax.scan(lambda c, layer: (fn(layer, c, *shared), None), carry, layers)[0]``,
  values and gradients alike, with the backward pass described in the module docstring: under
  :func:`optax_memopt.make_block_step` only the active layer's weight gradient is computed, the
  layers above it are differentiated with respect to their activations only, and the layers below
  it are not differentiated. Reverse-mode only (``jax.grad``, ``jax.vjp``); forward-mode
  (``jax.jvp``) is not supported, as for any ``jax.custom_vjp`` function.

  The forward pass keeps each layer's residuals as ``jax.vjp`` does (the stacked weights themselves
  are not copied); wrap ``fn`` in ``jax.checkpoint`` to keep only each layer's input instead and
  recompute the rest in the backward pass.

  Args:
    fn: ``fn(layer, carry, *shared) -> carry``, one layer; ``layer`` is ``layers`` with the leading
      axis indexed away. It must return a carry of the same structure, shapes and dtypes.
    layers: a pytree whose leaves share a leading axis of length ``L`` (e.g. the ``nnx.State`` of an
      ``nnx.vmap``-initialised stack, or a Linen ``nn.scan`` stack's params).
    carry: the input of the first layer (a pytree).
    *shared: arguments every layer receives unchanged (masks, rotary tables, ...); they may be
      differentiated.

  Returns:
    The output of the last layer.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import optax_memopt
    >>> layers = {'w': jnp.stack([jnp.eye(2)] * 3)}
    >>> def layer(p, x):
    ...   return jnp.tanh(x @ p['w'])
    >>> x = jnp.ones((1, 2))
    >>> y = optax_memopt.scan_layers(layer, layers, x)
    >>> g = jax.grad(lambda l: jnp.sum(optax_memopt.scan_layers(layer, l, x)))(layers)
    >>> g['w'].shape
    (3, 2, 2)
  """
  if not callable(fn):
    raise TypeError("scan_layers: fn must be callable")
  leaves, treedef = jax.tree_util.tree_flatten(layers)
  if not leaves:
    raise ValueError("scan_layers: layers has no arrays")
  lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(
        "scan_layers: every leaf of layers must have the same leading (layer) axis; got leading "
        f"sizes {sorted(str(n) for n in lengths)}"
    )
  layerwise = _LAYERWISE.get()
  if layerwise is not None and any(id(x) in layerwise for x in leaves):
    return _scan_layerwise(fn, treedef, leaves, layerwise, carry, shared)
  entries = _ACTIVE.get() or {}
  active: list[jax.Array | None] = []
  index = None
  for x in leaves:
    entry = entries.get(id(x))
    if entry is not None:
      if index is not None and entry.index is not index:
        raise ValueError("scan_layers: the active slices of one stack must share their index")
      index = entry.index
      entry.used = True
      active.append(entry.value)
    else:
      active.append(None)
  if index is None:
    index = jnp.int32(-1)
    stacked = leaves
  else:
    stacked = [jax.lax.stop_gradient(x) if a is not None else x for x, a in zip(leaves, active)]
  return _scan(fn, treedef, stacked, active, index, carry, shared)


def _scan(fn, treedef, stacked, active, index, carry, shared):
  carry_leaves, carry_def = jax.tree_util.tree_flatten(carry)
  shared_leaves, shared_def = jax.tree_util.tree_flatten(shared)
  num_layers = jnp.shape(stacked[0])[0]

  def call(p_leaves, c_leaves, s_leaves):
    out = fn(
        jax.tree_util.tree_unflatten(treedef, p_leaves),
        jax.tree_util.tree_unflatten(carry_def, c_leaves),
        *jax.tree_util.tree_unflatten(shared_def, s_leaves),
    )
    out_leaves, out_def = jax.tree_util.tree_flatten(out)
    if out_def != carry_def:
      raise TypeError(
          f"scan_layers: fn must return a carry with the input's structure {carry_def}, "
          f"got {out_def}"
      )
    return out_leaves

  def plain(stacked, c_leaves, s_leaves):
    def body(c, p):
      return call(p, c, s_leaves), None

    return jax.lax.scan(body, c_leaves, stacked)[0]

  @jax.custom_vjp
  def run(stacked, active, index, c_leaves, s_leaves):
    del active, index
    return plain(stacked, c_leaves, s_leaves)

  # Static facts the forward pass finds out for the backward pass (set while tracing fwd).
  facts: dict[str, Any] = {}

  def fwd(stacked, active, index, c_leaves, s_leaves):
    p_pert = [x.perturbed for x in stacked]
    a_pert = [a is not None and a.perturbed for a in active]
    c_pert = any(x.perturbed for x in c_leaves)
    s_pert = [x.perturbed for x in s_leaves]
    stacked = [x.value for x in stacked]
    index = index.value
    c_leaves = [x.value for x in c_leaves]
    s_leaves = [x.value for x in s_leaves]
    # Differentiable positions: float leaves only (ints and bools are closed over).
    p_diff = [_is_float(x) for x in stacked]
    c_diff = [_is_float(x) for x in c_leaves]
    s_diff = [_is_float(x) for x in s_leaves]

    def split(values, diff):
      return [v for v, d in zip(values, diff) if d]

    def merge(diff_values, values, diff):
      it = iter(diff_values)
      return [next(it) if d else v for v, d in zip(values, diff)]

    def body(c, p):
      def f(pd, cd, sd):
        outs = call(merge(pd, p, p_diff), merge(cd, c, c_diff), merge(sd, s_leaves, s_diff))
        return split(outs, c_diff), [o for o, d in zip(outs, c_diff) if not d]

      pd, cd, sd = split(p, p_diff), split(c, c_diff), split(s_leaves, s_diff)
      outs_d, vjp_fn, outs_int = jax.vjp(f, pd, cd, sd, has_aux=True)
      res, res_def = jax.tree_util.tree_flatten(vjp_fn)
      # Residuals that are this layer's weights or the shared arguments are read from the inputs
      # in the backward pass instead of being stacked by the scan (a copy of every weight).
      where, saved = [], []
      for r in res:
        hit = next((("p", i) for i, x in enumerate(pd) if r is x), None)
        hit = hit or next((("s", i) for i, x in enumerate(sd) if r is x), None)
        if hit is None:
          hit = ("r", len(saved))
          saved.append(r)
        where.append(hit)
      facts["res_def"], facts["where"] = res_def, where
      it_d, it_i = iter(outs_d), iter(outs_int)
      return [next(it_d) if d else next(it_i) for d in c_diff], saved

    c_out, saved = jax.lax.scan(body, c_leaves, stacked)
    facts.update(p_pert=p_pert, a_pert=a_pert, c_pert=c_pert, s_pert=s_pert, p_diff=p_diff,
                 c_diff=c_diff, s_diff=s_diff)
    return c_out, (saved, stacked, index, s_leaves)

  def bwd(residuals, ct):
    saved, stacked, index, s_leaves = residuals
    f = facts
    p_diff, c_diff, s_diff = f["p_diff"], f["c_diff"], f["s_diff"]
    res_def, where = f["res_def"], f["where"]
    pd_stacked = [x for x, d in zip(stacked, p_diff) if d]
    sd = [x for x, d in zip(s_leaves, s_diff) if d]
    ct_d = [
        jnp.zeros(c.shape, c.dtype) if isinstance(c, jax.custom_derivatives.SymbolicZero) else c
        for c, d in zip(ct, c_diff) if d
    ]

    def pullback(l, saved_l):
      pd = [x[l] for x in pd_stacked]
      res = [saved_l[j] if kind == "r" else (pd[j] if kind == "p" else sd[j])
             for kind, j in where]
      return jax.tree_util.tree_unflatten(res_def, res)

    any_p = any(pp for pp, d in zip(f["p_pert"], p_diff) if d)
    any_s = any(sp for sp, d in zip(f["s_pert"], s_diff) if d)
    zeros_sd = [jnp.zeros_like(x) for x in sd]

    if any_p or not any(f["a_pert"]):
      # The plain backward pass (every layer), with weight gradients when a stacked leaf is
      # differentiated. With neither weights nor anything below the stack differentiated there
      # would be no backward pass at all.
      def body(carry, xs):
        dc, ds = carry
        l, saved_l = xs
        dp, dc, ds_l = pullback(l, saved_l)(dc)
        ds = [a + b for a, b in zip(ds, ds_l)]
        return (dc, ds), (dp if any_p else None)

      (dc, ds), dp = jax.lax.scan(
          body, (ct_d, zeros_sd), (jnp.arange(num_layers), saved), reverse=True
      )
      it = iter(dp if any_p else [])
      d_stacked = [next(it) if d and any_p else None for d in p_diff]
      # A whole stacked leaf differentiated beside the active slices (an always-active leaf of the
      # stack): every layer's weight gradient is computed anyway; the active slices take theirs.
      d_active = [jax.lax.dynamic_index_in_dim(g, index, keepdims=False) if a and g is not None
                  else None for g, a in zip(d_stacked, f["a_pert"])]
    else:
      # One layer's weights (the active slice ``index``) are differentiated: the layers above it
      # for activations only, it for weights and activations, the layers below only when
      # something below the stack (the carry's source, a shared argument) is differentiated.
      below = f["c_pert"] or any_s
      da0 = [jnp.zeros(x.shape[1:], x.dtype) for x in pd_stacked]

      def body(carry, xs):
        dc, ds, da = carry
        l, saved_l = xs

        def skip():
          return dc, ds, da

        def act_only():
          _, dc_new, ds_l = pullback(l, saved_l)(dc)
          return dc_new, [a + b for a, b in zip(ds, ds_l)], da

        def active_layer():
          dp, dc_new, ds_l = pullback(l, saved_l)(dc)
          return dc_new, [a + b for a, b in zip(ds, ds_l)], list(dp)

        branch = jnp.where(l == index, 2, jnp.where(l > index, 1, 1 if below else 0))
        return jax.lax.switch(branch, [skip, act_only, active_layer]), None

      (dc, ds, da), _ = jax.lax.scan(
          body, (ct_d, zeros_sd, da0), (jnp.arange(num_layers), saved), reverse=True
      )
      it = iter(da)
      da_by_leaf = [next(it) if d else None for d in p_diff]
      d_active = [g if a else None for g, a in zip(da_by_leaf, f["a_pert"])]
      d_stacked = [None] * len(stacked)

    it = iter(dc)
    d_carry = [next(it) if d else None for d in c_diff]
    it = iter(ds)
    d_shared = [next(it) if d else None for d in s_diff]
    return d_stacked, d_active, None, d_carry, d_shared

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  out = run(list(stacked), list(active), index, carry_leaves, shared_leaves)
  return jax.tree_util.tree_unflatten(carry_def, out)


# ---------------------------------------------------------------------------------------------
# Layer-wise updates (optax_memopt.make_layerwise_step): the backward pass updates each layer.

# The stacked leaves of the layer-wise step being traced: id(leaf handed to loss_fn) -> _Member.
_LAYERWISE: contextvars.ContextVar[dict[int, _Member] | None] = contextvars.ContextVar(
    "optax_memopt_scan_layerwise", default=None
)


@dataclasses.dataclass
class _Stack:
  """One layer stack trained layer by layer: its leaves, state slices and per-layer update."""

  name: str
  num_leaves: int  # how many stacked leaves of the params belong to it
  carriers: list[jax.Array]  # its optimizer-state leaves ``[L, ...]`` (floats, see _layerwise)
  # update(layer, grads, weights, state) -> (new weights, new state): lists of one layer's slices.
  update: Callable[..., tuple[list[jax.Array], list[jax.Array]]]
  used: int = 0  # scan_layers calls that consumed it


@dataclasses.dataclass
class _Member:
  stack: _Stack
  position: int  # index among the stack's leaves
  weights: jax.Array  # the stacked weights as the step differentiates them


@contextlib.contextmanager
def layerwise_stacks(members: dict[int, _Member]) -> Iterator[None]:
  """While tracing a layer-wise step's loss: the stacked leaves handed to ``loss_fn``."""
  token = _LAYERWISE.set(members)
  try:
    yield
  finally:
    _LAYERWISE.reset(token)


def _scan_layerwise(fn, treedef, leaves, members, carry, shared):
  """``scan_layers`` for a stack trained layer by layer.

  The custom VJP takes the stacked weights and the stack's optimizer-state slices as primal
  inputs and, in place of their cotangents, returns their *updated values*: its backward scan
  computes layer ``l``'s weight gradient, applies the optimizer to layer ``l``'s slices and writes
  them back into the scan's carry (read by the layers below only at indices not yet written), so
  no gradient larger than one layer's ever exists.
  """
  found = [members.get(id(x)) for x in leaves]
  stacks = {id(m.stack): m.stack for m in found if m is not None}
  if len(stacks) != 1:
    raise ValueError("scan_layers: one call runs one layer stack; got leaves of several stacks")
  stack = next(iter(stacks.values()))
  if sum(m is not None for m in found) != stack.num_leaves:
    raise ValueError(
        f"scan_layers: the layer stack {stack.name!r} is trained layer by layer, so every one of "
        f"its {stack.num_leaves} stacked leaves must be among the scanned layers (got "
        f"{sum(m is not None for m in found)})"
    )
  for m, x in zip(found, leaves):
    if m is None and _is_float(x):
      raise ValueError(
          "scan_layers: under make_layerwise_step the scanned layers may hold only the stack's "
          f"trained weights and non-float arrays; got a float leaf of shape {jnp.shape(x)} that is "
          "not a recognised stacked parameter"
      )
  stack.used += 1
  order = sorted((m.position, i) for i, m in enumerate(found) if m is not None)
  w_pos = [i for _, i in order]  # layer-leaf position of the stack's weight k
  weights = [found[i].weights for i in w_pos]
  fixed = [None if m is not None else x for m, x in zip(found, leaves)]

  carry_leaves, carry_def = jax.tree_util.tree_flatten(carry)
  shared_leaves, shared_def = jax.tree_util.tree_flatten(shared)
  num_layers = jnp.shape(weights[0])[0]

  def call(w_leaves, fixed_l, c_leaves, s_leaves):
    p = list(fixed_l)
    for i, w in zip(w_pos, w_leaves):
      p[i] = w
    out = fn(
        jax.tree_util.tree_unflatten(treedef, p),
        jax.tree_util.tree_unflatten(carry_def, c_leaves),
        *jax.tree_util.tree_unflatten(shared_def, s_leaves),
    )
    out_leaves, out_def = jax.tree_util.tree_flatten(out)
    if out_def != carry_def:
      raise TypeError(
          f"scan_layers: fn must return a carry with the input's structure {carry_def}, "
          f"got {out_def}"
      )
    return out_leaves

  fixed_stacked = [x for x in fixed if x is not None]

  def fixed_at(l_or_slices):
    it = iter(l_or_slices)
    return [None if x is None else next(it) for x in fixed]

  @jax.custom_vjp
  def run(weights, carriers, c_leaves, s_leaves):
    del carriers

    def body(c, xs):
      w_l, f_l = xs
      return call(w_l, fixed_at(f_l), c, s_leaves), None

    return jax.lax.scan(body, c_leaves, (weights, fixed_stacked))[0]

  facts: dict[str, Any] = {}

  def fwd(weights, carriers, c_leaves, s_leaves):
    weights = [x.value for x in weights]
    carriers = [x.value for x in carriers]
    c_leaves = [x.value for x in c_leaves]
    s_leaves = [x.value for x in s_leaves]
    c_diff = [_is_float(x) for x in c_leaves]
    s_diff = [_is_float(x) for x in s_leaves]

    def split(values, diff):
      return [v for v, d in zip(values, diff) if d]

    def merge(diff_values, values, diff):
      it = iter(diff_values)
      return [next(it) if d else v for v, d in zip(values, diff)]

    def body(c, xs):
      w_l, f_l = xs
      f_l = fixed_at(f_l)

      def f(wd, cd, sd):
        outs = call(wd, f_l, merge(cd, c, c_diff), merge(sd, s_leaves, s_diff))
        return split(outs, c_diff), [o for o, d in zip(outs, c_diff) if not d]

      cd, sd = split(c, c_diff), split(s_leaves, s_diff)
      outs_d, vjp_fn, outs_int = jax.vjp(f, list(w_l), cd, sd, has_aux=True)
      res, res_def = jax.tree_util.tree_flatten(vjp_fn)
      # Residuals that are this layer's weights or the shared arguments are re-read in the
      # backward pass (the weights from the scan's carry, where layer l is still unchanged).
      where, saved = [], []
      for r in res:
        hit = next((("w", i) for i, x in enumerate(w_l) if r is x), None)
        hit = hit or next((("s", i) for i, x in enumerate(sd) if r is x), None)
        if hit is None:
          hit = ("r", len(saved))
          saved.append(r)
        where.append(hit)
      facts["res_def"], facts["where"] = res_def, where
      it_d, it_i = iter(outs_d), iter(outs_int)
      return [next(it_d) if d else next(it_i) for d in c_diff], saved

    c_out, saved = jax.lax.scan(body, c_leaves, (weights, fixed_stacked))
    facts.update(c_diff=c_diff, s_diff=s_diff)
    return c_out, (saved, weights, carriers, s_leaves)

  def bwd(residuals, ct):
    saved, weights, carriers, s_leaves = residuals
    c_diff, s_diff = facts["c_diff"], facts["s_diff"]
    res_def, where = facts["res_def"], facts["where"]
    sd = [x for x, d in zip(s_leaves, s_diff) if d]
    ct_d = [
        jnp.zeros(c.shape, c.dtype) if isinstance(c, jax.custom_derivatives.SymbolicZero) else c
        for c, d in zip(ct, c_diff) if d
    ]

    def body(carry, xs):
      dc, ds, w_all, s_all = carry
      l, saved_l = xs
      # Layer l's weights and state as buffers of their own (one layer each), so that every read
      # of the stacked carry comes before its in-place update. Read directly, XLA fuses the reads
      # into their consumers (the activation gradient, the other leaves' updates), which are not
      # ordered before the writes, and copies the whole stack every iteration to be safe. The
      # slices are read inside a conditional (its predicate is always true), whose outputs are
      # materialised: one layer each, and the conditional is ordered before the writes.
      def read(stacks):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, l, keepdims=False), stacks)

      def zeros(stacks):
        return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), stacks)

      w_l, s_l = jax.lax.cond(l >= 0, read, zeros, (w_all, s_all))
      res = [saved_l[j] if kind == "r" else (w_l[j] if kind == "w" else sd[j])
             for kind, j in where]
      dw, dc, ds_l = jax.tree_util.tree_unflatten(res_def, res)(dc)
      ds = [a + b for a, b in zip(ds, ds_l)]
      new_w, new_s = stack.update(l, list(dw), w_l, s_l)
      w_all = [jax.lax.dynamic_update_index_in_dim(x, n.astype(x.dtype), l, 0)
               for x, n in zip(w_all, new_w)]
      s_all = [jax.lax.dynamic_update_index_in_dim(x, n.astype(x.dtype), l, 0)
               for x, n in zip(s_all, new_s)]
      return (dc, ds, w_all, s_all), None

    zeros_sd = [jnp.zeros_like(x) for x in sd]
    (dc, ds, new_weights, new_carriers), _ = jax.lax.scan(
        body, (ct_d, zeros_sd, list(weights), list(carriers)),
        (jnp.arange(num_layers), saved), reverse=True,
    )
    it = iter(dc)
    d_carry = [next(it) if d else None for d in c_diff]
    it = iter(ds)
    d_shared = [next(it) if d else None for d in s_diff]
    return new_weights, new_carriers, d_carry, d_shared

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  out = run(weights, list(stack.carriers), carry_leaves, shared_leaves)
  return jax.tree_util.tree_unflatten(carry_def, out)
