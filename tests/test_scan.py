"""Tests of scan_layers: lax.scan's values and gradients, and the block step's one-layer backward."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from optax_memopt import _scan
from tests import _models

N_LAYERS, WIDTH, VOCAB = 4, 16, 12


def make_params(n=N_LAYERS, seed=0):
  keys = iter(jax.random.split(jax.random.key(seed), 5))
  normal = lambda shape: jax.random.normal(next(keys), shape) / np.sqrt(shape[-2])
  return {
      "embed": normal((VOCAB, WIDTH)),
      "layers": {"up": normal((n, WIDTH, 2 * WIDTH)), "down": normal((n, 2 * WIDTH, WIDTH)),
                 "scale": 1.0 + 0.1 * normal((n, 1, WIDTH))[:, 0]},
      "head": normal((WIDTH, VOCAB)),
  }


def layer_fn(layer, h, mask, temperature):
  out = jnp.tanh(h @ layer["up"] / temperature) @ layer["down"] * layer["scale"]
  return h + jnp.where(mask[..., None], out, 0.0)


TOKENS = (jnp.arange(3 * 8).reshape(3, 8) * 5) % VOCAB
MASK = jnp.arange(8)[None, :] < jnp.array([[8], [6], [3]])  # bool, shared by every layer


def make_loss(scan):
  def loss_fn(params, tokens, temperature=1.0):
    h = params["embed"][tokens]
    h = scan(layer_fn, params["layers"], h, MASK, jnp.float32(temperature))
    logits = h @ params["head"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(tokens, -1, axis=-1)[..., None], -1)[..., 0])

  return loss_fn


def lax_scan(fn, layers, carry, *shared):
  return jax.lax.scan(lambda c, layer: (fn(layer, c, *shared), None), carry, layers)[0]


ours, ref = make_loss(optax_memopt.scan_layers), make_loss(lax_scan)


def assert_close(got, want):
  """Equal to float32 rounding, relative to each leaf's scale.

  Both run the same per-layer operations; the backward passes group the per-layer pullbacks
  differently, so XLA fuses and reassociates sums differently (and differently on different CPUs).
  A gradient entry is a sum of many terms of the leaf's magnitude that may cancel, so its rounding
  error scales with the leaf's largest entry, not its own: measured up to 5e-7 of the leaf's max;
  the bound is 1e-5 of it, still 1000x below what a wrong layer or a missing term would change.
  """
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    scale = float(jnp.max(jnp.abs(w))) or 1.0
    assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * scale, (float(jnp.max(jnp.abs(g - w))), scale)


@pytest.mark.parametrize("remat", [False, True])
def test_values_and_gradients_equal_lax_scan(remat):
  params = make_params()
  fn = jax.checkpoint(layer_fn) if remat else layer_fn

  def loss(scan):
    def f(params, temperature):
      h = params["embed"][TOKENS]
      h = scan(fn, params["layers"], h, MASK, temperature)
      return jnp.sum((h @ params["head"]) ** 2)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  (v1, g1), (v2, g2) = (loss(s)(params, jnp.float32(1.3)) for s in (optax_memopt.scan_layers,
                                                                     lax_scan))
  assert_close((v1, g1), (v2, g2))
  assert float(jnp.abs(g1[1])) > 0  # the shared argument's gradient is summed over the layers


def test_gradient_of_the_carry_only_and_of_a_frozen_stack():
  params = make_params()
  x = params["embed"][TOKENS]
  f = lambda s: lambda layers, x: jnp.sum(s(layer_fn, layers, x, MASK, 1.0) ** 2)
  assert_close(jax.grad(f(optax_memopt.scan_layers), 1)(params["layers"], x),
               jax.grad(f(lax_scan), 1)(params["layers"], x))
  assert_close(jax.grad(f(optax_memopt.scan_layers))(params["layers"], x),
               jax.grad(f(lax_scan))(params["layers"], x))


@pytest.mark.parametrize("with_embedding", [False, True])
def test_active_layer_gradient_is_that_layers_slice(with_embedding):
  """Marked as the block step marks it, every layer k's gradient is the full gradient's slice k
  (and, when the embedding below the stack is differentiated too, its gradient is the full one)."""
  params = make_params()
  full = jax.grad(ref)(params, TOKENS)
  names = list(params["layers"])
  for k in range(N_LAYERS):
    def loss(active, embed, k=k):
      index = jnp.int32(k)
      marked = {n: _scan.mark_active(params["layers"][n], active[n], index) for n in names}
      entries = {id(marked[n]): _scan._Active(active[n], index) for n in names}
      with _scan.active_slices(entries):
        value = ours({**params, "layers": marked, "embed": embed}, TOKENS)
      assert all(e.used for e in entries.values())
      return value

    active = {n: params["layers"][n][k] for n in names}
    if with_embedding:
      g_active, g_embed = jax.jit(jax.grad(loss, argnums=(0, 1)))(active, params["embed"])
      assert_close(g_embed, full["embed"])
    else:
      g_active = jax.jit(jax.grad(loss))(active, jax.lax.stop_gradient(params["embed"]))
    assert_close(g_active, {n: full["layers"][n][k] for n in names})


def run_drop_in(tx, params, loss, steps):
  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params, TOKENS)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


@pytest.mark.parametrize("scan", ["scan_layers", "lax.scan"])
def test_block_step_compiles_once_and_equals_drop_in(scan):
  """Two block-epochs over 4 layer blocks: one trace, the drop-in's parameters; through lax.scan the
  result is the same with a warning that the whole stack was differentiated."""
  params = make_params()
  loss = ours if scan == "scan_layers" else ref
  # eps=1e-3: a float32 rounding difference dg in a gradient moves Adam's step by at most
  # lr * dg / eps = 1e-2 * 1e-7 / 1e-3 = 1e-6 per update, <= 8e-6 over these 8 updates.
  tx = optax_memopt.badam(1e-2, switch_every=1, switch_mode="ascending", eps=1e-3)
  labels = optax_memopt.block_labels(params)
  assert [np.asarray(labels["layers"][n]).tolist() for n in ("up", "down", "scale")] == [
      [0, 1, 2, 3]] * 3 and labels["embed"] == labels["head"] == -1
  want = run_drop_in(tx, params, loss, 2 * N_LAYERS)
  step = optax_memopt.make_block_step(loss, tx, donate=False)
  state = tx.init(params)
  got = params
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2 * N_LAYERS):
      got, state, _ = step(got, state, TOKENS)
  assert step.trace_count == 1
  assert sorted(step.compiled_blocks) == [0, 1, 2, 3]
  messages = [str(w.message) for w in caught if "scan_layers" in str(w.message)]
  assert bool(messages) == (scan == "lax.scan")
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  # Every layer moved, embedding and head did not.
  for name in params["layers"]:
    moved = jnp.max(jnp.abs(got["layers"][name] - params["layers"][name]),
                    axis=tuple(range(1, params["layers"][name].ndim)))
    assert bool(jnp.all(moved > 1e-3)), name
  chex.assert_trees_all_equal((got["embed"], got["head"]), (params["embed"], params["head"]))


def test_restored_state_mid_period_trains_the_block_it_names():
  """A state from elsewhere (here: a fresh init) passed to the cached stack step trains its own
  active block, not the one the previous call trained."""
  params = make_params()
  tx = optax_memopt.badam(1e-2, switch_every=3, switch_mode="ascending", eps=1e-3)
  step = optax_memopt.make_block_step(ours, tx, donate=False)
  state = tx.init(params)
  p = params
  for _ in range(4):  # now in block 1's period
    p, state, _ = step(p, state, TOKENS)
  assert int(optax_memopt.active_block(state)) == 1
  fresh = tx.init(p)
  after, _, _ = step(p, fresh, TOKENS)
  moved = [bool(jnp.any(after["layers"]["up"][i] != p["layers"]["up"][i])) for i in range(4)]
  assert moved == [True, False, False, False]


def test_errors():
  params = make_params()
  with pytest.raises(ValueError, match="leading"):
    optax_memopt.scan_layers(layer_fn, {"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))},
                             jnp.ones(2), MASK, 1.0)
  with pytest.raises(TypeError, match="structure"):
    optax_memopt.scan_layers(lambda layer, h: (h, h), params["layers"], jnp.ones((2, WIDTH)))
  with pytest.raises(TypeError, match="callable"):
    optax_memopt.scan_layers(None, params["layers"], jnp.ones((2, WIDTH)))


def test_a_stacked_leaf_used_outside_the_scan_too_gets_both_contributions():
  """The block step's mark is a real array: a use of the stacked leaf outside scan_layers (here a
  penalty on every layer's scale) adds its gradient for the active layer to the scan's."""
  params = make_params()

  def loss(params, tokens):
    return ours(params, tokens) + jnp.sum(params["layers"]["scale"] ** 2)

  tx = optax_memopt.badam(1e-2, switch_every=1, switch_mode="ascending", eps=1e-3)
  want = run_drop_in(tx, params, loss, N_LAYERS)
  step = optax_memopt.make_block_step(loss, tx, donate=False)
  got, state = params, tx.init(params)
  for _ in range(N_LAYERS):
    got, state, _ = step(got, state, TOKENS)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)  # eps=1e-3: see above


# Arrays computed from the stacked weights before the scan (issue 19, item 1): each entry maps the
# stacked layers to the tree handed to scan_layers.
DERIVED = {
    "tied_transpose": lambda s: {**s, "down": jnp.swapaxes(s["up"], 1, 2)},
    "softplus_scale": lambda s: {**s, "scale": jax.nn.softplus(s["scale"])},
    "soft_mask": lambda s: {**s, "down": s["down"] * jax.nn.sigmoid(s["scale"])[:, None, :]},
    "fused": lambda s: {**s, "up": jnp.concatenate([s["up"][..., :WIDTH], s["up"][..., WIDTH:]], -1)},
}


@pytest.mark.parametrize("derive", list(DERIVED))
def test_block_step_with_derived_stacked_leaves_equals_drop_in(derive):
  """A stacked leaf computed from the stacked weights before the scan (a tied transpose, a
  softplus, a mask, a fused matrix) gets jax.grad's gradient in the block step, with a warning
  naming it; before, the active layer's gradient was off or zero."""
  params = make_params()

  def loss(params, tokens):
    h = params["embed"][tokens]
    h = optax_memopt.scan_layers(layer_fn, DERIVED[derive](params["layers"]), h, MASK, 1.0)
    logits = h @ params["head"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(tokens, -1, axis=-1)[..., None], -1)[..., 0])

  # eps=1e-3: see test_block_step_compiles_once_and_equals_drop_in.
  tx = optax_memopt.badam(1e-2, switch_every=1, switch_mode="ascending", eps=1e-3)
  want = run_drop_in(tx, params, loss, N_LAYERS)
  step = optax_memopt.make_block_step(loss, tx, donate=False)
  got, state = params, tx.init(params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(N_LAYERS):
      got, state, _ = step(got, state, TOKENS)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  assert any("computed from the block step's layer weights" in str(w.message) for w in caught)


def dropout_layer(layer, h, *, state):
  """A layer with dropout whose RNG state (a key and a count per layer) it advances."""
  key, count = state
  keep = jax.random.bernoulli(jax.random.fold_in(key, count), 0.7, h.shape)
  out = jnp.tanh(h @ layer["up"]) @ layer["down"] * layer["scale"]
  return h + jnp.where(keep, out / 0.7, 0.0), (key, count + 1)


def dropout_params():
  params = make_params()
  rng = (jax.random.split(jax.random.key(7), N_LAYERS), jnp.zeros(N_LAYERS, jnp.uint32))
  return params, rng


def dropout_loss(scan):
  def loss(params, rng, tokens):
    h, rng = scan(params["layers"], params["embed"][tokens], rng)
    return jnp.sum(jnp.tanh(h @ params["head"]) ** 2) / tokens.size, rng
  return loss


def ours_with_state(layers, h, rng):
  return optax_memopt.scan_layers(dropout_layer, layers, h, state=rng)


def lax_with_state(layers, h, rng):
  def body(c, xs):
    layer, st = xs
    return dropout_layer(layer, c, state=st)
  return jax.lax.scan(body, h, (layers, rng))


def test_per_layer_state_values_and_gradients_equal_lax_scan():
  params, rng = dropout_params()
  (v1, new1), g1 = jax.jit(jax.value_and_grad(dropout_loss(ours_with_state), has_aux=True))(
      params, rng, TOKENS)
  (v2, new2), g2 = jax.jit(jax.value_and_grad(dropout_loss(lax_with_state), has_aux=True))(
      params, rng, TOKENS)
  assert_close((v1, g1), (v2, g2))
  assert new1[1].tolist() == new2[1].tolist() == [1] * N_LAYERS
  chex.assert_trees_all_equal(jax.random.key_data(new1[0]), jax.random.key_data(rng[0]))


def test_block_step_with_dropout_state_equals_drop_in_and_advances_it():
  """The block step recomputes the layers in its backward pass: with the same per-layer RNG state
  it must draw the same dropout masks as the drop-in path."""
  params, rng = dropout_params()
  tx = optax_memopt.badam(1e-2, switch_every=1, switch_mode="ascending", eps=1e-3)
  loss = dropout_loss(ours_with_state)

  @jax.jit
  def drop_in(params, state, r):
    grads, r = jax.grad(loss, has_aux=True)(params, r, TOKENS)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, r

  want, state, r = params, tx.init(params), rng
  for _ in range(N_LAYERS):
    want, state, r = drop_in(want, state, r)
  step = optax_memopt.make_block_step(loss, tx, has_aux=True, donate=False)
  got, state, r = params, tx.init(params), rng
  for _ in range(N_LAYERS):
    got, state, (_, r) = step(got, state, r, TOKENS)
  assert r[1].tolist() == [N_LAYERS] * N_LAYERS
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)  # eps=1e-3: see above


def test_nnx_dropout_state_comes_back_as_nnx_scan_returns_it():
  """The README's NNX pattern (examples/models/base.py, apply_layers): dropout inside the scanned
  stack draws a new mask every call (with fixed parameters the output changes) and advances each
  layer's RNG count, exactly as nnx.scan does."""
  from flax import nnx

  from examples.models import base

  def make():
    return base.make_layers(lambda r: _models.DropoutLayer(WIDTH, r), N_LAYERS,
                            nnx.Rngs(0, dropout=1), scan=True)

  ours_layers, ref_layers = make(), make()

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def nnx_scan(layer, x):
    return layer(x)

  x = jnp.ones((2, 3, WIDTH))
  outs = []
  for remat in (False, True, False):
    y = base.apply_layers(ours_layers, x, scan=True, remat=remat)
    chex.assert_trees_all_close(y, nnx_scan(ref_layers, x), rtol=1e-6, atol=1e-6)
    outs.append(y)
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
  counts = nnx.state(ours_layers, nnx.RngCount)["dropout"]["rngs"]["count"][...]
  assert counts.tolist() == [3] * N_LAYERS


def test_per_layer_state_errors():
  params, rng = dropout_params()
  h = jnp.ones((2, WIDTH))
  with pytest.raises(TypeError, match=r"pair \(carry, state\)"):
    optax_memopt.scan_layers(lambda p, h, state: h, params["layers"], h, state=rng)
  with pytest.raises(TypeError, match="layer state of the structure"):
    optax_memopt.scan_layers(lambda p, h, state: (h, state[0]), params["layers"], h, state=rng)
  with pytest.raises(ValueError, match="leading"):
    optax_memopt.scan_layers(dropout_layer, params["layers"], h, state=(rng[0][:2], rng[1][:2]))


def mlp_layer(layer, h):
  return h + jnp.tanh(h @ layer["up"]) @ layer["down"] * layer["scale"]


def test_block_step_activation_memory_at_most_the_list_forms_bottom_block():
  """XLA's temporaries (compile-time accounting, the same on every machine) of the scanned block
  step, for every layer block: at most those of the same model as a list of layers for its bottom
  block (backpropagation through every layer), and below the drop-in path's. Before, the scanned
  step kept every layer's residuals whatever the active layer, more than the drop-in."""
  params = make_params(seed=1)
  tokens = jnp.arange(16 * 64).reshape(16, 64) % VOCAB
  as_list = {**params, "layers": [jax.tree.map(lambda x, i=i: x[i], params["layers"])
                                  for i in range(N_LAYERS)]}

  def head_loss(params, h, tokens):
    logits = h @ params["head"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tokens[..., None], -1)[..., 0])

  def scanned_loss(params, tokens):
    h = optax_memopt.scan_layers(mlp_layer, params["layers"], params["embed"][tokens])
    return head_loss(params, h, tokens)

  def list_loss(params, tokens):
    h = params["embed"][tokens]
    for layer in params["layers"]:
      h = mlp_layer(layer, h)
    return head_loss(params, h, tokens)

  tx = optax_memopt.badam(1e-2, switch_every=1)

  def temps(lowered):
    return lowered.compile().memory_analysis().temp_size_in_bytes

  scanned = optax_memopt.make_block_step(scanned_loss, tx)
  listed = optax_memopt.make_block_step(list_loss, tx)

  @jax.jit
  def drop_in(params, state, tokens):
    updates, state = tx.update(jax.grad(scanned_loss)(params, tokens), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  bottom = temps(listed.lower(0, as_list, tx.init(as_list), tokens))
  drop = temps(drop_in.lower(params, state, tokens))
  per_block = [temps(scanned.lower(k, params, state, tokens)) for k in range(N_LAYERS)]
  assert max(per_block) <= bottom < drop, (per_block, bottom, drop)


def test_layerwise_step_with_dropout_state_equals_the_ordinary_step():
  params, rng = dropout_params()
  tx = optax.adam(1e-2, eps=1e-3)  # eps=1e-3: see test_block_step_compiles_once_and_equals_drop_in
  loss = dropout_loss(ours_with_state)

  @jax.jit
  def ordinary(params, state, r):
    grads, r = jax.grad(loss, has_aux=True)(params, r, TOKENS)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, r

  want, state, r = params, tx.init(params), rng
  for _ in range(3):
    want, state, r = ordinary(want, state, r)
  step = optax_memopt.make_layerwise_step(loss, tx, has_aux=True, donate=False)
  got, state, r = params, tx.init(params), rng
  for _ in range(3):
    got, state, (_, r) = step(got, state, r, TOKENS)
  assert r[1].tolist() == [3] * N_LAYERS
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
