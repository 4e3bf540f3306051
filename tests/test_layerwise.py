"""make_layerwise_step: the optimizer applied inside the backward pass, one layer at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt

L, D, V = 3, 8, 16


def _params(key=0, dtype=jnp.float32, stack="layers"):
  k = jax.random.split(jax.random.key(key), 4)
  return {
      "embed": (jax.random.normal(k[0], (V, D)) * 0.3).astype(dtype),
      stack: {
          "w": (jax.random.normal(k[1], (L, D, 2 * D)) * 0.3).astype(dtype),
          "v": (jax.random.normal(k[2], (L, 2 * D, D)) * 0.3).astype(dtype),
          "b": jnp.zeros((L, D), dtype),
      },
      "head": (jax.random.normal(k[3], (D, V)) * 0.3).astype(dtype),
  }


def _layer(p, x, scale):
  return x + (jnp.tanh(x @ p["w"]) @ p["v"]) * scale + p["b"]


def _loss(params, tokens, targets, stack="layers"):
  x = params["embed"][tokens]
  x = optax_memopt.scan_layers(_layer, params[stack], x, jnp.asarray(0.5, x.dtype))
  logits = (x @ params["head"]).astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def _batch(seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.randint(k1, (4, 5), 0, V), jax.random.randint(k2, (4, 5), 0, V)


def _ordinary(tx, loss=_loss):
  @jax.jit
  def step(params, state, *args):
    value, grads = jax.value_and_grad(loss)(params, *args)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return step


def _run_both(tx, steps, params=None, loss=_loss):
  params = _params() if params is None else params
  tokens, targets = _batch()
  ordinary = _ordinary(tx, loss)
  layerwise = optax_memopt.make_layerwise_step(loss, tx, donate=False)
  p1 = p2 = params
  s1 = s2 = tx.init(params)
  for _ in range(steps):
    p1, s1, l1 = ordinary(p1, s1, tokens, targets)
    p2, s2, l2 = layerwise(p2, s2, tokens, targets)
    # Same forward pass on the same parameters: the losses agree as long as the parameters do.
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
  return (p1, s1), (p2, s2)


def _assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=rtol, atol=atol)


def test_adamw_same_parameters_as_the_ordinary_step():
  # eps 1e-3 keeps Adam from amplifying the float32 rounding of near-zero gradients; the layer's
  # gradient is computed by the same pullback on both paths, so 5 steps agree to rounding.
  tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)
  (p1, s1), (p2, s2) = _run_both(tx, 5)
  _assert_trees_close(p2, p1, rtol=1e-5, atol=1e-6)
  _assert_trees_close(s2, s1, rtol=1e-5, atol=1e-6)
  assert int(s2[0].count) == 5


def test_adarankgrad_same_parameters_with_refreshes():
  tx = optax_memopt.adarankgrad(1e-2, max_rank=4, eps=1e-3, max_refresh_interval=2)
  (p1, s1), (p2, s2) = _run_both(tx, 5)
  state = s2[0]
  # Refreshes happened after the first step (every 2 steps at the latest), on every layer.
  assert (np.asarray(state.last_refresh["layers"]["w"]) >= 2).all()
  np.testing.assert_array_equal(state.rank["layers"]["w"], s1[0].rank["layers"]["w"])
  # The randomized SVD of one layer (unbatched matrix products) against the stacked one (batched)
  # differs by float32 rounding, which the QR/SVD pass on; 1e-4 of a step of ~1e-2.
  _assert_trees_close(p2, p1, rtol=1e-4, atol=1e-5)


def test_transformations_with_shared_state():
  tx = optax.inject_hyperparams(optax.lion)(
      learning_rate=optax.linear_schedule(1e-2, 1e-3, 4))
  (p1, _), (p2, _) = _run_both(tx, 3)
  _assert_trees_close(p2, p1, rtol=1e-5, atol=1e-6)


def test_two_stacks():
  def loss(params, tokens, targets):
    x = params["embed"][tokens]
    x = optax_memopt.scan_layers(_layer, params["encoder_layers"], x, jnp.float32(0.5))
    x = optax_memopt.scan_layers(_layer, params["decoder_layers"], x, jnp.float32(0.5))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ params["head"], targets))

  params = _params()
  params["encoder_layers"] = params.pop("layers")
  params["decoder_layers"] = _params(key=5)["layers"]
  tx = optax.adamw(1e-2, eps=1e-3)
  (p1, _), (p2, _) = _run_both(tx, 3, params, loss)
  _assert_trees_close(p2, p1, rtol=1e-5, atol=1e-6)


def test_pure_bf16_keeps_dtypes_and_trains():
  params = _params(dtype=jnp.bfloat16)
  tx = optax_memopt.adarankgrad(1e-2, max_rank=4, state_dtype=jnp.bfloat16)
  state = tx.init(params)
  step = optax_memopt.make_layerwise_step(_loss, tx)
  tokens, targets = _batch()
  first = None
  for _ in range(10):
    params, state, loss = step(params, state, tokens, targets)
    first = loss if first is None else first
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((state[0].mu, state[0].nu)))
  assert float(loss) < float(first)


def test_has_aux_and_donation():
  def loss(params, tokens, targets):
    value = _loss(params, tokens, targets)
    return value, {"twice": 2 * value}

  tx = optax.adam(1e-2)
  params = _params()
  state = tx.init(params)
  step = optax_memopt.make_layerwise_step(loss, tx, has_aux=True)
  old = params["layers"]["w"]
  params, state, (value, aux) = step(params, state, *_batch())
  np.testing.assert_allclose(aux["twice"], 2 * value)
  assert old.is_deleted()  # donated and updated in place
  params, state, _ = step(params, state, *_batch())
  assert step.trace_count == 1


@pytest.mark.parametrize("tx, match", [
    (optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), "needs the whole gradient"),
    (optax.apply_if_finite(optax.adam(1e-2), 2), "needs the whole gradient"),
    (optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(), "MultiSteps"),
    (optax_memopt.badam(1e-2), "make_block_step"),
])
def test_whole_gradient_transformations_are_refused(tx, match):
  params = _params()
  step = optax_memopt.make_layerwise_step(_loss, tx, donate=False)
  with pytest.raises((ValueError, TypeError), match=match):
    step(params, tx.init(params), *_batch())


def test_multisteps_refused_at_construction():
  with pytest.raises(TypeError, match="MultiSteps"):
    optax_memopt.make_layerwise_step(_loss, optax.MultiSteps(optax.adam(1e-2), 2))


def test_stack_outside_scan_layers_is_refused():
  def plain_scan(params, tokens, targets):
    x = params["embed"][tokens]
    x = jax.lax.scan(lambda c, p: (_layer(p, c, 0.5), None), x, params["layers"])[0]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ params["head"], targets))

  def used_twice(params, tokens, targets):
    return _loss(params, tokens, targets) + jnp.sum(params["layers"]["b"] ** 2)

  tx = optax.adam(1e-2)
  params = _params()
  for loss, match in ((plain_scan, "never reached optax_memopt.scan_layers"),
                      (used_twice, "used outside optax_memopt.scan_layers")):
    step = optax_memopt.make_layerwise_step(loss, tx, donate=False)
    with pytest.raises(ValueError, match=match):
      step(params, tx.init(params), *_batch())


def test_no_stack_is_refused():
  params = {"w": jnp.ones((2, 2))}
  step = optax_memopt.make_layerwise_step(lambda p: jnp.sum(p["w"]), optax.adam(1e-2))
  with pytest.raises(ValueError, match="no layer stack"):
    step(params, optax.adam(1e-2).init(params))


def test_xla_temporaries_hold_one_layer_gradient_not_the_stack():
  # A stack that dominates the model (8 layers of 2 x 256 x 1024) and a tiny batch: the ordinary
  # step's temporaries hold the stack's gradient, the layer-wise step's about one layer's.
  layers, d = 8, 256
  params = {
      "embed": jax.ShapeDtypeStruct((16, d), jnp.float32),
      "layers": {"w": jax.ShapeDtypeStruct((layers, d, 4 * d), jnp.float32),
                 "v": jax.ShapeDtypeStruct((layers, 4 * d, d), jnp.float32),
                 "b": jax.ShapeDtypeStruct((layers, d), jnp.float32)},
      "head": jax.ShapeDtypeStruct((d, 16), jnp.float32),
  }
  tx = optax.adamw(1e-3)
  state = jax.eval_shape(tx.init, params)
  tokens = targets = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  stack_grad = sum(x.size * 4 for x in jax.tree.leaves(params["layers"]))
  layer_grad = stack_grad // layers

  ordinary = jax.jit(_ordinary(tx).__wrapped__, donate_argnums=(0, 1))
  m_ord = ordinary.lower(params, state, tokens, targets).compile().memory_analysis()
  step = optax_memopt.make_layerwise_step(_loss, tx)
  m_lw = step.lower(params, state, tokens, targets).compile().memory_analysis()
  assert m_ord.temp_size_in_bytes >= stack_grad
  # Per layer, AdamW needs four layer-sized buffers (the weights' and both moments' slices, the
  # gradient), plus small activations: well below the stack's gradient. The stacks are updated
  # in place: every argument but the batch is aliased to an output, and no stack is copied.
  assert m_lw.temp_size_in_bytes <= 5 * layer_grad
  assert m_lw.alias_size_in_bytes == m_lw.argument_size_in_bytes - 2 * tokens.size * 4


def _decay_matrices_only(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


def test_callable_mask_on_ndim_sees_a_layer_as_the_stack():
  # One layer is given to tx as a stack of one ([1, d]), so a mask on ndim decays the stacked norm
  # scales [L, d] on both paths (before: decayed in the ordinary step only, silently).
  params = _params()
  params["layers"]["b"] = params["layers"]["b"] + 1.0  # decay has something to act on
  tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.5, mask=_decay_matrices_only)
  (p1, _), (p2, _) = _run_both(tx, 3, params)
  _assert_trees_close(p2, p1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, tx", [
    # A mask on size sees the stacked norm scale [L, d] and one layer's [1, d] differently.
    ("callable mask", optax.adamw(1e-2, weight_decay=0.5,
                                  mask=lambda p: jax.tree.map(lambda x: x.size > 2 * D, p))),
    # Norms over a whole leaf (across the stack's layers in the ordinary step): before, computed
    # per layer without an error.
    ("lamb", optax.lamb(1e-2)),
    ("lars", optax.lars(1e-2)),
    ("fromage", optax.fromage(1e-2)),
    ("adafactor", optax.adafactor(1e-2)),
    ("clip_by_block_rms", optax.chain(optax.clip_by_block_rms(0.01), optax.adam(1e-2))),
])
def test_updates_that_see_the_whole_stacked_leaf_are_refused(name, tx):
  params = _params()
  step = optax_memopt.make_layerwise_step(_loss, tx, donate=False)
  match = "callable mask" if name == "callable mask" else "computed across the layers"
  with pytest.raises(ValueError, match=match):
    step(params, tx.init(params), *_batch())


def test_mask_as_a_tree_of_bools_gives_the_ordinary_numbers():
  # The way out the refusal names: the mask computed once from the (stacked) params.
  params = _params()
  params["layers"]["b"] = params["layers"]["b"] + 1.0
  mask = jax.tree.map(lambda x: x.size > 2 * D, params)
  tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.5, mask=mask)
  (p1, _), (p2, _) = _run_both(tx, 3, params)
  _assert_trees_close(p2, p1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tx", [
    optax.noisy_sgd(1e-2, key=0),
    optax.chain(optax.add_noise(0.1, 0.55, key=0), optax.adam(1e-2)),
])
def test_noise_from_a_key_shared_by_the_layers_is_refused(tx):
  # Before: every layer got the same noise.
  params = _params()
  step = optax_memopt.make_layerwise_step(_loss, tx, donate=False)
  with pytest.raises(ValueError, match="same draw"):
    step(params, tx.init(params), *_batch())


def _square_stack():
  k = jax.random.split(jax.random.key(3), 4)
  params = {"embed": jax.random.normal(k[0], (V, D)) * 0.3,
            "layers": {"q": jax.random.normal(k[1], (L, D, D)) * 0.3,
                       "o": jax.random.normal(k[2], (L, D, D)) * 0.3},
            "head": jax.random.normal(k[3], (D, V)) * 0.3}

  def loss(params, tokens, targets):
    x = params["embed"][tokens]
    x = optax_memopt.scan_layers(lambda p, x: x + jnp.tanh(x @ p["q"]) @ p["o"], params["layers"], x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ params["head"], targets))

  return params, loss


def _encoder_decoder():
  def loss(params, tokens, targets):
    x = params["embed"][tokens]
    x = optax_memopt.scan_layers(_layer, params["encoder_layers"], x, jnp.float32(0.5))
    x = optax_memopt.scan_layers(_layer, params["decoder_layers"], x, jnp.float32(0.5))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ params["head"], targets))

  params = _params()
  params["encoder_layers"] = params.pop("layers")
  params["decoder_layers"] = _params(key=5)["layers"]
  return params, loss


@pytest.mark.parametrize("model", [_square_stack, _encoder_decoder])
def test_adarankgrad_on_square_matrices_and_two_stacks(model):
  # Before: refused ("tx.init gives a state of another structure"): one layer of a stack of square
  # matrices [d, d] looked like a stack of d vectors, and one decoder layer like no layer at all.
  params, loss = model()
  tx = optax_memopt.adarankgrad(1e-2, max_rank=2, eps=1e-3)
  (p1, s1), (p2, s2) = _run_both(tx, 3, params, loss)
  _assert_trees_close(p2, p1, rtol=1e-5, atol=1e-6)
  assert all(bool(jnp.all(r > 0)) for r in jax.tree.leaves(optax_memopt.effective_ranks(s2)))


def test_messages_name_the_cause():
  params = _params()
  tx = optax.adam(1e-2)
  step = optax_memopt.make_layerwise_step(_loss, tx, donate=False)
  # A state made for other parameters: before, "tx.init gives a state of another structure".
  other = dict(params, head=jnp.zeros((D, V + 1)))
  with pytest.raises(ValueError, match=r"made for other parameters; pass tx.init\(params\)"):
    step(params, tx.init(other), *_batch())
  with pytest.raises(ValueError, match="made for other parameters or by another optimizer"):
    step(params, tx.init({"w": params["head"]}), *_batch())

  # The stack cast before the scan: before, "must run through scan_layers ... (it ran 0 times)".
  def cast_first(params, tokens, targets):
    return _loss(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens, targets)

  cast_step = optax_memopt.make_layerwise_step(cast_first, tx, donate=False)
  with pytest.raises(ValueError, match="inside the layer function, not before the scan"):
    cast_step(params, tx.init(params), *_batch())

  # reduce_on_plateau: before, optax's missing `value` TypeError.
  plateau = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau())
  plateau_step = optax_memopt.make_layerwise_step(_loss, plateau, donate=False)
  with pytest.raises(TypeError, match="reduce_on_plateau needs the loss"):
    plateau_step(params, plateau.init(params), *_batch())
