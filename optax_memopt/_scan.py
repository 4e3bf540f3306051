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
  is a traced index: one compiled step serves every layer of the stack. Since which layers will be
  differentiated is known only on the device, the forward pass keeps each layer's input only and
  the backward pass recomputes the layers it differentiates: the activations held are one layer's
  residuals plus ``L`` carries, whichever layer is active;
* inside :func:`optax_memopt.make_layerwise_step`, the backward pass applies the optimizer to each
  layer's slice of the weights and state as soon as that layer's gradient is computed.

Both custom VJPs run on one engine (:class:`_Engine`): a forward scan that keeps per layer what its
pullback needs, and a reverse scan in which each step builder decides what to do with each layer's
pullback.

The block step finds the stack by identity: it hands ``loss_fn`` the stacked leaves of the active
block as marked arrays, and ``scan_layers`` recognises them among its ``layers``. A model whose stack
does not go through ``scan_layers`` still gets the right gradient from the block step, at the cost
of the whole stack's backward pass. So does a stacked leaf computed from the marked ones before the
scan (a tied ``w.T``, ``softplus(raw)``): it is differentiated whole, every layer's weight gradient
is computed and the mark takes the active layer's slice of what reaches the marked leaf (with a
warning naming the leaf).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

# The context variables below are the step builders' channel to scan_layers, documented with the
# rest of that channel in optax_memopt._protocol.

# The active layer slices of the block step being traced: id(marked stacked leaf) -> _Active.
_ACTIVE: contextvars.ContextVar[dict[int, _Active] | None] = contextvars.ContextVar(
    "optax_memopt_scan_active", default=None
)


@dataclasses.dataclass
class _Active:
  value: jax.Array  # the active slice, the array the block step differentiates
  index: jax.Array  # int32 scalar, its position along the stack axis
  used: bool = False  # set when a scan_layers call consumed it


# The stacked leaves the block step being traced differentiates whole on purpose (always-active
# leaves): id(leaf handed to loss_fn). Not warned about as leaves derived from the marked weights.
_WHOLE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "optax_memopt_scan_whole", default=frozenset()
)


# The scan_layers calls of the block step being traced that found none of its marked leaves: per
# call, the (shape, dtype) of each scanned leaf (the step says why its layers were not sliced).
_UNMATCHED: contextvars.ContextVar[list[list[tuple[tuple[int, ...], Any]]] | None] = (
    contextvars.ContextVar("optax_memopt_scan_unmatched", default=None))


@contextlib.contextmanager
def active_slices(
    entries: dict[int, _Active], whole: frozenset[int] = frozenset()
) -> Iterator[list[list[tuple[tuple[int, ...], Any]]]]:
  """While tracing a block step's loss: the marked stacked leaves and their active slices, and the
  ids of the leaves it differentiates whole on purpose. Yields the list to which each
  ``scan_layers`` call that finds none of the marked leaves appends its leaves' (shape, dtype)."""
  unmatched: list[list[tuple[tuple[int, ...], Any]]] = []
  tokens = _ACTIVE.set(entries), _WHOLE.set(frozenset(whole)), _UNMATCHED.set(unmatched)
  try:
    yield unmatched
  finally:
    for var, token in zip((_ACTIVE, _WHOLE, _UNMATCHED), tokens):
      var.reset(token)


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


def _pick(values: list, mask: list[bool]) -> list:
  """The entries of ``values`` where ``mask`` is set."""
  return [v for v, m in zip(values, mask) if m]


def _put(picked: list, values: list, mask: list[bool]) -> list:
  """``values`` with the entries where ``mask`` is set replaced, in order, by ``picked``."""
  it = iter(picked)
  return [next(it) if m else v for v, m in zip(values, mask)]


def _spread(picked: list, mask: list[bool]) -> list:
  """``picked`` at the positions where ``mask`` is set, ``None`` elsewhere."""
  it = iter(picked)
  return [next(it) if m else None for m in mask]


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
  """The ``stacklevel`` of the first frame outside JAX and this package (the user's code)."""
  frame, level = sys._getframe(1), 1
  while frame is not None:
    name = frame.f_code.co_filename
    if (not name.startswith(_PACKAGE_DIR) and f"{os.sep}jax{os.sep}" not in name
        and "jaxlib" not in name):
      return level
    frame, level = frame.f_back, level + 1
  return 1


class _Layer:
  """``fn`` on flat leaf lists: ``(layer, carry, shared, state) -> (carry, state)``."""

  def __init__(self, fn, layer_def, carry_def, shared_def, state_def, state_avals):
    self.fn, self.layer_def, self.carry_def = fn, layer_def, carry_def
    self.shared_def, self.state_def, self.state_avals = shared_def, state_def, state_avals

  def __call__(self, p, c, s, t):
    args = (jax.tree_util.tree_unflatten(self.layer_def, p),
            jax.tree_util.tree_unflatten(self.carry_def, c),
            *jax.tree_util.tree_unflatten(self.shared_def, s))
    if self.state_def is None:
      out, new_t = self.fn(*args), []
    else:
      out = self.fn(*args, state=jax.tree_util.tree_unflatten(self.state_def, t))
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("scan_layers: with state=..., fn must return a pair (carry, state)")
      out, new_state = out
      new_t, new_def = jax.tree_util.tree_flatten(new_state)
      got = [(jnp.shape(x), jnp.result_type(x)) for x in new_t]
      if new_def != self.state_def or got != self.state_avals:
        raise TypeError(
            "scan_layers: fn must return a layer state of the structure, shapes and dtypes it was "
            f"given ({self.state_def}, {self.state_avals}), got {new_def}, {got}"
        )
    out_leaves, out_def = jax.tree_util.tree_flatten(out)
    if out_def != self.carry_def:
      raise TypeError(
          f"scan_layers: fn must return a carry with the input's structure {self.carry_def}, "
          f"got {out_def}"
      )
    return out_leaves, new_t

  def plain(self, stacked, c_leaves, s_leaves, t_stacked):
    """``lax.scan`` over the layers: ``(carry, stacked new state)``."""
    def body(c, xs):
      p, t = xs
      return self(p, c, s_leaves, t)

    return jax.lax.scan(body, c_leaves, (stacked, t_stacked))


class _Engine:
  """The per-layer forward and backward passes of both custom VJPs of :func:`scan_layers`.

  ``forward`` is a scan over the layers that runs ``jax.vjp`` of each layer with respect to the
  wanted inputs only: the layer leaves in ``p_wrt`` (whose weight gradients are wanted), the float
  carry leaves, and the shared leaves in ``s_wrt``. It stacks, per layer, what that layer's
  pullback needs: its residuals as ``lax.scan`` keeps them, or with ``remat`` only its inputs (the
  carry; the pullback recomputes the layer). Residuals that are the layer's own weights or a
  shared argument are never stacked: the pullback reads them from the inputs.

  ``backward`` is the reverse scan: per layer it calls the caller's ``step``, which decides what to
  do with that layer's pullback (skip it, propagate activations only, take its weight gradients,
  apply an optimizer to them), and it sums the shared arguments' gradients over the layers.
  """

  def __init__(self, layer: _Layer, num_layers: int, p_wrt, c_diff, s_wrt, *, remat: bool):
    self.layer, self.num_layers, self.remat = layer, num_layers, remat
    self.p_wrt, self.c_diff, self.s_wrt = list(p_wrt), list(c_diff), list(s_wrt)
    self.res_def = None
    self.where: list[tuple[str, int]] = []

  def forward(self, stacked, c_leaves, s_leaves, t_stacked):
    """``(carry out, stacked new state, stacked per-layer saves)``."""
    p_wrt, c_diff, s_wrt = self.p_wrt, self.c_diff, self.s_wrt

    def body(c, xs):
      p, t = xs

      def f(pw, cd, sw):
        outs, new_t = self.layer(_put(pw, p, p_wrt), _put(cd, c, c_diff), _put(sw, s_leaves, s_wrt), t)
        return _pick(outs, c_diff), ([o for o, d in zip(outs, c_diff) if not d], new_t)

      if self.remat:
        f = jax.checkpoint(f, prevent_cse=False)  # recomputed in another loop: no CSE to fear
      outs_d, vjp_fn, (outs_nd, new_t) = jax.vjp(
          f, _pick(p, p_wrt), _pick(c, c_diff), _pick(s_leaves, s_wrt), has_aux=True)
      res, self.res_def = jax.tree_util.tree_flatten(vjp_fn)
      self.where, saved = [], []
      for r in res:
        hit = next((("p", i) for i, x in enumerate(p) if r is x), None)
        hit = hit or next((("s", i) for i, x in enumerate(s_leaves) if r is x), None)
        if hit is None:
          hit = ("r", len(saved))
          saved.append(r)
        self.where.append(hit)
      it_d, it_nd = iter(outs_d), iter(outs_nd)
      return [next(it_d) if d else next(it_nd) for d in c_diff], (saved, new_t)

    c_out, (saved, t_out) = jax.lax.scan(body, c_leaves, (stacked, t_stacked))
    return c_out, t_out, saved

  def pullback(self, saved_l, p_l, s_leaves):
    """Layer ``l``'s pullback ``dc -> (d weights in p_wrt, dc, d shared in s_wrt)`` from its
    saves and its layer leaves ``p_l``."""
    res = [saved_l[j] if kind == "r" else (p_l[j] if kind == "p" else s_leaves[j])
           for kind, j in self.where]
    return jax.tree_util.tree_unflatten(self.res_def, res)

  def backward(self, ct, s_leaves, saved, step, init):
    """Reverse scan: ``step(l, pullback, dc, extra) -> (dc, d shared, extra, per-layer output)``
    with ``pullback(p_l)`` layer ``l``'s pullback. Returns ``(d carry, d shared, extra, outputs)``
    (``None`` for the carry and shared leaves without a gradient)."""
    ct_d = [
        jnp.zeros(c.shape, c.dtype) if isinstance(c, jax.custom_derivatives.SymbolicZero) else c
        for c, d in zip(ct, self.c_diff) if d
    ]
    zeros_s = [jnp.zeros_like(x) for x in _pick(s_leaves, self.s_wrt)]

    def body(carry, xs):
      dc, ds, extra = carry
      l, saved_l = xs
      pull = _Pull(self, saved_l, s_leaves)
      dc, ds_l, extra, out = step(l, pull, dc, extra)
      return (dc, [a + b for a, b in zip(ds, ds_l)], extra), out

    (dc, ds, extra), outs = jax.lax.scan(
        body, (ct_d, zeros_s, init), (jnp.arange(self.num_layers), saved), reverse=True)
    return _spread(dc, self.c_diff), _spread(ds, self.s_wrt), extra, outs


class _Pull:
  """Layer ``l``'s pullback in :meth:`_Engine.backward`: ``pull(p_l)`` is the pullback
  ``dc -> (d weights, dc, d shared)``; ``pull.summed(p_l, dc)`` the same under the micro-batch
  ``jax.vmap`` of an accumulated layer-wise step (see :func:`_summed_pullback`)."""

  def __init__(self, engine: _Engine, saved_l, s_leaves):
    self.engine, self.saved_l, self.s_leaves = engine, saved_l, s_leaves

  def __call__(self, p_l):
    return self.engine.pullback(self.saved_l, p_l, self.s_leaves)

  def summed(self, p_l, dc):
    return _summed_pullback(self.engine, self.saved_l, p_l, self.s_leaves, dc)


def _sum_dtype(x) -> Any:
  """The dtype gradients of ``x`` are summed in: float32 for lower-precision floats."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _summed_pullback(engine: _Engine, saved_l, p_l, s_leaves, dc):
  """``(d weights, dc, d shared)`` of one layer, where the weight gradient is summed over the
  micro-batches of the enclosing ``jax.vmap`` (the accumulated layer-wise step runs ``loss_fn``
  under a ``vmap`` over its micro-batch axis).

  Under that ``vmap`` the layer's saves, the activation gradient and the per-example shared
  arguments carry the micro-batch axis; the weights do not. A ``custom_vmap`` rule sees the axis
  explicitly: it runs the layer's pullback one micro-batch at a time (``lax.scan``), so only one
  micro-batch's residuals are recomputed at once, and sums the weight gradients (in float32 for
  low-precision weights) into one layer's gradient, returned without the micro-batch axis: the
  update that follows it runs once, on the window's summed gradient. Outside a ``vmap`` (one
  micro-batch) it is the plain pullback.
  """
  @jax.custom_batching.custom_vmap
  def pull(saved_l, p_l, s_leaves, dc):
    return engine.pullback(saved_l, p_l, s_leaves)(dc)

  @pull.def_vmap
  def rule(axis_size, in_batched, saved_l, p_l, s_leaves, dc):
    b_saved, b_p, b_s, b_dc = in_batched
    if any(b_p):
      raise ValueError("scan_layers: a layer's weights vary over the micro-batches")
    xs = ([x for x, b in zip(saved_l, b_saved) if b], [x for x, b in zip(s_leaves, b_s) if b],
          [x for x, b in zip(dc, b_dc) if b])
    dp0 = [jnp.zeros(x.shape, _sum_dtype(x)) for x in _pick(p_l, engine.p_wrt)]

    def one(acc, xs):
      it_saved, it_s, it_dc = (iter(x) for x in xs)
      saved_k = [next(it_saved) if b else x for x, b in zip(saved_l, b_saved)]
      s_k = [next(it_s) if b else x for x, b in zip(s_leaves, b_s)]
      dc_k = [next(it_dc) if b else x for x, b in zip(dc, b_dc)]
      dp, dc_k, ds_k = engine.pullback(saved_k, p_l, s_k)(dc_k)
      return [a + g.astype(a.dtype) for a, g in zip(acc, dp)], (dc_k, ds_k)

    dp, (dc_out, ds) = jax.lax.scan(one, dp0, xs, length=axis_size)
    dp = [g.astype(x.dtype) for g, x in zip(dp, _pick(p_l, engine.p_wrt))]
    b_ds = _pick(b_s, engine.s_wrt)
    ds = [d if b else jnp.sum(d, axis=0) for d, b in zip(ds, b_ds)]
    return (dp, dc_out, ds), ([False] * len(dp), [True] * len(dc_out), b_ds)

  return pull(list(saved_l), list(p_l), list(s_leaves), list(dc))


def scan_layers(fn: Callable[..., Any], layers: Any, carry: Any, *shared: Any,
                state: Any = None) -> Any:
  """Runs ``carry = fn(layer, carry, *shared)`` for each layer of a stacked ``layers`` tree.

  Equivalent to ``jax.lax.scan(lambda c, layer: (fn(layer, c, *shared), None), carry, layers)[0]``,
  values and gradients alike, with the backward pass described in the module docstring: under
  :func:`optax_memopt.make_block_step` only the active layer's weight gradient is computed, the
  layers above it are differentiated with respect to their activations only, and the layers below
  it are not differentiated. Reverse-mode only (``jax.grad``, ``jax.vjp``); forward-mode
  (``jax.jvp``) is not supported, as for any ``jax.custom_vjp`` function.

  Memory: under plain ``jax.grad`` the forward pass keeps each layer's residuals as ``lax.scan``
  does (the stacked weights themselves are not copied); wrap ``fn`` in ``jax.checkpoint`` to keep
  only each layer's input instead. Under the block step, where the active layer is only known on
  the device, the forward pass always keeps only each layer's input (its carry) and the backward
  pass recomputes the layers it differentiates (the active one and those above it), so the
  activation memory is one layer's residuals plus ``L`` carries, whichever layer is active.

  Per-layer state: layers that write state while they run (Flax NNX dropout RNG counts, BatchNorm
  statistics) pass it as ``state``, a tree of ``[L, ...]`` leaves like ``layers``. Then ``fn`` is
  called as ``fn(layer, carry, *shared, state=layer_state)`` and returns ``(carry, layer_state)``,
  and ``scan_layers`` returns ``(carry, state)`` with every layer's new state stacked, as
  ``nnx.scan`` returns a scanned module's state. The state is not differentiated (its gradient is
  zero, as for BatchNorm's running statistics). With NNX::

    graphdef, params, rest = nnx.split(layers, nnx.Param, ...)
    def one(p, x, state):
      layer = nnx.merge(graphdef, p, state)
      return layer(x), nnx.state(layer, nnx.Not(nnx.Param))
    x, rest = optax_memopt.scan_layers(one, params, x, state=rest)
    nnx.update(layers, rest)

  Args:
    fn: ``fn(layer, carry, *shared) -> carry``, one layer; ``layer`` is ``layers`` with the leading
      axis indexed away. It must return a carry of the same structure, shapes and dtypes. With
      ``state``: ``fn(layer, carry, *shared, state=layer_state) -> (carry, layer_state)``.
    layers: a pytree whose leaves share a leading axis of length ``L`` (e.g. the ``nnx.State`` of an
      ``nnx.vmap``-initialised stack, or a Linen ``nn.scan`` stack's params). Arrays computed from
      the stacked parameters before the scan (a tied ``w.T``, ``softplus(raw)``) get the right
      gradient, but the block step then differentiates every layer (with a warning): compute them
      inside ``fn`` to keep its one-layer backward pass.
    carry: the input of the first layer (a pytree).
    *shared: arguments every layer receives unchanged (masks, rotary tables, ...); they may be
      differentiated.
    state: optional per-layer state (a pytree of ``[L, ...]`` leaves: RNG keys and counts, running
      statistics) that ``fn`` reads and returns updated; not differentiated.

  Returns:
    The output of the last layer; with ``state``, the pair ``(output, new state)``.

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

    Per-layer state, here a count of calls per layer:

    >>> def counting(p, x, state):
    ...   return jnp.tanh(x @ p['w']), state + 1
    >>> y, calls = optax_memopt.scan_layers(counting, layers, x, state=jnp.zeros(3, jnp.int32))
    >>> calls.tolist()
    [1, 1, 1]
  """
  if not callable(fn):
    raise TypeError("scan_layers: fn must be callable")
  with_paths, layer_def = jax.tree_util.tree_flatten_with_path(layers)
  leaves = [x for _, x in with_paths]
  if not leaves:
    raise ValueError("scan_layers: layers has no arrays")
  t_leaves, t_def = jax.tree_util.tree_flatten(state) if state is not None else ([], None)
  lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves + t_leaves}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(
        "scan_layers: every leaf of layers (and of state) must have the same leading (layer) axis; "
        f"got leading sizes {sorted(str(n) for n in lengths)}"
    )
  carry_leaves, carry_def = jax.tree_util.tree_flatten(carry)
  shared_leaves, shared_def = jax.tree_util.tree_flatten(shared)
  layer = _Layer(fn, layer_def, carry_def, shared_def, t_def,
                 [(jnp.shape(x)[1:], jnp.result_type(x)) for x in t_leaves])
  layerwise = _LAYERWISE.get()
  names = [jax.tree_util.keystr(path) for path, _ in with_paths]
  if layerwise is not None and any(id(x) in layerwise for x in leaves):
    c_out, t_out = _scan_layerwise(layer, leaves, names, layerwise, carry_leaves, shared_leaves,
                                   t_leaves)
  else:
    c_out, t_out = _scan_block(layer, leaves, names, carry_leaves, shared_leaves, t_leaves)
  out = jax.tree_util.tree_unflatten(carry_def, c_out)
  if state is None:
    return out
  return out, jax.tree_util.tree_unflatten(t_def, t_out)


def _scan_block(layer, leaves, names, carry_leaves, shared_leaves, t_leaves):
  """``scan_layers`` under plain ``jax.grad`` or the block step (active slices marked)."""
  entries = _ACTIVE.get() or {}
  intended = [id(x) in _WHOLE.get() for x in leaves]
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
    unmatched = _UNMATCHED.get()
    if entries and unmatched is not None:
      unmatched.append([(tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves])
    index = jnp.int32(-1)
    stacked = leaves
  else:
    # The marked leaves reach the scan through their active slice only.
    stacked = [jax.lax.stop_gradient(x) if a is not None else x for x, a in zip(leaves, active)]
  num_layers, num_state = jnp.shape(leaves[0])[0], len(t_leaves)

  @jax.custom_vjp
  def run(stacked, active, index, c_leaves, s_leaves, t_stacked):
    del active, index
    return layer.plain(stacked, c_leaves, s_leaves, t_stacked)

  # What the forward pass finds out (set while tracing fwd) for the backward pass.
  facts: dict[str, Any] = {}

  def fwd(stacked, active, index, c_leaves, s_leaves, t_stacked):
    p_pert = [x.perturbed for x in stacked]
    marked = [a is not None and a.perturbed for a in active]
    c_pert = any(x.perturbed for x in c_leaves)
    s_pert = [x.perturbed for x in s_leaves]
    stacked = [x.value for x in stacked]
    index = index.value
    c_leaves = [x.value for x in c_leaves]
    s_leaves = [x.value for x in s_leaves]
    t_stacked = [x.value for x in t_stacked]
    p_diff = [_is_float(x) for x in stacked]
    # Stacked leaves differentiated whole: perturbed, not marked (under the block step, an array
    # computed from the marked weights before the scan).
    whole = [pp and d for pp, d in zip(p_pert, p_diff)]
    s_wrt = [sp and _is_float(x) for sp, x in zip(s_pert, s_leaves)]
    any_marked, any_whole = any(marked), any(whole)
    derived = [w and not i for w, i in zip(whole, intended)]
    if any_marked and any(derived):
      warnings.warn(
          "scan_layers: the stacked leaves "
          f"{', '.join(n for n, w in zip(names, derived) if w)} are computed from the block step's "
          "layer weights before the scan, so every layer is differentiated for the active "
          "layer's gradient (exact, not faster); compute them inside the layer function instead",
          stacklevel=_caller_stacklevel(),
      )
    # Under the block step (the active layer known only on the device) each layer keeps only its
    # input; the layers that are differentiated are recomputed in the backward pass.
    engine = _Engine(layer, num_layers, [w or m for w, m in zip(whole, marked)],
                     [_is_float(x) for x in c_leaves], s_wrt, remat=any_marked and not any_whole)
    c_out, t_out, saved = engine.forward(stacked, c_leaves, s_leaves, t_stacked)
    facts.update(engine=engine, whole=whole, marked=marked, any_whole=any_whole,
                 below=c_pert or any(s_wrt))
    return (c_out, t_out), (saved, stacked, index, s_leaves)

  def bwd(residuals, ct):
    saved, stacked, index, s_leaves = residuals
    engine, whole, marked = facts["engine"], facts["whole"], facts["marked"]
    any_whole, below = facts["any_whole"], facts["below"]
    p_wrt = engine.p_wrt
    zeros_s = [jnp.zeros_like(x) for x in _pick(s_leaves, engine.s_wrt)]
    # Per layer: the gradient of the whole-differentiated leaves (stacked by the scan) and, at
    # layer ``index``, that of the marked leaves (carried).
    da0 = [jnp.zeros(x.shape[1:], x.dtype) for x in _pick(stacked, marked)]

    def step(l, pull, dc, da):
      p_l = [jax.lax.dynamic_index_in_dim(x, l, keepdims=False) for x in stacked]

      def differentiate(at_index):
        def branch():
          dp, dc_new, ds_l = pull(p_l)(dc)
          dp = _put(dp, [None] * len(stacked), p_wrt)
          return dc_new, ds_l, (_pick(dp, marked) if at_index else da), _pick(dp, whole)
        return branch

      def skip():
        return dc, zeros_s, da, [jnp.zeros(x.shape[1:], x.dtype) for x in _pick(stacked, whole)]

      if not any(marked):
        return differentiate(False)()
      # Layers above the active one for their activations, the active one for its weights too,
      # the layers below only when something there needs a gradient.
      branch = jnp.where(l == index, 2, jnp.where(l > index, 1, 1 if below or any_whole else 0))
      return jax.lax.switch(branch, [skip, differentiate(False), differentiate(True)])

    d_carry, d_shared, da, d_whole = engine.backward(ct[0], s_leaves, saved, step, da0)
    return (_spread(d_whole, whole), _spread(da, marked), None, d_carry, d_shared,
            [None] * num_state)

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  return run(list(stacked), list(active), index, carry_leaves, shared_leaves, t_leaves)


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
  # Accumulated step: loss_fn runs under a vmap over this many micro-batches, and each layer's
  # weight gradient is summed over them before its update (None: one batch, no vmap).
  micro_batches: int | None = None


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


def _scan_layerwise(layer, leaves, names, members, carry_leaves, shared_leaves, t_leaves):
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
  for m, x, name in zip(found, leaves, names):
    if m is None and _is_float(x):
      raise ValueError(
          f"scan_layers: under make_layerwise_step the scanned layers may hold only the stack's "
          f"trained weights and non-float arrays; the float leaf layers{name} {jnp.shape(x)} is not "
          "one of the step's params (a frozen per-layer array such as a LoRA base?): pass it as "
          "scan_layers(..., state=...) and return it unchanged from fn, or put it in params and "
          "freeze it in tx (optax.multi_transform with optax.set_to_zero())"
      )
  stack.used += 1
  is_weight = [m is not None for m in found]
  order = sorted((m.position, i) for i, m in enumerate(found) if m is not None)
  w_pos = [i for _, i in order]  # layer-leaf position of the stack's weight k
  weights = [found[i].weights for i in w_pos]
  fixed = [x for x, w in zip(leaves, is_weight) if not w]
  num_layers, num_state = jnp.shape(weights[0])[0], len(t_leaves)

  def layer_leaves(weights, fixed):
    """The layer leaves in ``layers`` order (weights given in the stack's order)."""
    out = _put(fixed, [None] * len(leaves), [not w for w in is_weight])
    for i, w in zip(w_pos, weights):
      out[i] = w
    return out

  def in_stack_order(layer_values):
    return [layer_values[i] for i in w_pos]

  @jax.custom_vjp
  def run(weights, carriers, fixed, c_leaves, s_leaves, t_stacked):
    del carriers
    return layer.plain(layer_leaves(weights, fixed), c_leaves, s_leaves, t_stacked)

  facts: dict[str, Any] = {}

  def fwd(weights, carriers, fixed, c_leaves, s_leaves, t_stacked):
    s_wrt = [x.perturbed and _is_float(x.value) for x in s_leaves]
    weights, carriers, fixed, c_leaves, s_leaves, t_stacked = (
        [x.value for x in xs] for xs in (weights, carriers, fixed, c_leaves, s_leaves, t_stacked))
    # Every layer is differentiated: its residuals are kept, as lax.scan keeps them. With
    # micro-batches, only each layer's input is kept (per micro-batch), and the backward pass
    # recomputes one layer for one micro-batch at a time.
    engine = _Engine(layer, num_layers, is_weight, [_is_float(x) for x in c_leaves], s_wrt,
                     remat=stack.micro_batches is not None)
    c_out, t_out, saved = engine.forward(layer_leaves(weights, fixed), c_leaves, s_leaves,
                                         t_stacked)
    facts["engine"] = engine
    return (c_out, t_out), (saved, weights, carriers, fixed, s_leaves)

  def bwd(residuals, ct):
    saved, weights, carriers, fixed, s_leaves = residuals
    engine = facts["engine"]

    def step(l, pull, dc, extra):
      w_all, s_all = extra
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
      f_l = [jax.lax.dynamic_index_in_dim(x, l, keepdims=False) for x in fixed]
      if stack.micro_batches is None:
        dw, dc, ds_l = pull(layer_leaves(w_l, f_l))(dc)
      else:
        dw, dc, ds_l = pull.summed(layer_leaves(w_l, f_l), dc)
      new_w, new_s = stack.update(l, in_stack_order(_put(dw, [None] * len(leaves), is_weight)),
                                  w_l, s_l)
      w_all = [jax.lax.dynamic_update_index_in_dim(x, n.astype(x.dtype), l, 0)
               for x, n in zip(w_all, new_w)]
      s_all = [jax.lax.dynamic_update_index_in_dim(x, n.astype(x.dtype), l, 0)
               for x, n in zip(s_all, new_s)]
      return dc, ds_l, (w_all, s_all), None

    d_carry, d_shared, (new_weights, new_carriers), _ = engine.backward(
        ct[0], s_leaves, saved, step, (list(weights), list(carriers)))
    return new_weights, new_carriers, [None] * len(fixed), d_carry, d_shared, [None] * num_state

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  return run(weights, list(stack.carriers), fixed, carry_leaves, shared_leaves, t_leaves)
