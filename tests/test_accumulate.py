"""Gradient accumulation over the active block: badam(accumulate_every=N) against optax.MultiSteps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from tests import _models

N_LAYERS, WIDTH, VOCAB, ACC = 4, 16, 12, 3

# Adam eps 1e-3 for every comparison between two computation paths: Adam turns a gradient rounding
# error dg into a step error of at most lr * dg / eps (see test_block_step.py), so at lr=1e-2 and the
# float32 rounding of a reassociated gradient (|dg| <~ 1e-7) a path differs by <= 1e-6 per update,
# <= 1e-5 over the longest run here (8 updates). ATOL leaves 10x headroom and is still 100x below
# the ~lr = 1e-2 that one update on a wrong gradient (a micro-batch missing, a window cut short)
# moves a parameter by.
EPS = 1e-3
ATOL = RTOL = 1e-4


def make_params(stacked, seed=0):
  return _models.mlp_params(N_LAYERS, WIDTH, VOCAB, stacked=stacked, seed=seed)


layer_fn = _models.mlp_layer


def loss_fn(params, tokens):
  h = params["embed"][tokens]
  if isinstance(params["layers"], dict):
    h = optax_memopt.scan_layers(layer_fn, params["layers"], h)
  else:
    for layer in params["layers"]:
      h = layer_fn(layer, h)
  logits = (h @ params["head"].astype(h.dtype)).astype(jnp.float32)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, jnp.roll(tokens, -1, axis=-1)[..., None], -1)[..., 0])


def micro_batches(n, size=2, seed=1):
  """``n`` micro-batches of ``size`` sequences, all different."""
  return [jax.random.randint(k, (size, 8), 0, VOCAB) for k in jax.random.split(jax.random.key(seed), n)]


def badam(lr=1e-2, **kw):
  return optax_memopt.badam(lr, **(dict(eps=EPS, switch_every=2) | kw))


def multisteps_run(params, batches, **kw):
  """The reference: optax.MultiSteps(badam) on full gradients (full-size accumulator)."""
  tx = optax.MultiSteps(badam(**kw), ACC)
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, tokens):
    updates, state = tx.update(jax.grad(loss_fn)(params, tokens), state, params)
    return optax.apply_updates(params, updates), state

  for tokens in batches:
    params, state = train_step(params, state, tokens)
  return params


def block_step_run(params, batches, step=None, state=None, **kw):
  tx = badam(accumulate_every=ACC, **kw)
  step = step or optax_memopt.make_block_step(loss_fn, tx, donate=False)
  state = tx.init(params) if state is None else state
  for tokens in batches:
    params, state, _ = step(params, state, tokens)
  return params, state, step


def assert_close(got, want, atol=ATOL, rtol=RTOL):
  chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), got),
                              jax.tree.map(lambda x: x.astype(jnp.float32), want), atol=atol, rtol=rtol)


def test_drop_in_update_equals_multisteps():
  """tx.update on full gradients: the same running mean in float32 as MultiSteps, the same AdamW
  step on it; only XLA's fusion of the two programs may differ, hence a few float32 ulps. The
  learning-rate schedule counts optimizer steps, as under MultiSteps."""
  params = make_params(stacked=False)
  batches = micro_batches(8 * ACC)
  lr = optax.linear_schedule(2e-2, 0.0, 8)
  want = multisteps_run(params, batches, lr=lr, switch_mode="random")
  tx = badam(lr, accumulate_every=ACC, switch_mode="random")
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, tokens):
    updates, state = tx.update(jax.grad(loss_fn)(params, tokens), state, params)
    return optax.apply_updates(params, updates), state, updates

  got = params
  for i, tokens in enumerate(batches):
    block = int(state.active_block)
    got, state, updates = train_step(got, state, tokens)
    if i % ACC < ACC - 1:  # inside a window: nothing moves, the schedule waits
      assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
      assert int(state.active_block) == block and int(state.count) == i // ACC
    assert int(state.accumulator.micro_step) == (i + 1) % ACC
  assert int(state.count) == 8
  assert_close(got, want, atol=1e-6, rtol=1e-5)
  # The run trained several blocks (a switch every 2 optimizer steps).
  moved = [not np.allclose(a["up"], b["up"]) for a, b in zip(got["layers"], params["layers"])]
  assert sum(moved) == 4


@pytest.mark.parametrize("stacked", [False, True])
def test_block_step_equals_multisteps_and_big_batch(stacked):
  params = make_params(stacked)
  batches = micro_batches(8 * ACC)
  got, state, step = block_step_run(params, batches, switch_mode="ascending")
  assert int(state.count) == 8
  assert_close(got, multisteps_run(params, batches, switch_mode="ascending"))
  # The big-batch step: each optimizer step on the ACC micro-batches as one batch (a mean loss over
  # equal-sized micro-batches has the mean of their gradients as its gradient).
  tx = badam(switch_mode="ascending")
  big = optax_memopt.make_block_step(loss_fn, tx, donate=False)
  ref, ref_state = params, tx.init(params)
  for i in range(0, len(batches), ACC):
    ref, ref_state, _ = big(ref, ref_state, jnp.concatenate(batches[i:i + ACC]))
  assert_close(got, ref)
  if stacked:
    # One compiled step for every layer block, over two block-epochs.
    assert step.trace_count == 1
  else:
    assert sorted(step.compiled_blocks) == list(range(N_LAYERS))


@pytest.mark.parametrize("stacked", [False, True])
def test_accumulator_is_one_layer(stacked):
  params = make_params(stacked)
  state = badam(accumulate_every=ACC).init(params)
  acc = state.accumulator.grads
  one_layer = jax.tree.map(lambda x: x[0], params["layers"]) if stacked else params["layers"][0]
  want = sorted(x.shape for x in jax.tree.leaves(one_layer))
  assert sorted(x.shape for x in jax.tree.leaves(acc)) == want
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(acc))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  full = optax.MultiSteps(badam(), ACC).init(params).acc_grads
  assert nbytes(acc) * N_LAYERS <= nbytes(full)
  # Without accumulation the state holds no accumulator arrays.
  assert jax.tree.leaves(badam().init(params).accumulator.grads) == []


def test_resume_in_the_middle_of_a_window_is_exact():
  params = make_params(stacked=True)
  batches = micro_batches(4 * ACC + 1)
  want, _, _ = block_step_run(params, batches, switch_mode="random")
  # Stop after 2 micro-steps into a window, carry everything to the host and back (a checkpoint),
  # and continue with a new step function.
  cut = 2 * ACC + 2
  mid, state, _ = block_step_run(params, batches[:cut], switch_mode="random")
  assert int(state.accumulator.micro_step) == 2
  mid, state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), jax.device_get((mid, state)))
  got, _, _ = block_step_run(mid, batches[cut:], state=state, switch_mode="random")
  chex.assert_trees_all_equal(got, want)


def test_bf16_master_weights_equal_multisteps():
  """bf16 parameters, both through the block step (so both get the same bf16 gradients): the
  micro-batch gradients are averaged in float32 here, while MultiSteps rounds its float32 mean to
  the bf16 gradient dtype before BAdam casts it back. The steps differ by that rounding (relative
  2^-9 of the gradient, so at most lr * 2^-9 = 2e-5 through Adam): the float32 master copies agree
  to that, the bf16 parameters to one bf16 ulp (relative 2^-7 at most; 1e-4 absolute near zero)
  where it flips a rounding, while a missing micro-batch or a wrong block moves a parameter by
  ~lr = 1e-2. One window only: after a flipped ulp the next bf16 forward pass differs, and Adam
  amplifies the gradients that cancel to near zero (lr * dg / eps), so longer runs drift apart by
  bf16 noise, not by a difference in the algorithm."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params(stacked=True))
  batches = micro_batches(ACC)
  got, state, _ = block_step_run(params, batches, switch_mode="ascending")
  tx = optax.MultiSteps(badam(switch_mode="ascending"), ACC)
  step = optax_memopt.make_block_step(loss_fn, tx, donate=False)
  want, ref_state = params, tx.init(params)
  for tokens in batches:
    want, ref_state, _ = step(want, ref_state, tokens)
  chex.assert_trees_all_equal_dtypes(got, params)
  assert_close(got, want, atol=1e-4, rtol=2 ** -7)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.master))
  chex.assert_trees_all_close(state.master, ref_state.inner_opt_state.master, atol=2e-5, rtol=0)
  moved = np.abs(np.asarray(got["layers"]["up"][0], np.float32)
                 - np.asarray(params["layers"]["up"][0], np.float32)).max()
  assert moved > 5e-3


def test_errors():
  with pytest.raises(ValueError, match="accumulate_every must be None or an int >= 1"):
    optax_memopt.badam(1e-3, accumulate_every=0)
  with pytest.raises(TypeError, match="accumulate_every .* static_args"):
    optax_memopt.badam(1e-3, accumulate_every=jnp.int32(2))


def test_sharded_stack_keeps_the_accumulator_sharded_like_one_layer():
  """On an 8-device mesh (data=2 x model=4): the accumulator takes the shardings of the layer it
  holds, keeps them through the block step, and the run equals the single-device one (the sharded
  reductions round in another order: the tolerance of the block-step comparisons above)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from examples import sharding

  m = sharding.make_mesh("data=2,model=4", devices=jax.devices()[:8])
  specs = {"embed": P(), "head": P(),
           "layers": {"up": P(None, None, "model"), "down": P(None, "model", None), "scale": P()}}
  plain = make_params(stacked=True)
  p = jax.tree.map(lambda x, s: jax.device_put(jnp.copy(x), NamedSharding(m, s)), plain, specs)
  tx = badam(accumulate_every=ACC, switch_mode="ascending")
  state = sharding.init_state(tx, p, m)
  layer_specs = {tuple(x.shape[1:]): s[1:] for x, s in zip(
      jax.tree.leaves(plain["layers"]), jax.tree.leaves(specs["layers"], is_leaf=lambda s: isinstance(s, P)))}

  def check(state):
    for a in jax.tree.leaves(state.accumulator.grads):
      assert a.sharding.is_equivalent_to(NamedSharding(m, P(*layer_specs[a.shape])), a.ndim), a.shape

  check(state)
  step = optax_memopt.make_block_step(loss_fn, tx)
  batches = micro_batches(2 * ACC + 1, size=4)
  for tokens in batches:
    p, state, _ = step(p, state, jax.device_put(tokens, NamedSharding(m, P("data"))))
  check(state)
  want, _, _ = block_step_run(plain, batches, switch_mode="ascending")
  assert_close(jax.device_get(p), want)


def test_inject_hyperparams():
  """The default (None) is not numeric, so inject_hyperparams leaves it alone; a window length
  goes in static_args and gives the same updates as the plain transformation."""
  params = make_params(stacked=False)
  static = ("switch_every", "switch_mode", "accumulate_every")
  tx = optax.inject_hyperparams(optax_memopt.badam, static_args=static)(
      learning_rate=1e-2, switch_every=2, switch_mode="ascending", accumulate_every=2)
  plain = badam(accumulate_every=2, switch_mode="ascending", eps=1e-8)
  s1, s2 = tx.init(params), plain.init(params)
  for tokens in micro_batches(4):
    g = jax.grad(loss_fn)(params, tokens)
    u1, s1 = jax.jit(tx.update)(g, s1, params)
    u2, s2 = plain.update(g, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-4, atol=1e-7)
    params = optax.apply_updates(params, u1)
  assert int(s1.inner_state.count) == 2
  optax.inject_hyperparams(optax_memopt.badam, static_args=("switch_every",))(
      learning_rate=1e-2, switch_every=2).init(params)


@pytest.mark.parametrize("reset", [True, False])
def test_always_active_head_accumulates_with_the_block(reset):
  """An always-active head is in the slot, so its micro-batch gradients are accumulated beside the
  active layer's: the block step equals MultiSteps(badam) with the same head."""
  params = make_params(stacked=True)
  batches = micro_batches(4 * ACC)
  kw = dict(switch_mode="ascending", always_active=["head"], reset_always_active=reset)
  got, state, _ = block_step_run(params, batches, **kw)
  assert sorted(x.shape for x in jax.tree.leaves(state.accumulator.grads)) == sorted(
      [x.shape[1:] for x in jax.tree.leaves(params["layers"])] + [params["head"].shape])
  assert_close(got, multisteps_run(params, batches, **kw))
  assert not np.allclose(got["head"], params["head"])


def test_block_step_reads_the_schedule_once_per_block(monkeypatch):
  """The host reads (active block, steps, micro-step) from the device once per block period of
  switch_every * accumulate_every calls, not once per optimizer step."""
  params = make_params(stacked=False)
  tx = badam(accumulate_every=ACC, switch_mode="ascending")
  step = optax_memopt.make_block_step(loss_fn, tx, donate=False)
  state = tx.init(params)
  reads, device_get = [], jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or device_get(x))
  for tokens in micro_batches(2 * 2 * ACC):  # two block periods of 2 optimizer steps
    params, state, _ = step(params, state, tokens)
  assert len(reads) == 2 and int(state.count) == 4 and int(state.active_block) == 2
