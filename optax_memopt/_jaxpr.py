"""What the step builders learn from ``tx.update``'s jaxpr (found on shapes only, at the first call).

* :func:`own_gradient_reaches_update`: which leaves' updates depend on their own gradient (the block
  step differentiates a leaf that an optimizer outside the block-coordinate stage trains).
* :func:`deps`: per output, the set of inputs it depends on (the layer-wise step refuses an update
  of a layer that reads another layer's, another stack's or an outer leaf's gradient).
* :func:`axes`: where the layer axis of a stacked leaf goes through the ordinary update, and whether
  anything reduces over it (lamb's trust ratio, adafactor's clipping, clip_by_block_rms: a number
  computed over the whole stacked leaf, which one layer at a time cannot reproduce).

Each walks the equations with one rule per primitive kind (control flow, reductions, shape
changes, ...); an unknown primitive gets the safe answer (everything depends on everything, the
layer axis is lost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend

from optax_memopt import _tree

# ---------------------------------------------------------------------------------------------
# Which update leaves depend on their own gradient (a backward liveness pass).


def own_gradient_reaches_update(jaxpr, leaves: list[int]) -> set[int]:
  """Of ``leaves``, those whose output (update) depends on the input (gradient) of the same index.

  ``jaxpr`` maps the gradient leaves (its first inputs) to the update leaves. A backward liveness
  pass over its equations, each output carrying a bit per leaf of ``leaves``; nested ``jit`` calls
  are followed, any other nested computation links all its inputs to all its outputs (the safe
  side: a leaf wrongly found trained is differentiated for nothing, never left out).
  """
  need: dict[Any, int] = {}
  for bit, i in enumerate(leaves):
    _need(need, jaxpr.outvars[i], 1 << bit)
  _propagate_need(need, jaxpr)
  return {i for bit, i in enumerate(leaves) if need.get(jaxpr.invars[i], 0) >> bit & 1}


def _need(need: dict[Any, int], var, mask: int) -> None:
  if mask and isinstance(var, jax.extend.core.Var):
    need[var] = need.get(var, 0) | mask


def _propagate_need(need: dict[Any, int], jaxpr) -> None:
  for eqn in reversed(jaxpr.eqns):
    mask = 0
    for v in eqn.outvars:
      mask |= need.get(v, 0)
    if not mask:
      continue
    sub = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit", "closed_call") else None
    if sub is None:
      for v in eqn.invars:
        _need(need, v, mask)
      continue
    sub = getattr(sub, "jaxpr", sub)
    for o, v in zip(sub.outvars, eqn.outvars):
      _need(need, o, need.get(v, 0))
    _propagate_need(need, sub)
    for iv, v in zip(sub.invars, eqn.invars):
      _need(need, v, need.get(iv, 0))


# ---------------------------------------------------------------------------------------------
# Which outputs depend on which inputs.


def sub_jaxpr(eqn):
  """The jaxpr an equation calls (``jit``, custom derivatives, ...), else ``None``."""
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(name)
    if sub is not None and hasattr(getattr(sub, "jaxpr", sub), "eqns"):
      return sub
  return None


def deps(jaxpr, in_deps: list[frozenset]) -> list[frozenset]:
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


def union(sets) -> frozenset:
  out: frozenset = frozenset()
  for s in sets:
    out = out | s
  return out


def _cond_deps(eqn, ins: list[frozenset]) -> list[frozenset]:
  index, ops = ins[0], ins[1:]
  outs = [frozenset()] * len(eqn.outvars)
  for branch in eqn.params["branches"]:
    outs = [a | b for a, b in zip(outs, deps(branch, ops))]
  return [o | index for o in outs]


def _scan_deps(eqn, ins: list[frozenset]) -> list[frozenset]:
  nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
  consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
  while True:
    outs = deps(eqn.params["jaxpr"], consts + carry + xs)
    new = [a | b for a, b in zip(carry, outs[:nk])]
    if new == carry:
      return outs
    carry = new


def _while_deps(eqn, ins: list[frozenset]) -> list[frozenset]:
  cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
  while True:
    pred = union(deps(eqn.params["cond_jaxpr"], cconsts + carry))
    outs = deps(eqn.params["body_jaxpr"], bconsts + carry)
    new = [a | b | pred for a, b in zip(carry, outs)]
    if new == carry:
      return carry
    carry = new


def _random_bits_deps(eqn, ins: list[frozenset]) -> list[frozenset]:
  # Marks the draw with what its key depends on: a layer's draw from a key that depends neither
  # on the layer index nor on the layer's own state is the same for every layer.
  return [ins[0] | {("rand", ins[0])}] * len(eqn.outvars)


_DEPS_RULES: dict[str, Callable[[Any, list[frozenset]], list[frozenset]]] = {
    "cond": _cond_deps,
    "scan": _scan_deps,
    "while": _while_deps,
    "random_bits": _random_bits_deps,
}


def _eqn_deps(eqn, ins: list[frozenset]) -> list[frozenset]:
  rule = _DEPS_RULES.get(eqn.primitive.name)
  if rule is not None:
    return rule(eqn, ins)
  sub = sub_jaxpr(eqn)
  if sub is not None and len(getattr(sub, "jaxpr", sub).invars) == len(ins):
    return deps(sub, ins)
  every = union(ins)
  return [every] * len(eqn.outvars)


# ---------------------------------------------------------------------------------------------
# Where the layer axis of a stacked leaf goes, and whether anything reduces over it.

LOST = -1  # the layer axis can no longer be followed (nothing is concluded from it)
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin"})
_SCANS_ALONG = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_LINALG = frozenset({"eigh", "qr", "svd", "cholesky", "triangular_solve", "lu", "householder_product",
                     "geqrf", "orgqr", "schur", "eig"})
# Source files whose frames never name the operation in an error (the step builders' own).
_OWN_FILES = ("/numerics.py", "_layerwise.py", "_jaxpr.py")


class Axis:
  """Per jaxpr variable: ``ax`` (the layer axis' position, ``None`` for a value that is the same for
  every layer and has no layer axis, ``LOST``) and ``mix`` (descriptions of the reductions over the
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
    if "/jax/" in name or "/jaxlib/" in name or name.endswith(_OWN_FILES):
      continue
    return f"{f.function_name.replace('.<locals>', '')} ({name.rsplit('/', 1)[-1]}:{f.line_num})"
  return "an operation"


def _join(a: Axis, b: Axis) -> Axis:
  ax = a.ax if a.ax == b.ax else (b.ax if a.ax is None else a.ax if b.ax is None else LOST)
  return Axis(ax, a.mix | b.mix)


def axes(jaxpr, ins: list[Axis], where: str | None) -> list[Axis]:
  """Per output of ``jaxpr``, its :class:`Axis` given the inputs' (``where``: the operation that
  errors name, ``None``: each equation's own source line)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  env: dict[Any, Axis] = {}

  def read(v):
    return env.get(v, Axis()) if not hasattr(v, "val") else Axis()

  for v, a in zip(jaxpr.invars, ins, strict=True):
    env[v] = a
  for eqn in jaxpr.eqns:
    outs = _eqn_axes(eqn, [read(v) for v in eqn.invars], where or _where_in_code(eqn))
    for v, a in zip(eqn.outvars, outs):
      env[v] = a
  return [read(v) for v in jaxpr.outvars]


def _loop_axes(body, consts: list[Axis], carry: list[Axis], rest: list[Axis], where, n_carry,
               pred=None) -> list[Axis]:
  for _ in range(8):
    outs = axes(body, consts + carry + rest, where)
    extra = Axis() if pred is None else pred(carry)
    new = [_join(_join(c, o), Axis(None, extra.mix)) if extra.ax is None
           else Axis(LOST, c.mix | o.mix | extra.mix) for c, o in zip(carry, outs[:n_carry])]
    if new == carry:
      return outs if pred is None else carry
    carry = new
  return [Axis(LOST, union(a.mix for a in carry + consts + rest))] * len(outs)


class _Eqn:
  """One equation seen by the axis rules: its params, inputs' axes and shapes, and ``mix`` (the
  reductions its inputs came from)."""

  def __init__(self, eqn, ins: list[Axis], where: str):
    self.eqn, self.p, self.ins, self.where = eqn, eqn.params, ins, where
    self.n_out = len(eqn.outvars)
    self.mix = union(a.mix for a in ins)
    self.batched = [a.ax for a in ins if a.ax is not None]

  @property
  def in_shapes(self) -> list[tuple[int, ...]]:
    return [tuple(getattr(v.aval, "shape", ())) for v in self.eqn.invars]

  @property
  def out_rank(self) -> int:
    return len(getattr(self.eqn.outvars[0].aval, "shape", ()))

  def one(self, ax, reduced: bool = False) -> list[Axis]:
    """Every output with the layer axis at ``ax`` (``reduced``: and reduced over here)."""
    return [Axis(ax, self.mix | {self.where} if reduced else self.mix)] * self.n_out


def _reduction_axes(e: _Eqn) -> list[Axis]:
  k, reduced = e.ins[0].ax, tuple(e.p["axes"])
  if k in reduced:
    return e.one(None, reduced=True)
  return e.one(k - sum(a < k for a in reduced))


def _scan_along_axes(e: _Eqn) -> list[Axis]:
  k = e.ins[0].ax
  along = e.p.get("axis", e.p.get("dimension"))
  return e.one(k, reduced=along == k)


def _squeeze_axes(e: _Eqn) -> list[Axis]:
  k, dims = e.ins[0].ax, tuple(d % len(e.in_shapes[0]) for d in e.p["dimensions"])
  return e.one(LOST if k in dims else k - sum(d < k for d in dims))


def _reshape_axes(e: _Eqn) -> list[Axis]:
  k, shape, new = e.ins[0].ax, e.in_shapes[0], tuple(e.p["new_sizes"])
  lo, hi = _prod(shape[:k]), _prod(shape[:k + 1])
  for j in range(len(new)):
    if _prod(new[:j]) <= lo and hi <= _prod(new[:j + 1]) and new[j] > 1:
      return e.one(j)  # the layer axis, or an axis it was merged into
  return e.one(LOST)


def _dot_general_axes(e: _Eqn) -> list[Axis]:
  (lc, rc), (lb, rb) = e.p["dimension_numbers"]
  lhs, rhs = e.ins[0].ax, e.ins[1].ax
  in_shapes = e.in_shapes
  l_free = [d for d in range(len(in_shapes[0])) if d not in lc and d not in lb]
  r_free = [d for d in range(len(in_shapes[1])) if d not in rc and d not in rb]
  found, mixed = [], frozenset()
  for k, c, b, free, off in ((lhs, lc, lb, l_free, len(lb)),
                             (rhs, rc, rb, r_free, len(lb) + len(l_free))):
    if k is None:
      continue
    if k in c:
      mixed = {e.where}
    elif k in b:
      found.append(tuple(b).index(k))
    else:
      found.append(off + free.index(k))
  ax = None if not found else found[0] if len(set(found)) == 1 else LOST
  return [Axis(ax, e.mix | mixed)] * e.n_out


def _linalg_axes(e: _Eqn) -> list[Axis]:
  k = e.ins[0].ax
  if k is not None and k >= len(e.in_shapes[0]) - 2:
    return e.one(None, reduced=True)
  return e.one(k)


def _slicing_axes(e: _Eqn) -> list[Axis]:
  k, in_shapes = e.batched[0], e.in_shapes
  full = all(a.ax in (None, k) for a in e.ins) and all(
      len(s) <= k or s[k] == in_shapes[0][k] for s, a in zip(in_shapes, e.ins) if a.ax == k)
  along = e.p.get("dimension")
  return e.one(k if full and along != k and tuple(getattr(e.eqn.outvars[0].aval, "shape", ()))[k]
               == in_shapes[0][k] else LOST)


def _cond_axes(e: _Eqn) -> list[Axis]:
  outs = [Axis()] * e.n_out
  for branch in e.p["branches"]:
    outs = [_join(o, b) for o, b in zip(outs, axes(branch, e.ins[1:], e.where))]
  return [Axis(o.ax, o.mix | e.ins[0].mix) for o in outs]


def _scan_axes(e: _Eqn) -> list[Axis]:
  nc, nk = e.p["num_consts"], e.p["num_carry"]
  xs = [Axis(LOST if a.ax == 0 else None if a.ax is None else a.ax - 1, a.mix)
        for a in e.ins[nc + nk:]]
  outs = _loop_axes(e.p["jaxpr"], e.ins[:nc], e.ins[nc:nc + nk], xs, e.where, nk)
  return outs[:nk] + [Axis(None if o.ax is None else LOST if o.ax == LOST else o.ax + 1, o.mix)
                      for o in outs[nk:]]


def _while_axes(e: _Eqn) -> list[Axis]:
  cn, bn = e.p["cond_nconsts"], e.p["body_nconsts"]

  def pred(carry):
    got = axes(e.p["cond_jaxpr"], e.ins[:cn] + carry, e.where)[0]
    return Axis(None if got.ax is None else LOST, got.mix)

  return _loop_axes(e.p["body_jaxpr"], e.ins[cn:cn + bn], e.ins[cn + bn:], [], e.where, e.n_out, pred)


def _elementwise_axes(e: _Eqn) -> list[Axis]:
  # Operands of the output's rank share the layer axis; scalars broadcast.
  in_shapes, out_rank = e.in_shapes, e.out_rank
  ranked = [a.ax for a, s in zip(e.ins, in_shapes) if a.ax is not None and len(s) == out_rank]
  if len(ranked) == len(e.batched) and len(set(ranked)) == 1 and all(
      len(s) in (0, out_rank) for s in in_shapes):
    return e.one(ranked[0])
  return e.one(LOST)


_AXIS_RULES: dict[str, Callable[[_Eqn], list[Axis]]] = {
    **{name: _reduction_axes for name in _REDUCTIONS},
    **{name: _scan_along_axes for name in _SCANS_ALONG | {"sort"}},
    **{name: _linalg_axes for name in _LINALG},
    **{name: _slicing_axes
       for name in ("slice", "dynamic_slice", "pad", "concatenate", "dynamic_update_slice")},
    "broadcast_in_dim": lambda e: e.one(e.p["broadcast_dimensions"][e.ins[0].ax]),
    "transpose": lambda e: e.one(tuple(e.p["permutation"]).index(e.ins[0].ax)),
    "squeeze": _squeeze_axes,
    "reshape": _reshape_axes,
    "dot_general": _dot_general_axes,
    "cond": _cond_axes,
    "scan": _scan_axes,
    "while": _while_axes,
}


def _eqn_axes(eqn, ins: list[Axis], where: str) -> list[Axis]:
  e = _Eqn(eqn, ins, where)
  name = eqn.primitive.name
  if not e.batched:
    return _cond_axes(e) if name == "cond" else e.one(None)
  if LOST in e.batched:
    return e.one(LOST)
  if e.p.get("name") == _tree.LAYER_SEPARABLE_ANY:
    return e.one(None)
  rule = _AXIS_RULES.get(name)
  if rule is not None:
    return rule(e)
  sub = sub_jaxpr(eqn)
  if sub is not None and len(getattr(sub, "jaxpr", sub).invars) == len(ins):
    return axes(sub, ins, where)
  return _elementwise_axes(e)


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= int(x)
  return out
