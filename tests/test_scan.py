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
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.grad(loss)(params, TOKENS)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
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
