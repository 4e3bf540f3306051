"""Behavioural tests of BAdam's ratio mode."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt


def make_params(dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {
      "w1": jax.random.normal(k1, (16, 24)).astype(dtype) / 4,
      "w2": jax.random.normal(k2, (24, 8)).astype(dtype) / 5,
      "b": jnp.zeros((24,), dtype),  # 24 < min_size: trained whole
      "out": jax.random.normal(k3, (8,)).astype(dtype),
  }


def loss_fn(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b"])
  y = jnp.tanh(h @ params["w2"]) @ params["out"]
  return jnp.mean((y.astype(jnp.float32) - 1.0) ** 2)


X = jax.random.normal(jax.random.key(1), (5, 16))


@pytest.mark.parametrize("mode", ["adjacent", "scatter"])
def test_matches_adam_on_selected_coordinates(mode):
  ratio, k, lr = 0.1, 3, 1e-2
  params = make_params()
  # Each side computes its own gradients, so a last-bit difference in the update arithmetic (FMA
  # contraction depends on the CPU) becomes a gradient difference dg, which Adam turns into a step
  # error of at most lr * dg / eps: with eps=1e-3, lr=1e-2, |dg| <~ 1e-7, <= 1e-6 per update, 9e-6 over
  # the 9 updates, inside atol=2e-5 and 500x below the lr step a wrong coordinate would take.
  tx = optax_memopt.badam_ratio(lr, update_ratio=ratio, switch_every=k, mask_mode=mode, min_size=100,
                                eps=1e-3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  grad_fn = jax.jit(jax.grad(loss_fn))
  ref = params
  selections = []
  for _ in range(3):
    index = jax.tree.map(np.asarray, state.index)
    selections.append(index)
    # Reference: a fresh Adam on the selected coordinates only (small leaves: all coordinates).
    adam = optax.adam(lr, eps=1e-3)

    def pick(tree, index=index):
      return jax.tree.map(
          lambda x, i: x.reshape(-1)[i] if i.size else x.reshape(-1), tree, index)

    ref_state = adam.init(pick(ref))
    for _ in range(k):
      u, state = update(grad_fn(params, X), state, params)
      nonzero = jax.tree.map(lambda u: int((u != 0).sum()), u)
      params = optax.apply_updates(params, u)
      g = pick(grad_fn(ref, X))
      ru, ref_state = adam.update(g, ref_state, pick(ref))
      ref = jax.tree.map(
          lambda x, i, r: (x.reshape(-1).at[i].add(r) if i.size else x.reshape(-1) + r).reshape(x.shape),
          ref, index, ru)
      chex.assert_trees_all_close(params, ref, rtol=1e-5, atol=2e-5)
    n_w1 = math.ceil(ratio * 16 * 24)
    assert nonzero["w1"] <= n_w1 and nonzero["b"] <= 24
  # The selection moves on at each switch.
  assert not np.array_equal(selections[0]["w1"], selections[1]["w1"])
  if mode == "adjacent":
    n = math.ceil(ratio * 16 * 24)
    np.testing.assert_array_equal(selections[1]["w1"], (np.arange(n) + n) % (16 * 24))
  else:
    assert len(set(selections[0]["w1"].tolist())) == len(selections[0]["w1"])  # no repeats


def test_state_bytes_scale_with_ratio():
  params = {"w": jnp.zeros((256, 512)), "norm": jnp.ones((64,))}
  for ratio in (0.05, 0.1):
    state = optax_memopt.badam_ratio(1e-3, update_ratio=ratio).init(params)
    n = math.ceil(ratio * 256 * 512)
    assert state.mu["w"].shape == (n,) and state.nu["w"].shape == (n,)
    assert state.index["w"].shape == (n,)
    assert state.mu["norm"].shape == (64,)  # small leaf: whole
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    adam = sum(x.nbytes for x in jax.tree_util.tree_leaves(optax.adam(1e-3).init(params)))
    # moments + indices: 3 * ratio of one float32 copy, against Adam's 2.
    assert total <= 3 * ratio * 256 * 512 * 4 + 2 * 64 * 4 + 64
    assert total < adam * 2 * ratio


def test_bf16_master_copy_of_selected_entries():
  params = make_params(jnp.bfloat16)
  tx = optax_memopt.badam_ratio(1e-3, update_ratio=0.2, switch_every=4)
  state = tx.init(params)
  assert state.master["w1"].dtype == jnp.float32
  assert state.master["w1"].shape == state.index["w1"].shape
  u, state = jax.jit(tx.update)(jax.grad(loss_fn)(params, X), state, params)
  chex.assert_trees_all_equal_dtypes(u, params)


def test_no_recompilation_and_resume_fields():
  params = make_params()
  tx = optax_memopt.badam_ratio(1e-2, switch_every=2, mask_mode="scatter")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    u, state = tx.update(jax.grad(loss_fn)(params, X), state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for _ in range(7):
    params, state = step(params, state)
  assert int(state.count) == 7 and int(state.active_block) == 3
  assert int(optax_memopt.active_block(optax.chain(optax.identity()).init(params) + (state,))) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"update_ratio": 0.0}, "update_ratio"),
        ({"update_ratio": 1.5}, "update_ratio"),
        ({"mask_mode": "random"}, "mask_mode"),
        ({"switch_every": 0}, "switch_every"),
    ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_memopt.badam_ratio(1e-3, **kwargs)


def test_integer_params_rejected():
  with pytest.raises(TypeError, match="'step'"):
    optax_memopt.badam_ratio(1e-3).init({"w": jnp.ones((4, 4)), "step": jnp.zeros((), jnp.int32)})
