"""The step objects make_block_step / make_layerwise_step return, and the jaxpr analysis they use."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from optax_memopt import _jaxpr, _step

LAYERS, WIDTH = 3, 4


def _stacked_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"layers": {"w": 0.5 * jax.random.normal(k1, (LAYERS, WIDTH, WIDTH))},
          "head": jax.random.normal(k2, (WIDTH,))}


def _scan_loss(params, x):
  x = optax_memopt.scan_layers(lambda layer, x: jnp.tanh(x @ layer["w"]), params["layers"], x)
  return jnp.mean((x @ params["head"] - 1.0) ** 2)


def _list_loss(params, x):
  for layer in params["layers"]:
    x = jnp.tanh(x @ layer["w"])
  return jnp.sum(x ** 2)


X = jnp.ones((2, WIDTH))


def _classes(step):
  # By name: under --doctest-modules --import-mode=importlib pytest may import the step modules a
  # second time, so their classes are not the ones the package's factories use.
  return [c.__name__ for c in type(step).__mro__]


def test_block_step_object_attributes():
  params = {"layers": [{"w": jnp.eye(WIDTH) * 0.5} for _ in range(LAYERS)]}
  tx = optax_memopt.badam(1e-2, switch_every=1, switch_mode="ascending")
  step = optax_memopt.make_block_step(_list_loss, tx, donate=False)
  assert _classes(step) == ["BlockStep", "Step", "object"]
  assert (step.trace_count, list(step.compiled_blocks), step.warned) == (0, [], False)
  view = step.compiled_blocks  # a live view of the cache, as the old function attribute was
  state = tx.init(params)
  lowered = step.lower(2, params, state, X)
  assert isinstance(lowered, jax.stages.Lowered)
  assert sorted(view) == [2] and step.trace_count == 1
  for _ in range(LAYERS + 1):
    params, state, loss = step(params, state, X)
  assert sorted(view) == [0, 1, 2]
  assert step.trace_count == LAYERS  # block 2's step was compiled by lower and reused
  assert loss.shape == ()


def test_block_step_objects_keep_their_own_host_state():
  """Two steps of the same loss and tx: each has its own cache and counters."""
  params = _stacked_params()
  tx = optax_memopt.badam(1e-2, switch_every=2, switch_mode="ascending")
  first = optax_memopt.make_block_step(_scan_loss, tx, donate=False)
  second = optax_memopt.make_block_step(_scan_loss, tx, donate=False)
  state = tx.init(params)
  p1, s1, l1 = first(params, state, X)
  p1, s1, l1 = first(p1, s1, X)
  assert first.trace_count == 1 and second.trace_count == 0
  assert list(second.compiled_blocks) == []
  p2, s2, l2 = second(params, state, X)
  p2, s2, l2 = second(p2, s2, X)
  # The stacked layers share one compiled step, so every block is in the cache after one trace.
  assert sorted(first.compiled_blocks) == sorted(second.compiled_blocks) == list(range(LAYERS))
  for a, b in zip(jax.tree.leaves((p1, s1, l1)), jax.tree.leaves((p2, s2, l2))):
    np.testing.assert_array_equal(a, b)


def test_layerwise_step_object_attributes():
  params = _stacked_params()
  tx = optax.adamw(1e-2)
  step = optax_memopt.make_layerwise_step(_scan_loss, tx, donate=False, accumulate=2)
  assert _classes(step) == ["LayerwiseStep", "Step", "object"]
  assert (step.trace_count, step.accumulate, step.stacks, step.has_aux) == (0, 2, None, False)
  state = tx.init(params)
  batch = jnp.stack([X, 2 * X])
  assert isinstance(step.lower(params, state, batch), jax.stages.Lowered)
  for _ in range(2):
    params, state, loss = step(params, state, batch)
  assert step.trace_count == 1 and loss.shape == ()
  assert step.shardings is None  # nothing on a device mesh


def test_factories_keep_their_errors_at_construction():
  tx = optax_memopt.badam(1e-2)
  with pytest.raises(TypeError, match="make_block_step: loss_fn must be callable"):
    optax_memopt.make_block_step("loss", tx)
  with pytest.raises(TypeError, match="make_block_step: tx must be an optax transformation, got int"):
    optax_memopt.make_block_step(_list_loss, 3)
  with pytest.raises(TypeError, match="make_layerwise_step: loss_fn must be callable"):
    optax_memopt.make_layerwise_step(None, optax.adam(1e-2))
  with pytest.raises(TypeError, match="optax.MultiSteps keeps a full-size gradient accumulator"):
    optax_memopt.make_layerwise_step(_scan_loss, optax.MultiSteps(optax.adam(1e-2), 2))
  with pytest.raises(ValueError, match="accumulate must be a whole number"):
    optax_memopt.make_layerwise_step(_scan_loss, optax.adam(1e-2), accumulate=0)


def test_scalar_loss_is_checked_by_the_base():
  step = _step.Step(_list_loss, optax.sgd(1.0), has_aux=True, donate=False)
  assert step.scalar_loss((jnp.float32(1.0), {"aux": 0})) == 1.0
  with pytest.raises(TypeError, match="step: loss_fn must return a scalar loss, got \\(2,\\)"):
    step.scalar_loss((jnp.ones(2), None))


def _layer_axis_mix(fn, *shapes):
  """The reductions over the layer axis (axis 0 of every input) of ``fn``'s outputs."""
  closed = jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
  return [(got.ax, bool(got.mix)) for got in _jaxpr.axes(closed, [_jaxpr.Axis(0)] * len(shapes), "here")]


def test_axis_rules_follow_and_flag_the_layer_axis():
  # Elementwise and reductions over other axes keep the layer axis, unmixed.
  assert _layer_axis_mix(lambda x: jnp.sum(x * 2.0, axis=1), (3, 4)) == [(0, False)]
  # A reduction over it (a global norm of the stacked leaf) mixes the layers.
  assert _layer_axis_mix(lambda x: x / jnp.linalg.norm(x), (3, 4)) == [(0, True)]
  # A transpose moves it; a per-layer matmul (batch dimension) keeps it; a contraction over it mixes.
  assert _layer_axis_mix(lambda x: x.T, (3, 4)) == [(1, False)]
  assert _layer_axis_mix(lambda x: jnp.einsum("lij,ljk->lik", x, x), (3, 4, 4)) == [(0, False)]
  assert _layer_axis_mix(lambda x: jnp.einsum("li,lj->ij", x, x), (3, 4))[0][1]


def test_deps_follow_control_flow():
  def fn(a, b, c):
    d = jax.lax.cond(a.sum() > 0, lambda: b * 2.0, lambda: b)
    e = jax.lax.fori_loop(0, 3, lambda i, x: x + c, jnp.zeros_like(c))
    return d, e, a
  closed = jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct((2,), jnp.float32)] * 3)
  tags = [frozenset({name}) for name in "abc"]
  assert _jaxpr.deps(closed, tags) == [frozenset("ab"), frozenset("c"), frozenset("a")]


def test_own_gradient_reaches_update():
  def update(g0, g1, g2):
    return g0 * 2.0, jnp.zeros_like(g1), g2 + g0
  closed = jax.make_jaxpr(update)(*[jax.ShapeDtypeStruct((2,), jnp.float32)] * 3)
  assert _jaxpr.own_gradient_reaches_update(closed.jaxpr, [0, 1, 2]) == {0, 2}
