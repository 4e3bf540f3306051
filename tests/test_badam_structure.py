"""scale_by_badam_ratio (the direction of badam_ratio) and the shared find_states helper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from optax_memopt._tree import find_states


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (12, 20)) / 4, "b": jnp.zeros((20,)),
          "out": jax.random.normal(k2, (20, 3)) / 5}


def grads_at(params, t):
  keys = jax.random.split(jax.random.key(t), 3)
  return {name: jax.random.normal(k, x.shape) for k, (name, x) in zip(keys, sorted(params.items()))}


RATIO = dict(update_ratio=0.1, switch_every=2, min_size=50, eps=1e-3)


@pytest.mark.parametrize("mask_mode", ["adjacent", "scatter"])
def test_scale_by_badam_ratio_is_badam_ratios_direction(mask_mode):
  lr = 1e-2
  params = make_params()
  tx = optax_memopt.badam_ratio(lr, mask_mode=mask_mode, **RATIO)
  direction = optax.chain(optax_memopt.scale_by_badam_ratio(mask_mode=mask_mode, **RATIO),
                          optax.scale_by_learning_rate(lr))
  state, dstate = tx.init(params), direction.init(params)
  update, dupdate = jax.jit(tx.update), jax.jit(direction.update)
  for t in range(5):  # across two switches
    grads = grads_at(params, t)
    updates, state = update(grads, state, params)
    dupdates, dstate = dupdate(grads, dstate, params)
    # badam_ratio returns (p - lr * d) - p, the chain -lr * d: equal up to the rounding of p - lr * d
    # (|p| < 2 here, so <= ulp(2) = 2.4e-7), and 5000x below the lr = 1e-2 a step (|d| ~ 1) takes.
    np.testing.assert_allclose(dupdates["w"], updates["w"], atol=2e-6, rtol=0)
    for name in params:
      np.testing.assert_array_equal(dupdates[name] != 0, updates[name] != 0)
    inner = dstate[0]
    for field in ("count", "block_step", "active_block", "index", "mu", "nu"):
      jax.tree.map(np.testing.assert_array_equal, getattr(inner, field), getattr(state, field))
    params = optax.apply_updates(params, updates)


def test_scale_by_badam_ratio_state_and_wrappers():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params())
  tx = optax_memopt.scale_by_badam_ratio(**RATIO)
  state = tx.init(params)
  assert isinstance(state, optax_memopt.BAdamRatioState)
  # No master copy even for bf16 params: the direction does not know the step.
  assert jax.tree_util.tree_leaves(state.master) == []
  grads = grads_at(params, 0)
  # params are optional (the selection depends on shapes only); unknown extra args are ignored.
  updates, state = jax.jit(lambda g, s: tx.update(g, s, some_extra_arg=1.0))(grads, state)
  assert all(u.dtype == g.dtype for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)))
  assert int(optax_memopt.active_block(optax.chain(tx).init(params))) == 0
  assert int((updates["w"] != 0).sum()) == 24  # ceil(0.1 * 240)
  assert int((updates["b"] != 0).sum()) == 20  # below min_size: whole
  multi = optax.MultiSteps(tx, 2)
  mstate = multi.init(params)
  for t in range(2):
    mupdates, mstate = multi.update(grads_at(params, t), mstate, params)
  assert int((mupdates["w"] != 0).sum()) == 24


@pytest.mark.parametrize("make_tx", [
    lambda: optax_memopt.scale_by_badam_ratio(update_ratio=2.0),
    lambda: optax_memopt.scale_by_badam_ratio(switch_every=0),
    lambda: optax_memopt.scale_by_badam_ratio(mask_mode="rows"),
    lambda: optax_memopt.scale_by_badam_ratio(always_active="head"),
], ids=["ratio", "switch_every", "mask_mode", "always_active_string"])
def test_scale_by_badam_ratio_validates_at_construction(make_tx):
  with pytest.raises((ValueError, TypeError)):
    make_tx()


def test_find_states_looks_through_wrappers_and_stops_at_a_match():
  params = {"layers": [{"w": jnp.ones(3)} for _ in range(2)]}
  kinds = (optax_memopt.BlockCoordinateState, optax_memopt.BAdamRatioState)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.MultiSteps(optax_memopt.badam(1e-2, switch_every=2), 2),
      optax.apply_if_finite(optax_memopt.badam_ratio(1e-2), max_consecutive_errors=2),
  )
  found = find_states(tx.init(params), kinds)
  assert [type(s) for s in found] == [optax_memopt.BlockCoordinateState, optax_memopt.BAdamRatioState]
  # A state nested inside a found one (a block-coordinate stage around badam_ratio) is not listed.
  nested = optax_memopt.block_coordinate(optax_memopt.badam_ratio(1e-2), switch_every=2)
  found = find_states(nested.init(params), kinds)
  assert [type(s) for s in found] == [optax_memopt.BlockCoordinateState]
  assert find_states(optax.adam(1e-2).init(params), kinds) == []
