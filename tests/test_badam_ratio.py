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


def whole(index):
  """A leaf trained whole has no index array."""
  return isinstance(index, optax.MaskedNode)


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
          lambda x, i: x.reshape(-1) if whole(i) else x.reshape(-1)[i], tree, index)

    ref_state = adam.init(pick(ref))
    for _ in range(k):
      u, state = update(grad_fn(params, X), state, params)
      nonzero = jax.tree.map(lambda u: int((u != 0).sum()), u)
      params = optax.apply_updates(params, u)
      g = pick(grad_fn(ref, X))
      ru, ref_state = adam.update(g, ref_state, pick(ref))
      ref = jax.tree.map(
          lambda x, i, r: (x.reshape(-1) + r if whole(i) else x.reshape(-1).at[i].add(r)).reshape(
              x.shape),
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


def test_scatter_selection_memory_is_of_the_selection():
  # A 2048 x 2048 float32 leaf (16 MB) at ratio 0.1: drawing the selection used to build a full
  # permutation of the leaf (84 MB of temporaries). Now the temporaries scale with the selection.
  from optax_memopt._badam_ratio import _selection

  size = 2048 * 2048
  n = math.ceil(0.1 * size)
  key = jax.random.key_data(jax.random.key(0)).astype(jnp.uint32)
  select = jax.jit(lambda key, period: _selection("scatter", size, n, key, 0, period))
  memory = select.lower(key, jnp.int32(1)).compile().memory_analysis()
  print("scatter selection temp bytes", memory.temp_size_in_bytes, "index bytes", 4 * n)
  assert memory.temp_size_in_bytes <= 4 * (4 * n)  # a few index-sized buffers (sort, walk)
  assert memory.temp_size_in_bytes < size * 4 / 4  # well below the parameter's 16 MB
  index = np.asarray(select(key, jnp.int32(1)))
  assert len(np.unique(index)) == n and index.min() >= 0 and index.max() < size
  assert not np.array_equal(index, np.asarray(select(key, jnp.int32(2))))
  # Spread over the leaf, not a run: each quarter of the leaf gets about a quarter of the entries.
  quarters = np.bincount(index * 4 // size, minlength=4) / n
  np.testing.assert_allclose(quarters, 0.25, atol=0.01)


def test_scatter_selection_marginals_are_uniform():
  from optax_memopt._badam_ratio import _selection

  key = jax.random.key_data(jax.random.key(3)).astype(jnp.uint32)
  draw = jax.jit(lambda period: _selection("scatter", 50, 10, key, 0, period))
  counts = np.zeros(50)
  for period in range(1000):
    counts[np.asarray(draw(jnp.int32(period)))] += 1
  # Each entry is chosen with probability 0.2: binomial(1000, 0.2), mean 200, sd 12.6; the bound
  # is about 5 sd, far outside what 50 such counts reach by chance.
  assert np.all(np.abs(counts - 200) < 65), counts


@pytest.mark.parametrize("period", [163, 164, 200, 2**31 - 1])
def test_adjacent_start_does_not_overflow(period):
  # A 32000 x 4096 leaf at ratio 0.1: period * n passed 2**31 from period 164 on.
  from optax_memopt._badam_ratio import _selection

  size = 32000 * 4096
  n = math.ceil(0.1 * size)
  key = jnp.zeros((2,), jnp.uint32)
  # Only the first entries are computed (XLA slices the iota), so the leaf is never allocated.
  first = jax.jit(lambda p: _selection("adjacent", size, n, key, 0, p)[:3])(jnp.int32(period))
  start = (period * n) % size
  np.testing.assert_array_equal(first, [(start + i) % size for i in range(3)])


def test_params_changed_between_init_and_update_name_the_leaf():
  params = make_params()
  tx = optax_memopt.badam_ratio(1e-2, update_ratio=0.1)
  state = tx.init(params)
  grown = dict(params, extra=jnp.ones((3,)))
  with pytest.raises(ValueError, match="params have 'extra'"):
    tx.update(grown, state, grown)
  wider = dict(params, w1=jnp.ones((16, 25)))
  with pytest.raises(ValueError, match="'w1' .*changed shape"):
    tx.update(wider, state, wider)
  with pytest.raises(ValueError, match="params have 'out', which grads have not"):
    tx.update({k: v for k, v in params.items() if k != "out"}, state, params)


def _layer_list_and_stack(n_layers=4, d=16, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(7), n_layers)
  layers = [{"w": jax.random.normal(k, (d, d)).astype(dtype) / 4, "scale": jnp.ones((d,), dtype)}
            for k in keys]
  listed = {"layers": layers, "head": jnp.ones((d, 3), dtype) / 3}
  stacked = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers), "head": listed["head"]}
  return listed, stacked


@pytest.mark.parametrize("mode", ["adjacent", "scatter"])
def test_stacked_layers_train_like_a_list_of_layers(mode):
  # A stack [L, ...] is L leaves: each layer trains n = ceil(r * d * d) entries of its own kernel
  # and its norm scale [d] whole and without weight decay, as in the list form (before: the stack's
  # first layer took every selected entry, [4 * n, 0, 0, 0], and the norm scales were decayed).
  listed, stacked = _layer_list_and_stack()
  kw = dict(update_ratio=0.05, switch_every=3, mask_mode=mode, weight_decay=0.1, min_size=100)
  tx = optax_memopt.badam_ratio(1e-2, **kw)
  grads_l = jax.tree.map(lambda x: jnp.cos(3 * x) + 0.5, listed)
  grads_s = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *grads_l["layers"]),
             "head": grads_l["head"]}
  state_l, state_s = tx.init(listed), tx.init(stacked)
  assert state_s.mu["layers"]["w"].shape == (4, math.ceil(0.05 * 256))
  upd = jax.jit(tx.update)
  for _ in range(4):  # two selection periods
    u_l, state_l = upd(grads_l, state_l, listed)
    u_s, state_s = upd(grads_s, state_s, stacked)
    listed, stacked = optax.apply_updates(listed, u_l), optax.apply_updates(stacked, u_s)
    per_layer = np.asarray((u_s["layers"]["w"] != 0).sum(axis=(1, 2)))
    np.testing.assert_array_equal(per_layer, [math.ceil(0.05 * 256)] * 4)
    # Norm scales: Adam's step only (grad cos(3x) + 0.5 > 0 at x = 1 gives a negative update).
    np.testing.assert_array_equal(u_s["layers"]["scale"] != 0, True)
    if mode == "adjacent":  # deterministic selection: the same numbers as the list form
      for l in range(4):
        for name in ("w", "scale"):
          np.testing.assert_allclose(u_s["layers"][name][l], u_l["layers"][l][name],
                                     rtol=1e-6, atol=1e-9)
  if mode == "adjacent":
    for name in ("w", "scale"):
      np.testing.assert_allclose(
          stacked["layers"][name], np.stack([x[name] for x in listed["layers"]]), rtol=1e-6)
  # Without weight decay on the norm scales, their update does not depend on their value.
  zero_g = jax.tree.map(jnp.zeros_like, grads_s)
  u, _ = tx.update(zero_g, tx.init(stacked), stacked)
  np.testing.assert_array_equal(u["layers"]["scale"], 0.0)


def test_stacks_argument_turns_recognition_off_or_names_the_stack():
  _, stacked = _layer_list_and_stack()
  whole_tensors = optax_memopt.badam_ratio(1e-2, update_ratio=0.05, stacks=())
  assert whole_tensors.init(stacked).mu["layers"]["w"].shape == (math.ceil(0.05 * 4 * 256),)
  named = optax_memopt.badam_ratio(1e-2, update_ratio=0.05, stacks="layers")
  assert named.init(stacked).mu["layers"]["w"].shape == (4, math.ceil(0.05 * 256))


def test_inject_hyperparams_error_names_every_shape_deciding_option():
  """``min_size`` is numeric, so ``inject_hyperparams`` injects it too unless it is static: the
  error names it beside ``update_ratio`` and ``switch_every``."""
  params = {"w": jnp.ones((8, 8))}
  tx = optax.inject_hyperparams(optax_memopt.badam_ratio, static_args=("update_ratio", "switch_every"))(
      learning_rate=1e-2, update_ratio=0.1, switch_every=5)
  with pytest.raises(TypeError, match="min_size") as err:
    tx.init(params)
  assert "static_args=('update_ratio', 'switch_every', 'min_size')" in str(err.value)
