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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_memopt import _badam, _badam_ratio, _block_step, _blocks, _scan, _tree

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

  def is_kind(x):
    return isinstance(x, tuple(k for k, _ in kinds))

  for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_kind):
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
  keys = _blocks._stack_keys(paths, shapes, _blocks._list_keys(paths), stacks)
  _blocks.refuse_other_axes("make_layerwise_step", paths, [None if k is None else k.axis for k in keys])
  names: list[str] = []
  for k in keys:
    if k is not None and k[0] not in names:
      names.append(k[0])
  if not names:
    raise ValueError(
        "make_layerwise_step: no layer stack found in params (stacked leaves [L, ...] under a "
        f"name like 'layers'; paths look like {paths[:3]}); name it with stacks=..."
    )
  for path, x in zip(paths, leaves):
    if not _tree.is_float(x):
      raise TypeError(
          f"make_layerwise_step: parameter {path!r} has dtype {x.dtype}; only float parameters "
          "can be trained (keep other arrays out of params)"
      )
  stack_of_leaf = tuple(None if k is None else names.index(k[0]) for k in keys)
  lengths = tuple(next(k[1] for k in keys if k is not None and k[0] == n) for n in names)
  _refuse_known(opt_state)

  state_leaves, state_def = jax.tree_util.tree_flatten(opt_state)
  state_paths = _state_paths(opt_state)
  _check_state_is_for(tx, params, opt_state)
  owner: list[int | None] = [None] * len(state_leaves)
  for a, name in enumerate(names):
    # One layer is seen as a stack of one ([1, ...]): tx recognises it as it recognises the stack (a
    # stack of square matrices' layer [d, d] would look like a stack of d vectors), and decides on
    # its ndim as on the stack's. A stack of one is probed as two, to tell its layers' state apart.
    probe = 1 if lengths[a] > 1 else 2
    view = [jax.ShapeDtypeStruct((probe,) + s[1:], x.dtype) if st == a
            else jax.ShapeDtypeStruct(s, x.dtype) for x, s, st in zip(leaves, shapes, stack_of_leaf)]
    params_def = jax.tree_util.tree_structure(params)
    view_state = jax.eval_shape(tx.init, jax.tree_util.tree_unflatten(params_def, view))
    view_leaves, view_def = jax.tree_util.tree_flatten(view_state)
    if view_def != state_def:
      raise ValueError(
          "make_layerwise_step: tx.init gives a state of another structure for one layer of the "
          f"stack {name!r} than opt_state has; tx cannot be applied layer by layer"
      )
    for j, (full, one, path) in enumerate(zip(state_leaves, view_leaves, state_paths)):
      full_shape = tuple(jnp.shape(full))
      if full_shape == tuple(one.shape):
        continue
      if (not one.shape or one.shape[0] != probe or full_shape != (lengths[a],) + tuple(one.shape[1:])
          or jnp.result_type(full) != one.dtype):
        raise ValueError(
            f"make_layerwise_step: the state leaf {path} has shape {full_shape}, but for one layer "
            f"of the stack {name!r} tx keeps {(1,) + tuple(one.shape[1:])}: it is not the stack of "
            "its layers' states, so tx cannot be applied layer by layer"
        )
      if owner[j] is not None:
        raise ValueError(f"make_layerwise_step: the state leaf {path} belongs to two stacks")
      if not jnp.issubdtype(one.dtype, jnp.inexact) and one.dtype.itemsize not in _CARRIER:
        raise TypeError(
            f"make_layerwise_step: the state leaf {path} has dtype {one.dtype}; per-layer state "
            "must be a float or an integer of 8, 16 or 32 bits"
        )
      owner[j] = a
  return _Plan(tuple(names), stack_of_leaf, tuple(owner), lengths)


# ---------------------------------------------------------------------------------------------
# Which outputs of tx.update depend on which inputs: found on its jaxpr.


def _sub_jaxpr(eqn):
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(name)
    if sub is not None and hasattr(getattr(sub, "jaxpr", sub), "eqns"):
      return sub
  return None


def _deps(jaxpr, in_deps: list[frozenset]) -> list[frozenset]:
  """Per output of ``jaxpr``, the union of the ``in_deps`` of the inputs it depends on."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  env: dict[Any, frozenset] = {}

  def read(v):
    return env.get(v, frozenset()) if not hasattr(v, "val") else frozenset()

  for v in jaxpr.constvars:
    env[v] = frozenset()
  for v, d in zip(jaxpr.invars, in_deps, strict=True):
    env[v] = d
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    for v, d in zip(eqn.outvars, _eqn_deps(eqn, ins)):
      env[v] = d
  return [read(v) for v in jaxpr.outvars]


def _union(sets) -> frozenset:
  out: frozenset = frozenset()
  for s in sets:
    out = out | s
  return out


def _eqn_deps(eqn, ins: list[frozenset]) -> list[frozenset]:
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  if name == "cond":
    index, ops = ins[0], ins[1:]
    outs = [frozenset()] * n_out
    for branch in eqn.params["branches"]:
      outs = [a | b for a, b in zip(outs, _deps(branch, ops))]
    return [o | index for o in outs]
  if name == "scan":
    nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    while True:
      outs = _deps(eqn.params["jaxpr"], consts + carry + xs)
      new = [a | b for a, b in zip(carry, outs[:nk])]
      if new == carry:
        return outs
      carry = new
  if name == "while":
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    while True:
      pred = _union(_deps(eqn.params["cond_jaxpr"], cconsts + carry))
      outs = _deps(eqn.params["body_jaxpr"], bconsts + carry)
      new = [a | b | pred for a, b in zip(carry, outs)]
      if new == carry:
        return carry
      carry = new
  if name == "random_bits":
    # Marks the draw with what its key depends on: a layer's draw from a key that depends neither
    # on the layer index nor on the layer's own state is the same for every layer.
    return [ins[0] | {("rand", ins[0])}] * n_out
  sub = _sub_jaxpr(eqn)
  if sub is not None and len(getattr(sub, "jaxpr", sub).invars) == len(ins):
    return _deps(sub, ins)
  every = _union(ins)
  return [every] * n_out


# ---------------------------------------------------------------------------------------------
# Where the layer axis of a stacked leaf goes in the ordinary update's jaxpr, and whether anything
# reduces over it (lamb's trust ratio, adafactor's clipping, clip_by_block_rms: a number computed
# over the whole stacked leaf, which one layer at a time cannot reproduce).

_LOST = -1  # the layer axis can no longer be followed (nothing is concluded from it)
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin"})
_SCANS_ALONG = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_LINALG = frozenset({"eigh", "qr", "svd", "cholesky", "triangular_solve", "lu", "householder_product",
                     "geqrf", "orgqr", "schur", "eig"})


class _Axis:
  """Per jaxpr variable: ``ax`` (the layer axis' position, ``None`` for a value that is the same for
  every layer and has no layer axis, ``_LOST``) and ``mix`` (descriptions of the reductions over the
  layer axis it was computed from)."""

  __slots__ = ("ax", "mix")

  def __init__(self, ax=None, mix=frozenset()):
    self.ax, self.mix = ax, mix

  def __eq__(self, other):
    return self.ax == other.ax and self.mix == other.mix


def _where_in_code(eqn) -> str:
  """The innermost frame of ``eqn``'s source outside JAX (``function (file:line)``)."""
  try:
    frames = eqn.source_info.traceback.frames
  except AttributeError:
    return "an operation"
  for f in frames:
    name = f.file_name.replace("\\", "/")
    if "/jax/" in name or "/jaxlib/" in name or name.endswith(("/numerics.py", "_layerwise.py")):
      continue
    return f"{f.function_name.replace('.<locals>', '')} ({name.rsplit('/', 1)[-1]}:{f.line_num})"
  return "an operation"


def _join(a: _Axis, b: _Axis) -> _Axis:
  ax = a.ax if a.ax == b.ax else (b.ax if a.ax is None else a.ax if b.ax is None else _LOST)
  return _Axis(ax, a.mix | b.mix)


def _axes(jaxpr, ins: list[_Axis], where: str | None) -> list[_Axis]:
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  env: dict[Any, _Axis] = {}

  def read(v):
    return env.get(v, _Axis()) if not hasattr(v, "val") else _Axis()

  for v, a in zip(jaxpr.invars, ins, strict=True):
    env[v] = a
  for eqn in jaxpr.eqns:
    outs = _eqn_axes(eqn, [read(v) for v in eqn.invars], where or _where_in_code(eqn))
    for v, a in zip(eqn.outvars, outs):
      env[v] = a
  return [read(v) for v in jaxpr.outvars]


def _loop_axes(body, consts: list[_Axis], carry: list[_Axis], rest: list[_Axis], where, n_carry,
               pred=None) -> list[_Axis]:
  for _ in range(8):
    outs = _axes(body, consts + carry + rest, where)
    extra = _Axis() if pred is None else pred(carry)
    new = [_join(_join(c, o), _Axis(None, extra.mix)) if extra.ax is None
           else _Axis(_LOST, c.mix | o.mix | extra.mix) for c, o in zip(carry, outs[:n_carry])]
    if new == carry:
      return outs if pred is None else carry
    carry = new
  return [_Axis(_LOST, _union(a.mix for a in carry + consts + rest))] * len(outs)


def _eqn_axes(eqn, ins: list[_Axis], where: str) -> list[_Axis]:
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  mix = _union(a.mix for a in ins)
  batched = [a.ax for a in ins if a.ax is not None]
  if not batched:
    if name == "cond":
      outs = [_Axis()] * n_out
      for branch in eqn.params["branches"]:
        outs = [_join(o, b) for o, b in zip(outs, _axes(branch, ins[1:], where))]
      return [_Axis(o.ax, o.mix | ins[0].mix) for o in outs]
    return [_Axis(None, mix)] * n_out
  if _LOST in batched:
    return [_Axis(_LOST, mix)] * n_out
  in_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
  out_rank = len(getattr(eqn.outvars[0].aval, "shape", ()))

  def one(ax):
    return [_Axis(ax, mix)] * n_out

  p = eqn.params
  if p.get("name") == _tree.LAYER_SEPARABLE_ANY:
    return [_Axis(None, mix)] * n_out
  if name in _REDUCTIONS:
    k, axes = ins[0].ax, tuple(p["axes"])
    if k in axes:
      return [_Axis(None, mix | {where})] * n_out
    return one(k - sum(a < k for a in axes))
  if name in _SCANS_ALONG or name == "sort":
    k = ins[0].ax
    along = p.get("axis", p.get("dimension"))
    return [_Axis(k, mix | ({where} if along == k else frozenset()))] * n_out
  if name == "broadcast_in_dim":
    return one(p["broadcast_dimensions"][ins[0].ax])
  if name == "transpose":
    return one(tuple(p["permutation"]).index(ins[0].ax))
  if name == "squeeze":
    k, dims = ins[0].ax, tuple(d % len(in_shapes[0]) for d in p["dimensions"])
    return one(_LOST if k in dims else k - sum(d < k for d in dims))
  if name == "reshape":
    k, shape, new = ins[0].ax, in_shapes[0], tuple(p["new_sizes"])
    lo, hi = _prod(shape[:k]), _prod(shape[:k + 1])
    for j in range(len(new)):
      if _prod(new[:j]) <= lo and hi <= _prod(new[:j + 1]) and new[j] > 1:
        return one(j)  # the layer axis, or an axis it was merged into
    return one(_LOST)
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    lhs, rhs = ins[0].ax, ins[1].ax
    l_free = [d for d in range(len(in_shapes[0])) if d not in lc and d not in lb]
    r_free = [d for d in range(len(in_shapes[1])) if d not in rc and d not in rb]
    found, mixed = [], frozenset()
    for k, c, b, free, off in ((lhs, lc, lb, l_free, len(lb)),
                               (rhs, rc, rb, r_free, len(lb) + len(l_free))):
      if k is None:
        continue
      if k in c:
        mixed = {where}
      elif k in b:
        found.append(tuple(b).index(k))
      else:
        found.append(off + free.index(k))
    ax = None if not found else found[0] if len(set(found)) == 1 else _LOST
    return [_Axis(ax, mix | mixed)] * n_out
  if name in _LINALG:
    k = ins[0].ax
    if k is not None and k >= len(in_shapes[0]) - 2:
      return [_Axis(None, mix | {where})] * n_out
    return one(k)
  if name in ("slice", "dynamic_slice", "pad", "concatenate", "dynamic_update_slice"):
    k = batched[0]
    full = all(a.ax in (None, k) for a in ins) and all(
        len(s) <= k or s[k] == in_shapes[0][k] for s, a in zip(in_shapes, ins) if a.ax == k)
    along = p.get("dimension")
    return one(k if full and along != k and tuple(getattr(eqn.outvars[0].aval, "shape", ()))[k]
               == in_shapes[0][k] else _LOST)
  if name == "cond":
    outs = [_Axis()] * n_out
    for branch in p["branches"]:
      outs = [_join(o, b) for o, b in zip(outs, _axes(branch, ins[1:], where))]
    return [_Axis(o.ax, o.mix | ins[0].mix) for o in outs]
  if name == "scan":
    nc, nk = p["num_consts"], p["num_carry"]
    xs = [_Axis(_LOST if a.ax == 0 else None if a.ax is None else a.ax - 1, a.mix)
          for a in ins[nc + nk:]]
    outs = _loop_axes(p["jaxpr"], ins[:nc], ins[nc:nc + nk], xs, where, nk)
    return outs[:nk] + [_Axis(None if o.ax is None else _LOST if o.ax == _LOST else o.ax + 1, o.mix)
                        for o in outs[nk:]]
  if name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]

    def pred(carry):
      got = _axes(p["cond_jaxpr"], ins[:cn] + carry, where)[0]
      return _Axis(None if got.ax is None else _LOST, got.mix)

    return _loop_axes(p["body_jaxpr"], ins[cn:cn + bn], ins[cn + bn:], [], where, n_out, pred)
  sub = _sub_jaxpr(eqn)
  if sub is not None and len(getattr(sub, "jaxpr", sub).invars) == len(ins):
    return _axes(sub, ins, where)
  # Elementwise (operands of the output's rank share the layer axis; scalars broadcast).
  ranked = [a.ax for a, s in zip(ins, in_shapes) if a.ax is not None and len(s) == out_rank]
  if len(ranked) == len(batched) and len(set(ranked)) == 1 and all(
      len(s) in (0, out_rank) for s in in_shapes):
    return one(ranked[0])
  return one(_LOST)


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= int(x)
  return out


def _check_per_layer(tx, plan: _Plan, params, opt_state) -> None:
  """Raises a one-line error when an update computed layer by layer would differ: the update of a
  stack's layer (or its state) reads another stack's or an outer leaf's gradient, or the update of
  an outer leaf (or a shared state leaf such as a step count) reads a stack's."""
  leaves, params_def = jax.tree_util.tree_flatten(params)
  state_leaves, state_def = jax.tree_util.tree_flatten(opt_state)
  paths = _tree.leaf_paths(params)
  state_paths = _state_paths(opt_state)

  def view_shape(x, stack):
    s = tuple(jnp.shape(x))
    return (1,) + s[1:] if stack is not None else s

  g = [jax.ShapeDtypeStruct(view_shape(x, a), x.dtype) for x, a in zip(leaves, plan.stack_of_leaf)]
  s = [jax.ShapeDtypeStruct(view_shape(x, a), jnp.result_type(x))
       for x, a in zip(state_leaves, plan.owner)]
  mask = [a is not None for a in plan.stack_of_leaf]

  def update(g, s, p, layer):
    u, new_s = tx.update(
        jax.tree_util.tree_unflatten(params_def, g), jax.tree_util.tree_unflatten(state_def, s),
        jax.tree_util.tree_unflatten(params_def, p), **{_tree.LAYER_SLICE_ARG: (mask, layer)})
    return jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(new_s)

  closed = jax.make_jaxpr(update)(g, s, g, jax.ShapeDtypeStruct((), jnp.int32))
  n, m = len(leaves), len(state_leaves)
  # Input ids: ("g", i), ("s", j), ("p", i) in the order make_jaxpr flattened them.
  in_ids = ([frozenset({("g", i)}) for i in range(n)] + [frozenset({("s", j)}) for j in range(m)]
            + [frozenset({("p", i)}) for i in range(n)] + [frozenset({("layer", 0)})])
  out = _deps(closed, in_ids)
  u_deps, s_deps = out[:n], out[n:]

  def where(kind, k):
    if kind == "s":
      return plan.owner[k], f"the state leaf {state_paths[k]}"
    what = "gradient" if kind == "g" else "value"
    return plan.stack_of_leaf[k], f"the {what} of {paths[k]!r}"

  def stack_name(a):
    return "outside the layer stacks" if a is None else f"in the layer stack {plan.stack_names[a]!r}"

  outputs = ([(plan.stack_of_leaf[i], f"the update of {paths[i]!r}", d) for i, d in enumerate(u_deps)]
             + [(plan.owner[j], f"the new state leaf {state_paths[j]}", d)
                for j, d in enumerate(s_deps)])
  def real(deps):
    return sorted(d for d in deps if d[0] in ("g", "s", "p"))

  for a, what, deps in outputs:
    for kind, k in real(deps):
      b, source = where(kind, k)
      # A layer's update may read outer values and state (they are the step's inputs in both
      # places); it may not read an outer gradient, nor anything of another stack. An outer update
      # may read nothing of a stack.
      bad = (b != a and b is not None) or (a is not None and b is None and kind == "g") or (
          a is None and b is not None)
      if bad:
        raise ValueError(
            f"make_layerwise_step: tx cannot be applied layer by layer: {what} ({stack_name(a)}) "
            f"depends on {source} ({stack_name(b)}); a transformation that needs the whole "
            "gradient (optax.clip_by_global_norm, apply_if_finite, ...) must run in the ordinary "
            "step"
        )

  # Random numbers: a layer's draw must come from a key that depends on the layer (the layer index
  # passed as LAYER_SLICE_ARG, or the layer's own state), else every layer gets the same numbers.
  for a, what, deps in outputs:
    for d in deps:
      if a is None or d[0] != "rand":
        continue
      key = d[1]
      if ("layer", 0) in key or any(where(kind, k)[0] == a for kind, k in real(key)):
        continue
      raise ValueError(
          f"make_layerwise_step: tx cannot be applied layer by layer: {what} adds random numbers "
          "drawn from a key shared by every layer (optax.add_noise, noisy_sgd, ...), so every "
          "layer would get the same draw; use the ordinary step")

  # The ordinary update on the whole stacked leaves: it must read what one layer's update reads
  # (a callable mask or a choice made on a leaf's shape sees a stacked leaf [L, d] and one layer's
  # [d] differently), and must not reduce over a stacked leaf's layer axis.
  full = [jax.ShapeDtypeStruct(tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves]
  full_s = [jax.ShapeDtypeStruct(tuple(jnp.shape(x)), jnp.result_type(x)) for x in state_leaves]

  def ordinary(g, s, p):
    u, new_s = tx.update(
        jax.tree_util.tree_unflatten(params_def, g), jax.tree_util.tree_unflatten(state_def, s),
        jax.tree_util.tree_unflatten(params_def, p))
    return jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(new_s)

  whole = jax.make_jaxpr(ordinary)(full, full_s, full)
  for (_, what, deps), whole_deps in zip(outputs, _deps(whole, in_ids[:-1])):
    one, every = real(deps), real(whole_deps)
    if one == every:
      continue
    kind, k = sorted(set(one) ^ set(every))[0]
    reads = "reads" if (kind, k) in every else "does not read"
    raise ValueError(
        f"make_layerwise_step: tx cannot be applied layer by layer: in the ordinary step {what} "
        f"{reads} {where(kind, k)[1]}, for one layer of the stack it does {'not ' * (reads == 'reads')}"
        "(a callable mask or a choice made on a leaf's shape, e.g. adamw(mask=lambda p: ... ndim "
        "...), sees a stacked leaf [L, ...] and one layer differently); pass the mask as a tree of "
        "bools computed from the params, or use the ordinary step")
  axes_in = ([_Axis(None if a is None else 0) for a in plan.stack_of_leaf]
             + [_Axis(None if a is None else 0) for a in plan.owner]
             + [_Axis(None if a is None else 0) for a in plan.stack_of_leaf])
  for (a, what, _), got in zip(outputs, _axes(whole, axes_in, None)):
    if a is not None and got.mix:
      raise ValueError(
          f"make_layerwise_step: tx cannot be applied layer by layer: {what} uses a number "
          f"computed across the layers of the stacked leaf, in {sorted(got.mix)[0]} (a "
          "transformation that reduces over a whole leaf: optax.lamb, lars, fromage, adafactor, "
          "clip_by_block_rms, ...); one layer at a time it would differ, use the ordinary step")


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
    The step function; ``step.lower(params, opt_state, *args)`` gives its ``jax.stages.Lowered``
    (inputs may be ``jax.ShapeDtypeStruct``), for XLA's memory analysis.

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
  if not callable(loss_fn):
    raise TypeError("make_layerwise_step: loss_fn must be callable")
  if isinstance(tx, optax.MultiSteps):
    raise TypeError(
        "make_layerwise_step: tx cannot be applied layer by layer: optax.MultiSteps keeps a "
        "full-size gradient accumulator (the buffer layer-wise updates exist to avoid); pass the "
        "inner optimizer and accumulate=N instead"
    )
  micro = _check_accumulate(accumulate, batch_argnums)
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(
        f"make_layerwise_step: tx must be an optax transformation, got {type(tx).__name__}")
  if isinstance(tx, optax.GradientTransformation):
    tx = optax.with_extra_args_support(tx)
  checked: set[Any] = set()

  def one_step(params, opt_state, *args, **kwargs):
    step.trace_count += 1
    plan = _make_plan(tx, params, opt_state, stacks)
    key = (jax.tree_util.tree_structure((params, opt_state)),
           tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves((params, opt_state))))
    if key not in checked:
      _check_per_layer(tx, plan, params, opt_state)
      checked.add(key)
    leaves, params_def = jax.tree_util.tree_flatten(params)
    state_leaves, state_def = jax.tree_util.tree_flatten(opt_state)
    paths = _tree.leaf_paths(params)
    n_stacks = len(plan.stack_names)
    members_of = [[i for i, a in enumerate(plan.stack_of_leaf) if a == s] for s in range(n_stacks)]
    owned_of = [[j for j, a in enumerate(plan.owner) if a == s] for s in range(n_stacks)]
    outer = [i for i, a in enumerate(plan.stack_of_leaf) if a is None]

    def zeros_view(x, stacked):
      shape = (1,) + tuple(jnp.shape(x))[1:] if stacked else tuple(jnp.shape(x))
      return jnp.zeros(shape, jnp.result_type(x))

    def view_update(grads, weights, states, extra):
      """tx.update on the params' structure, stacked leaves seen as one layer (a stack of one,
      ``[1, ...]``); ``grads``, ``weights``, ``states``: {leaf index: value} for the leaves that
      matter, zeros elsewhere."""
      g = [grads[i] if i in grads else zeros_view(x, a is not None)
           for i, (x, a) in enumerate(zip(leaves, plan.stack_of_leaf))]
      p = [weights[i] if i in weights else (x if a is None else zeros_view(x, True))
           for i, (x, a) in enumerate(zip(leaves, plan.stack_of_leaf))]
      s = [states[j] if j in states else (x if a is None else zeros_view(x, True))
           for j, (x, a) in enumerate(zip(state_leaves, plan.owner))]
      u, new_s = tx.update(
          jax.tree_util.tree_unflatten(params_def, g),
          jax.tree_util.tree_unflatten(state_def, s),
          jax.tree_util.tree_unflatten(params_def, p),
          **extra,
      )
      return jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(new_s)

    def layer_update(a):
      members, owned = members_of[a], owned_of[a]
      mask = [b == a for b in plan.stack_of_leaf]

      def update(layer, grads, weights, states):
        u, new_s = view_update(
            {i: g[None] for i, g in zip(members, grads)},
            {i: w[None] for i, w in zip(members, weights)},
            {j: _from_carrier(c, jnp.result_type(state_leaves[j]))[None]
             for j, c in zip(owned, states)},
            {_tree.LAYER_SLICE_ARG: (mask, layer)},
        )
        new_w = [(w + u[i][0]).astype(w.dtype) for i, w in zip(members, weights)]
        new_c = [_to_carrier(new_s[j][0]) for j in owned]
        return new_w, new_c

      return update

    def loss_of(outer_leaves, stacked, carriers):
      full = list(leaves)
      for i, x in zip(outer, outer_leaves):
        full[i] = x
      members: dict[int, _scan._Member] = {}
      stack_objs = []
      misuse: list[str] = []
      for a in range(n_stacks):
        obj = _scan._Stack(plan.stack_names[a], len(members_of[a]), list(carriers[a]),
                           layer_update(a), micro_batches=accumulate)
        stack_objs.append(obj)
        for k, (i, w) in enumerate(zip(members_of[a], stacked[a])):
          full[i] = _watch(w, paths[i], misuse)
          members[id(full[i])] = _scan._Member(obj, k, w)
      with _scan.layerwise_stacks(members):
        out = call_loss(jax.tree_util.tree_unflatten(params_def, full))
      for obj in stack_objs:
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
      loss = out[0] if has_aux else out
      if not (hasattr(loss, "shape") and loss.shape == ()):
        shape = getattr(loss, "shape", type(loss).__name__)
        raise TypeError(f"make_layerwise_step: loss_fn must return a scalar loss, got {shape}")
      return out, misuse

    def call_loss(tree):
      if accumulate is None:
        return loss_fn(tree, *args, **kwargs)
      # loss_fn on each micro-batch (a vmap over the micro-batch axis); the loss is their mean,
      # so each layer's gradient, summed over the micro-batches in scan_layers' backward pass,
      # is the window's mean gradient, as optax.MultiSteps averages it.
      split, merge = micro
      batched, fixed = split(args, kwargs, accumulate)

      def one(batched):
        a, kw = merge(batched, fixed)
        out = loss_fn(tree, *a, **kw)
        loss = out[0] if has_aux else out
        if not (hasattr(loss, "shape") and loss.shape == ()):
          shape = getattr(loss, "shape", type(loss).__name__)
          raise TypeError(f"make_layerwise_step: loss_fn must return a scalar loss, got {shape}")
        return out

      outs = jax.vmap(one)(batched)
      return (jnp.mean(outs[0]), outs[1]) if has_aux else jnp.mean(outs)

    stacked = [[leaves[i] for i in members_of[a]] for a in range(n_stacks)]
    carriers = [[_to_carrier(state_leaves[j]) for j in owned_of[a]] for a in range(n_stacks)]
    misuse_box: list[str] = []

    def f(outer_leaves, bundle):
      out, misuse = loss_of(outer_leaves, *bundle)
      misuse_box.append(misuse)
      loss = out[0] if has_aux else out
      return loss, out

    (_, out), (g_outer, (new_stacked, new_carriers)) = jax.value_and_grad(
        f, argnums=(0, 1), has_aux=True)([leaves[i] for i in outer], (stacked, carriers))
    for misuse in misuse_box:
      if misuse:
        raise ValueError(
            f"make_layerwise_step: the stacked weight {misuse[0]!r} is used outside "
            "optax_memopt.scan_layers in loss_fn; under layer-wise updates every use of a "
            "stacked weight must be inside the scanned layer function"
        )

    # The leaves outside the stacks, and the shared state (step counts, ...), after the backward
    # pass; the stacks' slices given to this update are zeros and their results are dropped.
    u, new_s = view_update(dict(zip(outer, g_outer)), {}, {}, {})
    new_leaves = list(leaves)
    for i in outer:
      new_leaves[i] = (leaves[i] + u[i]).astype(leaves[i].dtype)
    for a in range(n_stacks):
      for i, w in zip(members_of[a], new_stacked[a]):
        new_leaves[i] = w
    new_state = list(state_leaves)
    for j, a in enumerate(plan.owner):
      if a is None:
        new_state[j] = new_s[j]
    for a in range(n_stacks):
      for j, c in zip(owned_of[a], new_carriers[a]):
        new_state[j] = _from_carrier(c, jnp.result_type(state_leaves[j]))
    new_params = jax.tree_util.tree_unflatten(params_def, new_leaves)
    new_state = jax.tree_util.tree_unflatten(state_def, new_state)
    if host["shardings"] is not None:
      new_params, new_state = _block_step._keep_shardings(
          (new_params, new_state), host["shardings"])
    return new_params, new_state, out

  host: dict[str, Any] = {"fn": None, "shardings": None}

  def compiled(params, opt_state):
    if host["fn"] is None:
      shardings = _block_step._mesh_shardings((params, opt_state))
      host["shardings"] = shardings if any(s is not None for s in shardings) else None
      host["fn"] = jax.jit(one_step, donate_argnums=(0, 1) if donate else ())
    return host["fn"]

  def step(params, opt_state, *args, **kwargs):
    if donate:
      params, opt_state = _block_step._distinct_buffers((params, opt_state))
    return compiled(params, opt_state)(params, opt_state, *args, **kwargs)

  def lower(params, opt_state, *args, **kwargs):
    return compiled(params, opt_state).lower(params, opt_state, *args, **kwargs)

  step.trace_count = 0
  step.lower = lower
  return step


def _check_accumulate(accumulate, batch_argnums):
  """``(split, merge)`` for the micro-batched arguments of an accumulated step (``None``
  without ``accumulate``), after one-line errors for bad options."""
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

  def split(args, kwargs, n):
    """The micro-batched arguments (checked) and the others."""
    if nums is None:
      chosen, names = (tuple(args), dict(kwargs)), None
    else:
      if max(nums) > len(args):
        raise ValueError(
            f"make_layerwise_step: batch_argnums={batch_argnums!r}, but loss_fn is given "
            f"{len(args)} argument(s) after params")
      chosen, names = (tuple(args[i - 1] for i in nums), {}), nums
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
    rest = args if nums is None else tuple(None if i + 1 in nums else a for i, a in enumerate(args))
    return chosen, (rest, kwargs)

  def merge(chosen, fixed):
    (c_args, c_kwargs), (rest, kwargs) = chosen, fixed
    if nums is None:
      return c_args, c_kwargs
    it = iter(c_args)
    return tuple(next(it) if i + 1 in nums else a for i, a in enumerate(rest)), kwargs

  return split, merge


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
