"""Tests of make_block_step: same results as the drop-in path, and XLA's proof of the saving."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from tests import _models

N_LAYERS, WIDTH, VOCAB = 6, 32, 16

# Comparing the block step with the drop-in path. The block step differentiates only the active
# block, the drop-in path the whole model, so XLA reduces the gradients in different orders, and which
# order depends on the CPU's vector width (measured on an AMD EPYC: 1.5e-6 absolute, 4e-5 relative after
# 5 updates at eps=1e-4). Adam turns a gradient rounding error dg into a step error of at most
# lr * dg / eps, so the comparisons use EPS=1e-3: at lr=1e-2 and |dg| <~ 1e-7 that is <= 1e-6 per update,
# <= 2.4e-5 over the longest run (24 updates). ATOL leaves 4x headroom above that and is still 100x
# below the ~lr = 1e-2 that one update of a wrong block or a wrong gradient moves a parameter by.
EPS = 1e-3
ATOL = RTOL = 1e-4


def make_params(n_layers=N_LAYERS, width=WIDTH, seed=0):
  return _models.mlp_params(n_layers, width, VOCAB, seed=seed)


def make_loss(remat=False):
  layer_fn = jax.checkpoint(_models.mlp_layer) if remat else _models.mlp_layer

  def loss_fn(params, tokens):
    h = params["embed"][tokens]
    for layer in params["layers"]:
      h = layer_fn(layer, h)
    logits = h @ params["head"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(tokens, -1, axis=-1)[..., None], -1)[..., 0])

  return loss_fn


loss_fn = make_loss()
TOKENS = (jnp.arange(4 * 8).reshape(4, 8) * 7) % VOCAB


def drop_in(tx, params, steps, loss=loss_fn, tokens=TOKENS, active_only=False):
  state = tx.init(params)
  labels = optax_memopt.block_labels(params)

  @jax.jit
  def train_step(params, state):
    grads = jax.grad(loss)(params, tokens)
    if active_only:  # what any stage before BAdam sees in the block step
      active = optax_memopt.active_block(state)
      grads = jax.tree.map(lambda g, lab: jnp.where(lab == active, g, 0.0), grads, labels)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = train_step(params, state)
  return params, state


@pytest.mark.parametrize("mode", ["random", "ascending", "descending", "fixed"])
def test_same_parameters_as_drop_in(mode):
  k = 2
  tx = optax_memopt.badam(1e-2, switch_every=k, switch_mode=mode, start_block=1, weight_decay=0.01,
                          eps=EPS)
  params = make_params()
  steps = 2 * N_LAYERS * k
  want, want_state = drop_in(tx, params, steps)

  step = optax_memopt.make_block_step(loss_fn, tx)
  p, s = make_params(), tx.init(params)
  losses = []
  for _ in range(steps):
    p, s, loss = step(p, s, TOKENS)
    losses.append(float(loss))
  chex.assert_trees_all_close(p, want, rtol=RTOL, atol=ATOL)
  assert int(s.count) == steps and int(s.active_block) == int(want_state.active_block)
  # At most one compilation per block, none after the first block-epoch.
  expected_blocks = 1 if mode == "fixed" else N_LAYERS
  assert len(step.compiled_blocks) == expected_blocks
  assert step.trace_count == expected_blocks
  assert losses[-1] < losses[0]


def test_chain_clip_multisteps_and_aux():
  inner = optax.chain(optax.clip_by_global_norm(0.5),
                      optax_memopt.badam(1e-2, switch_every=2, switch_mode="ascending", eps=EPS))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params = make_params()
  # The clip sees the active block's gradient only (documented), so the reference masks the rest.
  want, _ = drop_in(tx, params, 10, active_only=True)
  unmasked, _ = drop_in(tx, params, 10)
  # ... and that makes a difference this test can see: well beyond the tolerance used below.
  gap = float(jnp.max(jnp.abs(unmasked["layers"][0]["up"] - want["layers"][0]["up"])))
  assert gap > 10 * ATOL, gap

  def loss_with_aux(params, tokens):
    loss = loss_fn(params, tokens)
    return loss, {"twice": 2 * loss}

  step = optax_memopt.make_block_step(loss_with_aux, tx, has_aux=True, donate=False)
  p, s = params, tx.init(params)
  for _ in range(10):
    p, s, (loss, aux) = step(p, s, TOKENS)
    np.testing.assert_allclose(aux["twice"], 2 * loss, rtol=1e-6)
  chex.assert_trees_all_close(p, want, rtol=RTOL, atol=ATOL)
  # 10 mini-steps = 5 optimizer steps with K=2: blocks 0, 1 and 2 were active.
  assert sorted(step.compiled_blocks) == [0, 1, 2]


@pytest.mark.parametrize("donate", [True, False])
def test_trains_the_block_the_given_state_says(donate, monkeypatch):
  # A state other than the one the previous call returned (a fresh init, a restored checkpoint)
  # mid-period: the step must train the block that state says, not the block cached on the host.
  k = 4
  tx = optax_memopt.badam(1e-2, switch_every=k, switch_mode="ascending", eps=1e-4)
  params = make_params()
  step = optax_memopt.make_block_step(loss_fn, tx, donate=donate)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  # A state saved at step 2 * k + 1 (block 2, one step into its period).
  _, saved = drop_in(tx, params, 2 * k + 1)
  saved = jax.tree.map(np.asarray, saved)
  p, s = copy(params), tx.init(params)
  for _ in range(2):  # block 0, two of its k steps done: the host expects block 0 twice more
    p, s, _ = step(p, s, TOKENS)
  for want_block, state in [(2, saved), (0, tx.init(params)), (2, saved)]:
    before = jax.tree.map(np.asarray, p)
    p, s, _ = step(p, jax.tree.map(jnp.asarray, state), TOKENS)
    changed = [not np.array_equal(before["layers"][b]["up"], p["layers"][b]["up"])
               for b in range(N_LAYERS)]
    assert changed == [b == want_block for b in range(N_LAYERS)], (want_block, changed)
    assert int(s.active_block) == want_block
  # The common loop (state returned, passed back) reads the device once per block switch only:
  # two more steps of block 2, then one read for block 3.
  reads = []
  device_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or device_get(x))
  for _ in range(k):
    p, s, _ = step(p, s, TOKENS)
  assert len(reads) == 1
  assert int(s.count) == 2 * k + 1 + 1 + k and int(s.active_block) == 3


def test_inject_hyperparams_and_kwargs():
  tx = optax.inject_hyperparams(optax_memopt.badam, static_args=("switch_every", "switch_mode"))(
      learning_rate=1e-2, switch_every=3, switch_mode="descending", eps=EPS)
  params = make_params()
  want, _ = drop_in(tx, params, 7)
  step = optax_memopt.make_block_step(lambda p, tokens: loss_fn(p, tokens), tx)
  p, s = make_params(), tx.init(params)
  for _ in range(7):
    p, s, _ = step(p, s, tokens=TOKENS)
  chex.assert_trees_all_close(p, want, rtol=RTOL, atol=ATOL)


def test_nnx_split_merge():
  from flax import nnx

  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(8, 8, rngs=rngs)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([Layer(rngs) for _ in range(3)])

    def __call__(self, x):
      for layer in self.layers:
        x = jnp.tanh(layer.lin(x))
      return x

  model = Model(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax_memopt.badam(1e-2, switch_every=1, switch_mode="ascending")

  def nnx_loss(params, rest, x):
    return jnp.mean(nnx.merge(graphdef, params, rest)(x) ** 2)

  step = optax_memopt.make_block_step(nnx_loss, tx)
  opt_state = tx.init(params)
  x = jnp.ones((2, 8))
  before = float(nnx_loss(params, rest, x))
  for _ in range(6):
    params, opt_state, loss = step(params, opt_state, rest, x)
  nnx.update(model, params)
  assert float(jnp.mean(model(x) ** 2)) < before
  assert sorted(step.compiled_blocks) == [0, 1, 2]


def test_errors():
  params = make_params(2)
  step = optax_memopt.make_block_step(loss_fn, optax.adamw(1e-3))
  with pytest.raises(TypeError, match="badam / block_coordinate"):
    step(params, optax.adamw(1e-3).init(params), TOKENS)
  ratio = optax_memopt.badam_ratio(1e-3)
  with pytest.raises(TypeError, match="badam_ratio"):
    optax_memopt.make_block_step(loss_fn, ratio)(params, ratio.init(params), TOKENS)
  tx = optax_memopt.badam(1e-3)
  vector_loss = lambda p, t: jnp.sum(p["embed"][t] @ p["layers"][0]["up"], axis=-1)
  with pytest.raises(TypeError, match="scalar"):
    optax_memopt.make_block_step(vector_loss, tx)(params, tx.init(params), TOKENS)
  with pytest.raises(TypeError, match="callable"):
    optax_memopt.make_block_step("loss", tx)


# ----------------------------------------------------------------------------- XLA's account

FLOP_LAYERS, FLOP_WIDTH = 8, 128
FLOP_TOKENS = (jnp.arange(8 * 64).reshape(8, 64) * 5) % VOCAB


def compiled_costs(remat):
  loss = make_loss(remat)
  params = make_params(FLOP_LAYERS, FLOP_WIDTH)
  tx = optax_memopt.badam(1e-3)
  state = tx.init(params)

  def full_step(params, state, tokens):
    grads = jax.grad(loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  full = jax.jit(full_step, donate_argnums=(0, 1)).lower(params, state, FLOP_TOKENS).compile()
  step = optax_memopt.make_block_step(loss, tx)
  blocks = [step.lower(b, params, state, FLOP_TOKENS).compile() for b in range(FLOP_LAYERS)]
  return full, blocks, params


def flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_block_step_flops(remat):
  full, blocks, _ = compiled_costs(remat)
  ratios = [flops(b) / flops(full) for b in blocks]
  print(f"remat={remat} flops ratio last block {ratios[-1]:.3f} mean {np.mean(ratios):.3f}")
  assert ratios[-1] <= 0.45
  assert np.mean(ratios) <= 0.65
  # Deeper active blocks stop the backward pass earlier.
  assert ratios[-1] < ratios[0]


def test_block_step_gradient_memory():
  full, blocks, params = compiled_costs(False)
  layer_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params["layers"][0]))
  model_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  mem_full, mem_last = full.memory_analysis(), blocks[-1].memory_analysis()
  temp_full = mem_full.temp_size_in_bytes
  temp_block = mem_last.temp_size_in_bytes
  print(f"temp bytes: full {temp_full}, block {temp_block}; model {model_bytes}, layer {layer_bytes}")
  # The full step materialises a gradient for every layer; the block step only the active layer's.
  assert temp_full - temp_block >= (FLOP_LAYERS - 1) * layer_bytes * 0.9


# ----------------------------------------------------------------------------- messages


def _stacked_model(n_layers=3, width=8):
  keys = jax.random.split(jax.random.key(1), 2)
  params = {"embed": jax.random.normal(keys[0], (VOCAB, width)) / 4,
            "layers": {"w": jax.random.normal(keys[1], (n_layers, width, width)) / 4}}

  def layer(p, h):
    return h + jnp.tanh(h @ p["w"].astype(h.dtype))

  def loss(params, tokens):
    h = params["embed"][tokens]
    return jnp.mean(optax_memopt.scan_layers(layer, params["layers"], h) ** 2)

  return params, layer, loss


def test_a_checkpoint_restored_without_a_target_is_named(tmp_path):
  # Before: "its state has 0" BAdam stages. Orbax restores NamedTuples as dicts without a target.
  import orbax.checkpoint as ocp

  params, _, loss = _stacked_model()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax_memopt.badam(1e-2, switch_every=1))
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(0, args=ocp.args.StandardSave(tx.init(params)))
    mngr.wait_until_finished()
    restored = mngr.restore(0)
    step = optax_memopt.make_block_step(loss, tx)
    with pytest.raises(TypeError, match="plain dicts.*restored without a target.*StandardRestore"):
      step(params, restored, TOKENS % VOCAB)
    # The way out it names works.
    target = jax.eval_shape(tx.init, params)
    state = mngr.restore(0, args=ocp.args.StandardRestore(target))
  step(params, state, TOKENS % VOCAB)


def _warning_of(loss, params, tx):
  step = optax_memopt.make_block_step(loss, tx, donate=False)
  with pytest.warns(UserWarning) as record:
    step(params, tx.init(params), TOKENS)
  msgs = [w for w in record if "make_block_step" in str(w.message)]
  assert len(msgs) == 1
  return msgs[0]


def test_stack_cast_before_the_scan_is_named_and_the_warning_points_at_the_caller():
  # Before: "does not run through scan_layers" (it does), with the warning attributed to pjit.py.
  params, layer, _ = _stacked_model()

  def loss(params, tokens):
    h = params["embed"][tokens].astype(jnp.bfloat16)
    layers = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params["layers"])
    return jnp.mean(optax_memopt.scan_layers(layer, layers, h).astype(jnp.float32) ** 2)

  w = _warning_of(loss, params, optax_memopt.badam(1e-2, switch_every=1))
  assert "scan_layers ran" in str(w.message) and "cast before the scan (float32 -> bfloat16)" in str(
      w.message)
  assert w.filename == __file__


@pytest.mark.parametrize("wrap", [jax.jit, jax.checkpoint])
def test_nested_jit_or_checkpoint_around_the_scan_is_named(wrap):
  params, layer, _ = _stacked_model()

  @wrap
  def decoder(layers, h):
    return optax_memopt.scan_layers(layer, layers, h)

  def loss(params, tokens):
    return jnp.mean(decoder(params["layers"], params["embed"][tokens]) ** 2)

  w = _warning_of(loss, params, optax_memopt.badam(1e-2, switch_every=1))
  assert "scan_layers ran" in str(w.message) and "jax.jit or jax.checkpoint" in str(w.message)
  assert w.filename == __file__


def test_a_stack_without_scan_layers_still_says_so():
  params, layer, _ = _stacked_model()

  def loss(params, tokens):
    h, _ = jax.lax.scan(lambda h, p: (layer(p, h), None), params["embed"][tokens], params["layers"])
    return jnp.mean(h ** 2)

  w = _warning_of(loss, params, optax_memopt.badam(1e-2, switch_every=1))
  assert "does not run through optax_memopt.scan_layers" in str(w.message)
  assert w.filename == __file__


def test_donated_nnx_arrays_give_a_clear_error():
  # nnx.split shares the module's arrays; the donating step deletes them. Re-splitting the module
  # without nnx.update used to fail deep inside JAX ("Array has been deleted").
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
      for layer in self.layers:
        x = jnp.tanh(layer(x))
      return x

  model = Model(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax_memopt.badam(1e-2, switch_every=1)
  step = optax_memopt.make_block_step(
      lambda p, x: jnp.mean(nnx.merge(graphdef, p)(x) ** 2), tx)
  opt_state = tx.init(params)
  new_params, opt_state, _ = step(params, opt_state, jnp.ones((2, 4)))
  _, again = nnx.split(model, nnx.Param)  # the module's arrays were donated
  with pytest.raises(RuntimeError, match=r"parameter '.*' was deleted.*nnx.update\(model, params\)"):
    step(again, opt_state, jnp.ones((2, 4)))
  nnx.update(model, new_params)  # the way out
  _, again = nnx.split(model, nnx.Param)
  step(again, opt_state, jnp.ones((2, 4)))


def test_a_frozen_per_layer_array_in_the_layerwise_scan_is_named_with_the_way_out():
  # Before: refused naming only a shape. A frozen LoRA base scanned with the trained stack.
  params, _, _ = _stacked_model()
  base = jnp.ones_like(params["layers"]["w"])

  def layer(p, h):
    return h + jnp.tanh(h @ (p["w"] + p["base"]))

  def loss(params, tokens):
    layers = dict(params["layers"], base=base)
    return jnp.mean(optax_memopt.scan_layers(layer, layers, params["embed"][tokens]) ** 2)

  tx = optax.adam(1e-2)
  step = optax_memopt.make_layerwise_step(loss, tx, donate=False)
  with pytest.raises(ValueError, match=r"float leaf layers\['base'\] \(3, 8, 8\).*LoRA base.*"
                     r"state=\.\.\..*optax.set_to_zero"):
    step(params, tx.init(params), TOKENS)

  # The way out it names: the frozen array as per-layer state, returned unchanged.
  def layer_with_state(p, h, *, state):
    return h + jnp.tanh(h @ (p["w"] + state)), state

  def loss_with_state(params, tokens):
    h, _ = optax_memopt.scan_layers(layer_with_state, params["layers"], params["embed"][tokens],
                                    state=base)
    return jnp.mean(h ** 2)

  step = optax_memopt.make_layerwise_step(loss_with_state, tx, donate=False)
  new, _, _ = step(params, tx.init(params), TOKENS)
  assert not np.allclose(new["layers"]["w"], params["layers"]["w"])
