"""Behavioural tests of BAdam (block_coordinate / badam) and of the block partitioner."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from optax_memopt import _blocks
from tests._models import BATCH, WIDTH, state_bytes
from tests._models import toy_lm_loss as loss_fn
from tests._models import toy_lm_params as make_params

# ----------------------------------------------------------------------------- block_labels


def test_block_labels_list_paths_and_options():
  params = make_params(3)
  labels = optax_memopt.block_labels(params)
  assert labels["embed"] == -1 and labels["lm_head"] == -1 and labels["final_norm"] == -1
  assert [layer["attn"]["q"] for layer in labels["layers"]] == [0, 1, 2]
  assert [layer["norm"] for layer in labels["layers"]] == [0, 1, 2]
  full = optax_memopt.block_labels(params, include_embedding=True, include_lm_head=True)
  assert full["embed"] == 0 and full["layers"][2]["mlp"]["up"] == 3
  assert full["final_norm"] == 4 and full["lm_head"] == 4


@pytest.mark.parametrize(
    "make_tree",
    [
        lambda: {"model": {"layers": {str(i): {"mlp": {"kernel": jnp.ones(2)}} for i in range(12)}}},
        lambda: {f"layers_{i}": {"kernel": jnp.ones(2)} for i in range(12)},
        lambda: {"h": [{"w": jnp.ones(2)} for _ in range(12)]},
        lambda: {"blocks": [{"w": jnp.ones(2)} for _ in range(12)]},
    ],
    ids=["dotted", "linen_suffix", "h_list", "blocks_list"],
)
def test_block_labels_recognises_layer_styles(make_tree):
  tree = make_tree()
  labels = jax.tree_util.tree_leaves(optax_memopt.block_labels(tree))
  # Ordered by layer index (10 after 9, not after 1).
  paths = optax_memopt._tree.leaf_paths(tree)
  by_index = {int("".join(c for c in p.split(".")[-2] if c.isdigit()) or p.split(".")[1]): lab
              for p, lab in zip(paths, labels)} if "layers_" in paths[0] else None
  assert sorted(labels) == list(range(12))
  if by_index is not None:
    assert by_index == {i: i for i in range(12)}
  else:
    idx = [int(next(part for part in p.split(".") if part.isdigit())) for p in paths]
    assert dict(zip(idx, labels)) == {i: i for i in range(12)}


def test_block_labels_nnx_state_paths():
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.mlp = nnx.Linear(4, 4, rngs=rngs)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(10, 4, rngs=rngs)
      self.layers = nnx.List([Block(rngs) for _ in range(11)])
      self.lm_head = nnx.Linear(4, 10, rngs=rngs)

  state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  labels = optax_memopt.block_labels(state)
  flat = {optax_memopt._tree.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
  assert flat["layers.10.mlp.kernel"] == 10 and flat["layers.1.mlp.bias"] == 1
  assert flat["embed.embedding"] == -1 and flat["lm_head.kernel"] == -1


def test_block_labels_without_layers():
  tree = {"a": {"w": jnp.ones(2), "b": jnp.ones(2)}, "c": jnp.ones(3)}
  assert optax_memopt.block_labels(tree) == {"a": {"w": 0, "b": 0}, "c": 1}
  assert optax_memopt.block_labels(jnp.ones(3)) == 0


def test_regex_blocks_match_whole_components():
  params = make_params(12)
  labels = _blocks.resolve_blocks([r"layers\.1", r"layers\.10"], params)
  paths = optax_memopt._tree.leaf_paths(params)
  for p, lab in zip(paths, labels):
    if p.startswith("layers.1."):
      assert lab == 0
    elif p.startswith("layers.10."):
      assert lab == 1
    else:
      assert lab == -1


def test_callable_and_label_tree_specs_agree():
  params = make_params(3)
  tree = optax_memopt.block_labels(params, include_lm_head=True)
  a = _blocks.resolve_blocks(tree, params)
  b = _blocks.resolve_blocks(
      functools.partial(optax_memopt.block_labels, include_lm_head=True), params)
  assert a == b and max(a) == 3


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"switch_mode": "sideways"}, "switch_mode"),
        ({"switch_every": 0}, "switch_every"),
        ({"start_block": -2}, "start_block"),
        ({"weight_decay_mask": "bogus"}, "weight_decay_mask must be 'matrices', None"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_memopt.badam(1e-3, **kwargs)


def test_bad_specs_fail_at_init():
  params = make_params(3)
  with pytest.raises(ValueError, match="start_block=3 is out of range"):
    optax_memopt.badam(1e-3, start_block=3).init(params)
  with pytest.raises(ValueError, match="matches no parameter"):
    optax_memopt.badam(1e-3, blocks=[r"layers\.0", r"decoder\.\d+"]).init(params)
  with pytest.raises(ValueError, match="matches no parameter"):
    optax_memopt.badam(1e-3, blocks=jax.tree.map(lambda _: -1, params)).init(params)
  with pytest.raises(ValueError, match="without gaps"):
    optax_memopt.badam(1e-3, blocks=jax.tree.map(lambda _: 2, params)).init(params)
  bad = dict(params, layers=[dict(params["layers"][0], step=jnp.zeros((), jnp.int32))])
  with pytest.raises(TypeError, match="layers.0.step"):
    optax_memopt.badam(1e-3).init(bad)
  with pytest.raises(TypeError, match="inner"):
    optax_memopt.block_coordinate(lambda g: g)


@pytest.mark.parametrize("label", [0.5, np.float32(1.0), jnp.asarray(1.0), True])
def test_non_integer_block_labels_fail_at_init(label):
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  with pytest.raises(TypeError, match="'b'.*labels must be integers"):
    optax_memopt.badam(1e-3, blocks={"a": 0, "b": label}).init(params)
  # NumPy and JAX integers are labels.
  optax_memopt.badam(1e-3, blocks={"a": np.int32(0), "b": jnp.asarray(1)}).init(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_params_changed_between_init_and_update_name_the_leaf(dtype):
  params = make_params(2, dtype=dtype)
  tx = optax_memopt.badam(1e-2)
  state = tx.init(params)
  grown = dict(params, layers=[dict(layer, extra=jnp.ones((3,), dtype))
                               for layer in params["layers"]])
  with pytest.raises(ValueError, match=r"'layers.0.extra' \(3,\).*re-run tx.init"):
    tx.update(grown, state, grown)
  wider = dict(params, layers=[dict(layer, norm=jnp.ones((WIDTH + 1,), dtype))
                               for layer in params["layers"]])
  with pytest.raises(ValueError, match=r"'layers.0.norm' \(9,\).*re-run tx.init"):
    tx.update(wider, state, wider)
  deeper = make_params(3, dtype=dtype)
  with pytest.raises(ValueError, match="3 blocks but the state was built at init for 2"):
    tx.update(deeper, state, deeper)
  fewer = dict(params, layers=params["layers"][:1])
  with pytest.raises(ValueError, match="params have 'layers.1.attn.o', which grads have not"):
    tx.update(fewer, state, params)


# ----------------------------------------------------------------------------- exactness


def run_badam(tx, params, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  actives, trajectory = [], []
  for _ in range(steps):
    actives.append(int(optax_memopt.active_block(state)))
    grads = jax.grad(loss_fn)(params, BATCH)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return actives, trajectory, state


def reference_badam(params, order, k, lr, wd, labels, eps, always=(), keep=False):
  """Plain Python BAdam: at each switch a fresh optax.adamw on the active block alone.

  ``always``: leaf indices added to every block, as the reference's ``active_modules``: they train
  at every step, and their Adam state is wiped at each switch with the block's (a fresh adamw), or
  with ``keep``, kept by an adamw of their own for the whole run.
  """
  trajectory = []
  grad_fn = jax.jit(jax.grad(loss_fn))
  leaves, treedef = jax.tree_util.tree_flatten(params)

  def adamw(idx):
    return optax.adamw(lr, eps=eps, weight_decay=wd, mask=[leaves[i].ndim >= 2 for i in idx])

  kept = adamw(always) if keep else None
  kept_state = kept.init([leaves[i] for i in always]) if keep else None
  for block in order:
    idx = [i for i, lab in enumerate(labels) if lab == block or (i in always and not keep)]
    opt = adamw(idx)
    opt_state = opt.init([leaves[i] for i in idx])
    for _ in range(k):
      grads = jax.tree_util.tree_leaves(
          grad_fn(jax.tree_util.tree_unflatten(treedef, leaves), BATCH))
      groups = [(idx, opt, opt_state)] + ([(list(always), kept, kept_state)] if keep else [])
      states = []
      for ids, tx, st in groups:
        sub = [leaves[i] for i in ids]
        u, st = tx.update([grads[i] for i in ids], st, sub)
        for i, x in zip(ids, optax.apply_updates(sub, u)):
          leaves[i] = x
        states.append(st)
      opt_state = states[0]
      kept_state = states[1] if keep else None
      trajectory.append(jax.tree_util.tree_unflatten(treedef, list(leaves)))
  return trajectory


@pytest.mark.parametrize("mode", ["random", "ascending", "descending", "fixed"])
def test_trajectory_matches_reference(mode):
  # Two correct float32 programs (the slot update vs optax.adamw on the block alone) may round the
  # last bit differently (FMA contraction depends on the CPU), and the next gradient then differs by a
  # rounding dg. Adam turns that into a step error of at most lr * dg / eps: with eps=1e-3, lr=3e-2 and
  # |dg| <~ 1e-7 it is <= 3e-6 per update, <= 7e-5 over the 24 updates, under the atol of 1e-4 below,
  # which is 300x below the ~lr that a wrong block, order or moment reset moves a parameter by.
  n_layers, k, lr, wd, eps = 4, 3, 3e-2, 0.1, 1e-3
  params = make_params(n_layers)
  start = 2
  tx = optax_memopt.badam(lr, switch_every=k, switch_mode=mode, start_block=start,
                          weight_decay=wd, seed=7, eps=eps)
  steps = 2 * n_layers * k  # two block-epochs
  actives, trajectory, _ = run_badam(tx, params, steps)
  # Each block gets exactly k consecutive steps, the first block included.
  periods = [actives[i * k:(i + 1) * k] for i in range(2 * n_layers)]
  assert all(len(set(p)) == 1 for p in periods)
  order = [p[0] for p in periods]
  assert order[0] == start
  if mode == "ascending":
    assert order == [(start + i) % n_layers for i in range(2 * n_layers)]
  elif mode == "descending":
    assert order == [(start - i) % n_layers for i in range(2 * n_layers)]
  elif mode == "fixed":
    assert order == [start] * (2 * n_layers)
  else:
    assert sorted(order[:n_layers]) == list(range(n_layers))
    assert sorted(order[n_layers:]) == list(range(n_layers))
  labels = jax.tree_util.tree_leaves(optax_memopt.block_labels(params))
  expected = reference_badam(params, order, k, lr, wd, labels, eps)
  for got, want in zip(trajectory, expected):
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
  # Frozen leaves never move.
  np.testing.assert_array_equal(trajectory[-1]["embed"], params["embed"])
  np.testing.assert_array_equal(trajectory[-1]["lm_head"], params["lm_head"])


@pytest.mark.parametrize("mode,keep", [("random", False), ("descending", False), ("random", True)])
def test_trajectory_with_always_active_matches_reference(mode, keep):
  # The head and the final norm train at every step beside the active layer, with their moments
  # reset at every switch (the reference's active_modules), or kept for the whole run. Tolerance:
  # as in test_trajectory_matches_reference (eps 1e-3, 24 updates).
  n_layers, k, lr, wd, eps = 4, 3, 3e-2, 0.1, 1e-3
  params = make_params(n_layers)
  tx = optax_memopt.badam(lr, switch_every=k, switch_mode=mode, weight_decay=wd, seed=7, eps=eps,
                          always_active=["lm_head", "final_norm"], reset_always_active=not keep)
  steps = 2 * n_layers * k
  actives, trajectory, _ = run_badam(tx, params, steps)
  order = actives[::k]
  paths = _blocks.leaf_paths(params)
  always = [paths.index("lm_head"), paths.index("final_norm")]
  labels = jax.tree_util.tree_leaves(optax_memopt.block_labels(params))
  expected = reference_badam(params, order, k, lr, wd, labels, eps, always=always, keep=keep)
  for got, want in zip(trajectory, expected, strict=True):
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
  # The head moved at every step; the embedding (frozen) never did.
  heads = [params["lm_head"]] + [p["lm_head"] for p in trajectory]
  assert all(float(jnp.max(jnp.abs(a - b))) > 1e-3 for a, b in zip(heads, heads[1:]))
  np.testing.assert_array_equal(trajectory[-1]["embed"], params["embed"])
  # Resetting the head's moments at each switch or keeping them are visibly different
  # trajectories: the comparison above tells them apart.
  other = reference_badam(params, order, k, lr, wd, labels, eps, always=always, keep=not keep)
  gap = float(jnp.max(jnp.abs(other[-1]["lm_head"] - expected[-1]["lm_head"])))
  assert gap > 100 * 1e-4, gap


def test_random_order_reshuffles_every_epoch():
  n = 8
  params = {"layers": [{"w": jnp.ones(2)} for _ in range(n)]}
  tx = optax_memopt.block_coordinate(optax.sgd(0.1), switch_every=1, seed=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for _ in range(4 * n):
    seen.append(int(optax_memopt.active_block(state)))
    _, state = update(params, state, params)
  epochs = [seen[i * n:(i + 1) * n] for i in range(4)]
  assert all(sorted(e) == list(range(n)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 4  # a fresh permutation each epoch
  other = optax_memopt.block_coordinate(optax.sgd(0.1), switch_every=1, seed=4).init(params)
  assert not np.array_equal(other.order, tx.init(params).order)


def test_schedule_runs_on_global_step():
  params = make_params(2)
  schedule = optax.linear_schedule(1.0, 0.0, 8)
  tx = optax_memopt.badam(schedule, switch_every=2, switch_mode="ascending", b1=0.0, b2=0.0,
                          eps=0.0)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for step in range(4):
    updates, state = tx.update(grads, state, params)
    block = [1 if step >= 2 else 0][0]
    # b1=b2=0: Adam's direction is sign(g) = 1, so the update is -lr(step).
    np.testing.assert_allclose(updates["layers"][block]["attn"]["q"], -schedule(step), rtol=1e-6)
    np.testing.assert_array_equal(updates["layers"][1 - block]["attn"]["q"], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_schedule_inside_restarts_after_runs_on_global_step(dtype):
  # Documented: a schedule inside block_coordinate's inner transformation restarts with the inner
  # state at every block; one in a stage after block_coordinate runs on the global step.
  params = {"w": jnp.ones((4,), dtype)}
  grads = {"w": jnp.ones((4,), dtype)}
  schedule = optax.linear_schedule(0.25, 0.0, 10)  # 0.25, 0.225, ...: exact in float32

  def steps(tx, n=7):
    p, state, sizes = params, tx.init(params), []
    update = jax.jit(tx.update)
    for _ in range(n):
      u, state = update(grads, state, p)
      new = optax.apply_updates(p, u)
      sizes.append(float(jnp.mean((p["w"] - new["w"]).astype(jnp.float32))))
      p = new
    return np.array(sizes), float(jnp.mean(p["w"].astype(jnp.float32))) - 1.0

  restarting = [float(schedule(i % 3)) for i in range(7)]
  global_ = [float(schedule(i)) for i in range(7)]
  sign = optax.scale_by_adam(b1=0.0, b2=0.0, eps=0.0)  # direction sign(g) = 1
  inside = optax_memopt.block_coordinate(optax.chain(sign, optax.scale_by_learning_rate(schedule)),
                                         switch_every=3)
  after = optax.chain(optax_memopt.block_coordinate(sign, switch_every=3),
                      optax.scale_by_learning_rate(schedule))
  if dtype == jnp.float32:
    np.testing.assert_allclose(steps(inside)[0], restarting, rtol=1e-6)
    np.testing.assert_allclose(steps(after)[0], global_, rtol=1e-6)
  else:
    # bf16: each step is rounded (the master copy follows what was applied), so compare the total
    # movement, within half a bf16 ulp (2**-8 below 1) per step.
    for tx, want in ((inside, restarting), (after, global_)):
      np.testing.assert_allclose(steps(tx)[1], -sum(want), atol=7 * 2 ** -9)
  assert abs(sum(restarting) - sum(global_)) > 7 * 2 ** -9  # the two cases are told apart


# ----------------------------------------------------------------------------- compile once


def test_no_recompilation_across_switches():
  params = make_params(4)
  tx = optax_memopt.badam(1e-2, switch_every=2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, state):
    grads = jax.grad(loss_fn)(params, BATCH)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  blocks = set()
  for _ in range(2 * 4 * 2):
    blocks.add(int(optax_memopt.active_block(state)))
    params, state = train_step(params, state)
  assert blocks == {0, 1, 2, 3}
  assert train_step._cache_size() == 1


# ----------------------------------------------------------------------------- memory


def twelve_layer_params(dtype=jnp.float32):
  return make_params(12, width=32, dtype=dtype)


def test_state_holds_one_block():
  params = twelve_layer_params()
  state = optax_memopt.badam(1e-3, weight_decay=0.1).init(params)
  block = params["layers"][0]
  adamw_block = state_bytes(optax.adamw(1e-3).init(block))
  assert state_bytes(state) <= 1.1 * adamw_block + 256
  full = state_bytes(optax.adamw(1e-3).init(params))
  assert state_bytes(state) < full / 10


def test_state_with_master_copy_for_bf16():
  params = twelve_layer_params(jnp.bfloat16)
  state = optax_memopt.badam(1e-3).init(params)
  block32 = jax.tree.map(lambda x: x.astype(jnp.float32), params["layers"][0])
  bound = 1.1 * (state_bytes(optax.adamw(1e-3).init(block32)) + state_bytes(block32)) + 256
  assert state_bytes(state) <= bound
  assert all(m.dtype == jnp.float32 for m in jax.tree_util.tree_leaves(state.master))
  # float32 params: no master copy at all.
  assert jax.tree_util.tree_leaves(optax_memopt.badam(1e-3).init(twelve_layer_params()).master) == []


def test_unlike_blocks_bound():
  params = twelve_layer_params()
  tx = optax_memopt.badam(1e-3, blocks=functools.partial(
      optax_memopt.block_labels, include_embedding=True, include_lm_head=True))
  state = tx.init(params)
  # Documented bound: the slot holds, per (shape, dtype) class, the largest count used by any one
  # block; here the largest block (a layer) plus the embedding and head matrices (new shapes).
  layer = state_bytes(params["layers"][0])
  extra = params["embed"].nbytes + params["lm_head"].nbytes
  assert state_bytes(state) <= 2 * (layer + extra) + 256
  assert state_bytes(state) >= 2 * layer


# ----------------------------------------------------------------------------- mixed precision


def test_bf16_updates_and_master_copy():
  params = make_params(2, dtype=jnp.bfloat16)
  tx = optax_memopt.badam(1e-2, switch_every=4, switch_mode="ascending")
  state = tx.init(params)
  update = jax.jit(tx.update)
  mismatched = total = 0
  for _ in range(3):
    grads = jax.grad(loss_fn)(params, BATCH)
    updates, state = update(grads, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    params = optax.apply_updates(params, updates)
    for j, leaf in enumerate(jax.tree_util.tree_leaves(params["layers"][0])):
      master = jax.tree_util.tree_leaves(state.master)[j]
      rounded = master.astype(jnp.bfloat16)
      mismatched += int(jnp.sum(leaf != rounded))
      total += leaf.size
      # Wherever they differ it is by rounding only.
      # The update is rounded to bf16 before it is added: the error is within the rounding of an
      # update (|u| <= lr), i.e. lr * 2**-8.
      np.testing.assert_allclose(np.asarray(leaf, np.float32), np.asarray(rounded, np.float32),
                                 rtol=2 ** -8, atol=1e-2 * 2 ** -8)
  print("bf16 elements differing from the rounded master copy:", mismatched, "of", total)
  assert mismatched / total < 0.02, (mismatched, total)
  # The master copy moves by less than one bf16 ulp per step, so it must differ from the params.
  assert any(bool(jnp.any(m != m.astype(jnp.bfloat16).astype(jnp.float32)))
             for m in jax.tree_util.tree_leaves(state.master))


def constant_gradient_move(tx, dtype, steps=50):
  """Mean movement of a weight (one block, starting at 1.0) under a constant gradient of 1."""
  params = {"w": jnp.full((16,), 1.0, dtype)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = {"w": jnp.ones((16,), dtype)}
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return float(jnp.mean(params["w"].astype(jnp.float32)) - 1.0)


@pytest.mark.parametrize(
    "make_tx, f32_move",
    [
        (lambda: optax.chain(optax_memopt.badam(1e-2), optax.scale(0.5)), -0.25),
        (lambda: optax.chain(optax_memopt.block_coordinate(optax.scale_by_adam()),
                             optax.scale_by_learning_rate(1e-2)), -0.5),
        (lambda: optax.chain(optax_memopt.badam(5e-3, switch_every=7), optax.scale(2.0)), -0.5),
    ],
    ids=["badam_then_scale", "adam_then_learning_rate", "badam_then_double"],
)
def test_bf16_master_copy_follows_later_stages(make_tx, f32_move):
  # Adam's direction on a constant gradient is 1, so float32 moves by exactly steps * lr * scale
  # (up to eps). Before the master copy followed what was applied, bf16 moved by -0.49 / -15.2.
  assert constant_gradient_move(make_tx(), jnp.float32) == pytest.approx(f32_move, abs=1e-4)
  moved = constant_gradient_move(make_tx(), jnp.bfloat16)
  # The master copy follows the applied params, so the only error left is the bf16 rounding of
  # each applied step: at most half an ulp, 2**-9 for values in [0.5, 1], over 50 steps (the
  # weights stay in [0.5, 1]; every applied step is more than one ulp, so none stalls).
  assert abs(moved - f32_move) <= 50 * 2 ** -9, moved


# ----------------------------------------------------------------------------- optax citizenship


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("mask", ["matrices", None, "callable"])
def test_inject_hyperparams_weight_decay_keeps_state_and_updates(weight_decay, mask):
  # An injected weight_decay is an array whatever its value: the state must still be the one badam
  # builds for the same arguments (an injected 0.0 used to add a decay group), the updates equal.
  params = make_params(2)
  if mask == "callable":
    mask = lambda p: jax.tree.map(lambda x: x.shape[-1] == WIDTH, p)
  kwargs = dict(switch_every=2, switch_mode="ascending", weight_decay_mask=mask)
  injected = optax.inject_hyperparams(
      optax_memopt.badam, static_args=("switch_every", "switch_mode", "weight_decay_mask"))(
          learning_rate=1e-2, weight_decay=weight_decay, **kwargs)
  plain = optax_memopt.badam(1e-2, weight_decay=weight_decay, **kwargs)
  s1, s2 = injected.init(params), plain.init(params)
  assert jax.tree_util.tree_structure(s1.inner_state) == jax.tree_util.tree_structure(s2)
  update, plain_update = jax.jit(injected.update), jax.jit(plain.update)
  for _ in range(3):
    g = jax.grad(loss_fn)(params, BATCH)
    u1, s1 = update(g, s1, params)
    u2, s2 = plain_update(g, s2, params)
    # Same operations on the same numbers, but the hyperparameters are f32 arrays in one and
    # constants folded by XLA in the other: a few float32 ulps (measured up to 7e-6 relative).
    chex.assert_trees_all_close(u1, u2, rtol=3e-5, atol=1e-9)
    params = optax.apply_updates(params, u1)
  chex.assert_trees_all_equal_shapes_and_dtypes(s1.inner_state, s2)
  # Raising the injected weight decay from 0 takes effect (same state, no recompilation needed).
  s1.hyperparams["weight_decay"] = jnp.asarray(weight_decay + 0.5)
  u3, _ = update(jax.grad(loss_fn)(params, BATCH), s1, params)
  u4, _ = plain_update(jax.grad(loss_fn)(params, BATCH), s2, params)
  assert not np.allclose(u3["layers"][1]["attn"]["q"], u4["layers"][1]["attn"]["q"])


def test_inject_hyperparams_without_static_args_names_them():
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(optax_memopt.badam)(learning_rate=1e-2, switch_every=2).init(
        make_params(2))


def test_inside_nnx_optimizer():
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 4, rngs=rngs)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([Block(rngs) for _ in range(3)])

    def __call__(self, x):
      for layer in self.layers:
        x = jnp.tanh(layer.lin(x))
      return x

  model = Model(nnx.Rngs(0))
  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(jnp.copy, before)
  optimizer = nnx.Optimizer(model, optax_memopt.badam(1e-2, switch_every=2,
                                                      switch_mode="ascending"), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  x = jnp.ones((2, 4))
  train_step(model, optimizer, x)
  after = nnx.state(model, nnx.Param)
  assert not np.allclose(after["layers"][0]["lin"]["kernel"][...],
                         before["layers"][0]["lin"]["kernel"][...])
  np.testing.assert_array_equal(after["layers"][1]["lin"]["kernel"][...],
                                before["layers"][1]["lin"]["kernel"][...])
  train_step(model, optimizer, x)
  train_step(model, optimizer, x)
  assert int(optax_memopt.active_block(optimizer.opt_state)) == 1


def test_injected_hyperparams_inside_block_coordinate_survive_block_switches():
  """A block switch resets the inner optimizer's moments, not the learning rate a user set through
  ``optax.inject_hyperparams`` inside ``block_coordinate``, nor a schedule's position (before: both
  were silently re-initialised at every switch, including the first step)."""
  params = {"a": jnp.ones((3,)), "b": jnp.ones((2,))}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax_memopt.block_coordinate(optax.inject_hyperparams(optax.sgd)(learning_rate=0.5),
                                     blocks=["a", "b"], switch_every=1, switch_mode="ascending")
  state = tx.init(params)
  state = state._replace(inner_state=state.inner_state._replace(
      hyperparams={"learning_rate": jnp.asarray(0.25)}))
  update = jax.jit(tx.update)
  for step in range(4):  # a switch at every step
    updates, state = update(grads, state, params)
    moved = updates["a"] if step % 2 == 0 else updates["b"]
    np.testing.assert_allclose(moved, -0.25, err_msg=f"step {step}")
    assert float(state.inner_state.hyperparams["learning_rate"]) == 0.25
  # A schedule inside inject_hyperparams follows the global count across switches.
  schedule = lambda count: 1.0 / (1.0 + count)  # noqa: E731
  tx = optax_memopt.block_coordinate(optax.inject_hyperparams(optax.sgd)(learning_rate=schedule),
                                     blocks=["a", "b"], switch_every=1, switch_mode="ascending")
  state = tx.init(params)
  for step in range(4):
    updates, state = tx.update(grads, state, params)
    moved = updates["a"] if step % 2 == 0 else updates["b"]
    np.testing.assert_allclose(moved, -1.0 / (1.0 + step), rtol=1e-6, err_msg=f"step {step}")
