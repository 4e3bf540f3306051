"""make_layerwise_step(accumulate=N): layer-wise updates on the mean gradient of N micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt

L, D, V, N, B, S = 3, 8, 16, 3, 2, 5


def _params(key=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(key), 4)
  return {
      "embed": (jax.random.normal(k[0], (V, D)) * 0.3).astype(dtype),
      "layers": {
          "w": (jax.random.normal(k[1], (L, D, 2 * D)) * 0.3).astype(dtype),
          "v": (jax.random.normal(k[2], (L, 2 * D, D)) * 0.3).astype(dtype),
          "b": jnp.zeros((L, D), dtype),
      },
      "scale": jnp.asarray(0.5, dtype),  # outside the stack, a differentiated shared argument
      "head": (jax.random.normal(k[3], (D, V)) * 0.3).astype(dtype),
  }


def _layer(p, x, scale, mask):
  return x + (jnp.tanh(x @ p["w"]) @ p["v"]) * scale * mask + p["b"]


def _loss(params, tokens, targets):
  x = params["embed"][tokens]
  # A per-example shared argument (varies over the micro-batches) and a parameter shared by the
  # layers: both reach the pullback that runs one micro-batch at a time.
  mask = (tokens % 4 != 0).astype(x.dtype)[..., None]
  x = optax_memopt.scan_layers(_layer, params["layers"], x, params["scale"], mask)
  logits = (x @ params["head"]).astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def _two_stacks():
  params = _params()
  params["encoder_layers"] = params.pop("layers")
  params["decoder_layers"] = _params(key=5)["layers"]

  def loss(params, tokens, targets):
    x = params["embed"][tokens]
    mask = jnp.ones(tokens.shape + (1,), x.dtype)
    x = optax_memopt.scan_layers(_layer, params["encoder_layers"], x, params["scale"], mask)
    x = optax_memopt.scan_layers(_layer, params["decoder_layers"], x, params["scale"], mask)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ params["head"], targets))

  return params, loss


def _windows(steps, seed=1):
  """``steps`` optimizer steps' micro-batches: tokens and targets ``[steps, N, B, S]``."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.randint(k1, (steps, N, B, S), 0, V),
          jax.random.randint(k2, (steps, N, B, S), 0, V))


def _multisteps(tx, loss, params, tokens, targets):
  """optax.MultiSteps(tx, N) fed the micro-batches one by one."""
  ms = optax.MultiSteps(tx, N)
  grad = jax.jit(jax.grad(loss))

  @jax.jit
  def micro(params, state, tok, tgt):
    updates, state = ms.update(grad(params, tok, tgt), state, params)
    return optax.apply_updates(params, updates), state

  state = ms.init(params)
  for tok_w, tgt_w in zip(tokens, targets):
    for tok, tgt in zip(tok_w, tgt_w):
      params, state = micro(params, state, tok, tgt)
  return params, state.inner_opt_state


def _big_batch(tx, loss, params, tokens, targets):
  """The ordinary step on each window's N micro-batches concatenated (one batch of N x B)."""

  @jax.jit
  def step(params, state, tok, tgt):
    grads = jax.grad(loss)(params, tok.reshape(N * B, S), tgt.reshape(N * B, S))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for tok, tgt in zip(tokens, targets):
    params, state = step(params, state, tok, tgt)
  return params, state


def _accumulated(tx, loss, params, tokens, targets):
  step = optax_memopt.make_layerwise_step(loss, tx, donate=False, accumulate=N)
  state = tx.init(params)
  mean_loss = jax.jit(lambda p, tok, tgt: jnp.mean(jax.vmap(loss, (None, 0, 0))(p, tok, tgt)))
  for tok, tgt in zip(tokens, targets):
    # The loss reported is the mean of the micro-batches' losses, before the update.
    expect = mean_loss(params, tok, tgt)
    params, state, value = step(params, state, tok, tgt)
    np.testing.assert_allclose(value, expect, rtol=1e-5)
  assert step.trace_count == 1
  return params, state


def _close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=rtol, atol=atol)


# Tolerances: the three paths sum the same micro-batch gradients in different orders (MultiSteps
# keeps a running mean, the big batch sums inside its matmuls, the accumulated step sums per layer
# in a scan), which differ by float32 rounding (~1e-7 relative). Adam's eps=1e-3 keeps the
# normalisation from amplifying it on near-zero gradients; after 3 steps of lr 1e-2 the parameters
# agree to 1e-5.
ADAMW = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)


@pytest.mark.parametrize("model", ["one_stack", "two_stacks"])
def test_adamw_equals_multisteps_and_the_big_batch(model):
  params, loss = (_params(), _loss) if model == "one_stack" else _two_stacks()
  tokens, targets = _windows(3)
  p_acc, s_acc = _accumulated(ADAMW, loss, params, tokens, targets)
  p_ms, s_ms = _multisteps(ADAMW, loss, params, tokens, targets)
  p_big, s_big = _big_batch(ADAMW, loss, params, tokens, targets)
  _close(p_acc, p_ms, rtol=1e-5, atol=1e-6)
  _close(s_acc, s_ms, rtol=1e-5, atol=1e-6)
  _close(p_acc, p_big, rtol=1e-5, atol=1e-6)
  _close(s_acc, s_big, rtol=1e-5, atol=1e-6)
  # It trained: the parameters moved by about the learning rate.
  assert float(jnp.max(jnp.abs(p_acc["head"] - params["head"]))) > 1e-2


def test_adarankgrad_with_refreshes_equals_multisteps_and_the_big_batch():
  # A refresh at least every 2 optimizer steps: over 4 windows every layer is refreshed (from the
  # window's full mean gradient) at window boundaries.
  tx = optax_memopt.adarankgrad(1e-2, max_rank=4, eps=1e-3, max_refresh_interval=2)
  params = _params()
  tokens, targets = _windows(4)
  p_acc, s_acc = _accumulated(tx, _loss, params, tokens, targets)
  p_ms, s_ms = _multisteps(tx, _loss, params, tokens, targets)
  p_big, s_big = _big_batch(tx, _loss, params, tokens, targets)
  for s in (s_acc[0], s_ms[0], s_big[0]):
    assert (np.asarray(s.last_refresh["layers"]["w"]) >= 2).all()
    np.testing.assert_array_equal(s.last_refresh["layers"]["w"], s_acc[0].last_refresh["layers"]["w"])
    np.testing.assert_array_equal(s.rank["layers"]["w"], s_acc[0].rank["layers"]["w"])
  # The randomized SVD of the refresh is computed from gradients that differ by float32 rounding
  # (summation order, above) and one layer's matrix unbatched against the stacked one batched;
  # the QR/SVD passes that on: 1e-4 of a step of ~1e-2, as tests/test_layerwise.py allows.
  _close(p_acc, p_ms, rtol=1e-4, atol=1e-5)
  _close(p_acc, p_big, rtol=1e-4, atol=1e-5)
  _close(s_acc[0].mu, s_ms[0].mu, rtol=1e-4, atol=1e-5)


def test_loss_aux_and_unbatched_arguments():
  # batch_argnums: the tokens and targets are micro-batched, the temperature is not.
  def loss(params, tokens, temperature, targets):
    value = _loss(jax.tree.map(lambda x: x, params), tokens, targets) / temperature
    return value, {"tokens": jnp.sum(tokens >= 0)}

  params = _params()
  tokens, targets = _windows(1)
  step = optax_memopt.make_layerwise_step(loss, ADAMW, donate=False, has_aux=True, accumulate=N,
                                          batch_argnums=(1, 3))
  _, _, (value, aux) = step(params, ADAMW.init(params), tokens[0], jnp.float32(2.0), targets[0])
  expect = np.mean([_loss(params, t, g) for t, g in zip(tokens[0], targets[0])]) / 2.0
  np.testing.assert_allclose(value, expect, rtol=1e-6)
  np.testing.assert_array_equal(aux["tokens"], [B * S] * N)  # one entry per micro-batch


def test_bf16_keeps_dtypes_and_trains():
  params = _params(dtype=jnp.bfloat16)
  tx = optax_memopt.adarankgrad(1e-2, max_rank=4, state_dtype=jnp.bfloat16)
  step = optax_memopt.make_layerwise_step(_loss, tx, accumulate=N)
  state = tx.init(params)
  tokens, targets = _windows(1)
  losses = []
  for _ in range(8):
    params, state, value = step(params, state, tokens[0], targets[0])
    losses.append(float(value))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("accumulate, match", [
    (0, "accumulate must be a whole number of micro-batches >= 1, got 0"),
    (True, "got True"),
    (2.0, "got 2.0"),
])
def test_bad_accumulate_is_refused_at_construction(accumulate, match):
  with pytest.raises(ValueError, match=match):
    optax_memopt.make_layerwise_step(_loss, ADAMW, accumulate=accumulate)


def test_bad_batch_argnums_are_refused():
  with pytest.raises(ValueError, match="batch_argnums is for accumulate=N"):
    optax_memopt.make_layerwise_step(_loss, ADAMW, batch_argnums=1)
  with pytest.raises(ValueError, match=r"after params \(1, 2, ...\), got 0"):
    optax_memopt.make_layerwise_step(_loss, ADAMW, accumulate=2, batch_argnums=0)
  params = _params()
  tokens, targets = _windows(1)
  step = optax_memopt.make_layerwise_step(_loss, ADAMW, donate=False, accumulate=N,
                                          batch_argnums=3)
  with pytest.raises(ValueError, match=r"batch_argnums=3, but loss_fn is given 2 argument"):
    step(params, ADAMW.init(params), tokens[0], targets[0])


def test_batches_without_the_micro_batch_axis_are_refused():
  params = _params()
  tokens, targets = _windows(1)
  step = optax_memopt.make_layerwise_step(_loss, ADAMW, donate=False, accumulate=N)
  state = ADAMW.init(params)
  # One micro-batch [B, S] instead of [N, B, S]: its leading size is B, not N.
  with pytest.raises(ValueError, match=r"argument 1 has shape \(2, 5\); it needs a leading "
                     r"micro-batch axis of size 3 \(stack the 3 micro-batches, \[3, \.\.\.\]\)"):
    step(params, state, tokens[0, 0], targets[0, 0])
  with pytest.raises(ValueError, match=r"argument 2 has shape \(2, 2, 5\)"):
    step(params, state, tokens[0], targets[0, :2])
  with pytest.raises(ValueError, match=r"keyword targets has shape \(\)"):
    step(params, state, tokens[0], targets=jnp.int32(0))
  alone = optax_memopt.make_layerwise_step(lambda p: _loss(p, tokens[0, 0], targets[0, 0]), ADAMW,
                                           donate=False, accumulate=N)
  with pytest.raises(ValueError, match="no micro-batched argument"):
    alone(params, state)


def test_multisteps_refusal_points_to_accumulate():
  with pytest.raises(TypeError, match="pass the inner optimizer and accumulate=N instead"):
    optax_memopt.make_layerwise_step(_loss, optax.MultiSteps(ADAMW, 2))


def test_on_a_mesh_with_donation():
  # Weights split over "model" along their last axis, each micro-batch split over "data" (its
  # batch axis, axis 1 of the stacked batch): same numbers as on one device, the shardings kept,
  # the donated inputs consumed.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  P = jax.sharding.PartitionSpec

  def spec(x):
    return P(*([None] * (x.ndim - 1)), "model") if x.ndim >= 2 else P()

  params = _params()
  tokens, targets = _windows(1)
  expect, _ = _multisteps(ADAMW, _loss, params, tokens, targets)
  sharded = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))),
                         params)
  state = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))),
                       ADAMW.init(sharded))
  batch = jax.sharding.NamedSharding(mesh, P(None, "data"))
  step = optax_memopt.make_layerwise_step(_loss, ADAMW, accumulate=N)
  new, new_state, _ = step(sharded, state, jax.device_put(tokens[0], batch),
                           jax.device_put(targets[0], batch))
  _close(new, expect, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves((new, new_state)), jax.tree.leaves((sharded, state))):
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
  assert sharded["layers"]["w"].is_deleted()


def test_xla_memory_keeps_carries_not_residuals():
  # 8 layers whose residuals (the [tokens, 4d] hidden activations and their tanh) outweigh their
  # inputs [tokens, d]: the layer-wise step on the 4 micro-batches concatenated keeps every layer's
  # residuals for the whole batch; the accumulated step keeps each layer's input per micro-batch
  # and recomputes one layer for one micro-batch at a time.
  layers, d, micro, seq = 8, 64, 4, 256
  params = {
      "embed": jax.ShapeDtypeStruct((16, d), jnp.float32),
      "layers": {"w": jax.ShapeDtypeStruct((layers, d, 4 * d), jnp.float32),
                 "v": jax.ShapeDtypeStruct((layers, 4 * d, d), jnp.float32)},
      "head": jax.ShapeDtypeStruct((d, 16), jnp.float32),
  }

  def loss(params, tokens):
    x = params["embed"][tokens]
    x = optax_memopt.scan_layers(lambda p, x: x + jnp.tanh(x @ p["w"]) @ p["v"], params["layers"], x)
    return jnp.mean((x @ params["head"]) ** 2)

  tx = optax.sgd(1e-3)
  state = jax.eval_shape(tx.init, params)
  carries = layers * micro * seq * d * 4
  big = optax_memopt.make_layerwise_step(loss, tx).lower(
      params, state, jax.ShapeDtypeStruct((micro * seq, 1), jnp.int32)).compile().memory_analysis()
  acc = optax_memopt.make_layerwise_step(loss, tx, accumulate=micro).lower(
      params, state, jax.ShapeDtypeStruct((micro, seq, 1), jnp.int32)).compile().memory_analysis()
  assert big.temp_size_in_bytes >= 2 * layers * micro * seq * 4 * d * 4  # every layer's residuals
  # The carries, and beside them a few whole-batch buffers of the carry's size outside the stack
  # (the embedding's output, the stack's output and their cotangents) and one micro-batch's
  # residuals: not every layer's residuals.
  assert acc.temp_size_in_bytes <= 2.5 * carries < big.temp_size_in_bytes / 4
