"""Always-active leaves (``always_active=``): trained at every step whatever BAdam's active block.

The reference trajectory (the PyTorch reference's ``active_modules``) is checked in
``tests/test_badam.py::test_trajectory_with_always_active_matches_reference``; here: the block step
against the drop-in path (list and stacked layers, ``scan_layers``), leaves that another optimizer
in ``tx`` trains (``optax.multi_transform``), the state's size, the spec kinds, the errors, and the
optax citizenship (bf16, ``inject_hyperparams``, exact resume).
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from tests import _checks
from tests import test_block_step as lists
from tests import test_scan as scans
from tests._models import state_bytes

# The block step against the drop-in path: tolerances and eps as in tests/test_block_step.py (eps
# 1e-3 turns a float32 gradient rounding into at most lr * dg / eps per update; ATOL has headroom
# above that over these runs and is 100x below what one update of a wrong leaf moves).
EPS, ATOL, RTOL = lists.EPS, lists.ATOL, lists.RTOL


def run_block_step(tx, params, loss, steps, *args):
  step = optax_memopt.make_block_step(loss, tx, donate=False)
  p, s = params, tx.init(params)
  trajectory = []
  for _ in range(steps):
    p, s, _ = step(p, s, *args)
    trajectory.append(p)
  return trajectory, step


def run_drop_in(tx, params, loss, steps, *args):
  state = tx.init(params)

  @jax.jit
  def one(params, state):
    updates, state = tx.update(jax.grad(loss)(params, *args), state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for _ in range(steps):
    params, state = one(params, state)
    trajectory.append(params)
  return trajectory


def moved_every_step(trajectory, start, get):
  values = [get(start)] + [get(p) for p in trajectory]
  return all(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(values, values[1:]))


# ----------------------------------------------------------------------------- the block step


def head_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path) == "['head']", params)


@pytest.mark.parametrize("spec", [
    ["head"],
    ["embed", "head"],  # the embedding too: the backward pass reaches the bottom in every block
])
def test_block_step_equals_drop_in_on_a_list_of_layers(spec):
  params = lists.make_params(3)
  tx = optax_memopt.badam(1e-2, always_active=spec, switch_every=1, switch_mode="ascending",
                          weight_decay=0.01, eps=EPS)
  want = run_drop_in(tx, params, lists.loss_fn, 4, lists.TOKENS)
  got, step = run_block_step(tx, params, lists.loss_fn, 4, lists.TOKENS)
  for g, w in zip(got, want, strict=True):
    chex.assert_trees_all_close(g, w, rtol=RTOL, atol=ATOL)
  assert moved_every_step(got, params, lambda p: p["head"])
  assert sorted(step.compiled_blocks) == [0, 1, 2]
  if "embed" in spec:
    assert moved_every_step(got, params, lambda p: p["embed"])
  else:
    np.testing.assert_array_equal(got[-1]["embed"], params["embed"])


@pytest.mark.parametrize("always", [["head"], [r"layers\.scale"], ["head", r"layers\.scale"]],
                         ids=["outside", "stacked", "both"])
def test_block_step_equals_drop_in_on_a_scanned_stack(always):
  # A head outside the stack, a whole stacked leaf [L, d] inside it (differentiated in every layer
  # beside the active layer's slice), or both; one compiled step serves every layer block.
  n = 3
  params = scans.make_params(n)
  tx = optax_memopt.badam(1e-2, always_active=always, switch_every=1, switch_mode="descending",
                          eps=EPS)
  want = run_drop_in(tx, params, scans.ours, n + 1, scans.TOKENS)
  with warnings.catch_warnings():  # no warning: the stacked leaf is differentiated on purpose
    warnings.simplefilter("error")
    got, step = run_block_step(tx, params, scans.ours, n + 1, scans.TOKENS)
  for g, w in zip(got, want, strict=True):
    chex.assert_trees_all_close(g, w, rtol=RTOL, atol=ATOL)
  assert step.trace_count == 1 and sorted(step.compiled_blocks) == list(range(n))
  if "head" in always:
    assert moved_every_step(got, params, lambda p: p["head"])
  if len(always) > 1 or "head" not in always:
    # Every layer's scale moves at every step, not only the active layer's.
    for layer in range(n):
      assert moved_every_step(got, params, lambda p, layer=layer: p["layers"]["scale"][layer])


def test_block_step_on_a_stack_outside_scan_layers():
  # The stack run by lax.scan: the right gradients (the whole stack's backward pass, warned).
  params = scans.make_params(2)
  tx = optax_memopt.badam(1e-2, always_active=["head"], switch_every=1, eps=EPS)
  want = run_drop_in(tx, params, scans.ref, 2, scans.TOKENS)
  with pytest.warns(UserWarning, match="scan_layers"):
    got, _ = run_block_step(tx, params, scans.ref, 2, scans.TOKENS)
  chex.assert_trees_all_close(got[-1], want[-1], rtol=RTOL, atol=ATOL)


def multi_transform(params, embed="frozen"):
  labels = jax.tree.map(lambda _: "rest", params)
  labels["head"], labels["embed"] = "head", embed
  return optax.multi_transform({
      "head": optax.adamw(1e-2, eps=EPS),
      "frozen": optax.set_to_zero(),
      "rest": optax_memopt.badam(1e-2, switch_every=2, switch_mode="ascending", eps=EPS),
  }, labels)


def test_block_step_trains_what_another_optimizer_in_tx_trains():
  # BAdam on the layers, AdamW on the head, the embedding frozen by set_to_zero: the head gets its
  # gradient (it stayed exactly unchanged when only BAdam's block was differentiated).
  params = lists.make_params()
  tx = multi_transform(params)
  want = run_drop_in(tx, params, lists.loss_fn, 4, lists.TOKENS)
  got, _ = run_block_step(tx, params, lists.loss_fn, 4, lists.TOKENS)
  for g, w in zip(got, want, strict=True):
    chex.assert_trees_all_close(g, w, rtol=RTOL, atol=ATOL)
  assert moved_every_step(got, params, lambda p: p["head"])
  np.testing.assert_array_equal(got[-1]["embed"], params["embed"])
  # The frozen embedding is not differentiated: the top layer's step stops its backward pass there,
  # while an embedding trained by AdamW takes the backward pass through every layer. With a global
  # clip before, every update depends on every gradient (through the norm); what counts is whether a
  # leaf's update depends on its own gradient.
  top = lists.N_LAYERS - 1

  def flops(tx):
    step = optax_memopt.make_block_step(lists.loss_fn, tx)
    return lists.flops(step.lower(top, params, tx.init(params), lists.TOKENS))

  trained = flops(multi_transform(params, embed="head"))
  assert flops(multi_transform(params)) < 0.8 * trained
  clipped = optax.chain(optax.clip_by_global_norm(1.0), multi_transform(params))
  assert flops(clipped) < 0.8 * trained


def test_block_step_refuses_a_tx_that_changes_the_parameter_tree():
  params = lists.make_params(2)
  tx = optax.flatten(optax_memopt.badam(1e-2, blocks=[".*"]))
  step = optax_memopt.make_block_step(lists.loss_fn, tx)
  with pytest.raises(TypeError, match="changes the parameter tree"):
    step(params, tx.init(params), lists.TOKENS)


# ----------------------------------------------------------------------------- state and specs


def test_state_is_one_block_plus_the_always_active_leaves():
  params = lists.make_params()
  head = params["head"].nbytes
  plain = state_bytes(optax_memopt.badam(1e-2).init(params))
  for reset in (True, False):
    tx = optax_memopt.badam(1e-2, always_active=["head"], reset_always_active=reset)
    extra = state_bytes(tx.init(params)) - plain
    # Adam's two moments of the head, and with a state of its own one more Adam count (int32).
    assert extra == 2 * head + (0 if reset else 4), (reset, extra)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tx = optax_memopt.badam(1e-2, always_active=["head"])
  extra = state_bytes(tx.init(bf16)) - state_bytes(optax_memopt.badam(1e-2).init(bf16))
  assert extra == 3 * 4 * params["head"].size  # float32 moments and master copy


def test_bf16_head_trains_through_its_master_copy():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lists.make_params(2))
  tx = optax_memopt.badam(1e-4, always_active=["head"], switch_every=2, eps=EPS)
  # Steps of 1e-4 are below bf16's resolution for most entries: they accumulate in the float32
  # master copy and show in the bf16 head after a few steps (rounding them each step would not).
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = params
  for _ in range(4):
    u, state = update(jax.grad(lists.loss_fn)(p, lists.TOKENS), state, p)
    p = optax.apply_updates(p, u)
  master = [m for ms in state.master.values() for m in ms if m.shape == params["head"].shape]
  assert len(master) == 1 and master[0].dtype == jnp.float32
  assert p["head"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(p["head"], master[0].astype(jnp.bfloat16))
  assert float(jnp.max(jnp.abs(master[0] - params["head"].astype(jnp.float32)))) > 2e-4


def test_specs_agree_and_describe_blocks_shows_them():
  params = lists.make_params(3)
  labels = optax_memopt.block_labels(params, always_active=["head"])
  assert labels["head"] == -2 and labels["embed"] == -1 and labels["layers"][2]["up"] == 2
  text = optax_memopt.describe_blocks(params, always_active=["head"])
  lines = text.splitlines()
  head = params["head"]
  assert lines[-3].split() == ["always", f"{head.size:,}", f"{head.nbytes:,}", "head"]
  assert lines[-2].split()[0] == "frozen"
  assert "always active: 512 parameters (state: one block plus these)" in lines[-1]
  # A label tree with -2, a regex, a mask and a callable give the same updates.
  grads = jax.tree.map(jnp.ones_like, params)

  def updates(**kwargs):
    tx = optax_memopt.badam(1e-2, switch_mode="ascending", **kwargs)
    return tx.update(grads, tx.init(params), params)[0]

  want = updates(always_active=["head"])
  for kwargs in [dict(blocks=labels), dict(always_active=head_mask),
                 dict(always_active=head_mask(params))]:
    chex.assert_trees_all_equal(updates(**kwargs), want)
  assert float(jnp.min(jnp.abs(want["head"]))) > 0


def test_badam_ratio_trains_always_active_leaves_whole():
  params = lists.make_params(2)
  tx = optax_memopt.badam_ratio(1e-2, update_ratio=0.1, always_active=["head"])
  state = tx.init(params)
  assert state.mu["head"].shape == (params["head"].size,)
  assert isinstance(state.index["head"], optax.MaskedNode)
  assert state.mu["embed"].shape == (int(np.ceil(0.1 * params["embed"].size)),)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(jnp.sum(updates["head"] != 0)) == params["head"].size
  assert int(jnp.sum(updates["embed"] != 0)) < params["embed"].size


def test_inject_hyperparams():
  params = lists.make_params(2)
  kwargs = dict(switch_every=2, always_active=["head"], reset_always_active=False, eps=EPS)
  tx = optax.inject_hyperparams(optax_memopt.badam, static_args=("switch_every",))(
      learning_rate=1e-2, **kwargs)
  want = run_drop_in(optax_memopt.badam(1e-2, **kwargs), params, lists.loss_fn, 3, lists.TOKENS)
  got, _ = run_block_step(tx, params, lists.loss_fn, 3, lists.TOKENS)
  chex.assert_trees_all_close(got[-1], want[-1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reset", [True, False])
def test_orbax_resume_is_exact(tmp_path, reset):
  params = lists.make_params(2)
  tx = optax_memopt.badam(1e-2, always_active=["head"], reset_always_active=reset, switch_every=2)
  _checks.assert_resume_is_exact(tx, params, lambda p: jax.grad(lists.loss_fn)(p, lists.TOKENS),
                                 tmp_path, total=6, interrupts=(3,))


# ----------------------------------------------------------------------------- errors


def _init(params, **kwargs):
  return optax_memopt.badam(1e-2, **kwargs).init(params)


def test_errors_name_the_leaf_and_the_way_out():
  params = lists.make_params(2)
  with pytest.raises(ValueError, match="always_active: the expression 'nope' matches no param"):
    _init(params, always_active=["nope"])
  with pytest.raises(TypeError, match="always_active: a single string is ambiguous"):
    optax_memopt.badam(1e-2, always_active="head")
  with pytest.raises(TypeError, match="always_active: a single string is ambiguous"):
    optax_memopt.badam_ratio(1e-2, always_active="head")
  with pytest.raises(ValueError, match=r"always_active: every leaf of block 1 \(layers\.1\.down"):
    _init(params, always_active=[r"layers\.1"])
  with pytest.raises(ValueError, match=r"every leaf of block 0 \(head\) is always active"):
    _init(params, blocks=["head"], always_active=["head"])
  only_head = dict(jax.tree.map(lambda _: -1, params), head=-2)
  with pytest.raises(ValueError, match="every trained leaf is always active and no block is left"):
    _init(params, blocks=only_head)
  with pytest.raises(ValueError, match="the mask selects no parameter; pass always_active=None"):
    _init(params, always_active=lambda p: jax.tree.map(lambda _: False, p))
  with pytest.raises(ValueError, match="always_active: the mask has 1 leaves"):
    _init(params, always_active={"head": True})
  with pytest.raises(TypeError, match="the mask entry of 'embed' is 1"):
    _init(params, always_active=jax.tree.map(lambda _: 1, params))
  with pytest.raises(TypeError, match="reset_always_active .* Python bool"):
    optax_memopt.badam(1e-2, always_active=["head"], reset_always_active=jnp.bool_(True))
  with_step = dict(params, step=jnp.zeros((), jnp.int32))
  with pytest.raises(TypeError, match="always_active: parameter 'step' has dtype int32"):
    _init(with_step, always_active=["step"])
  stacked = scans.make_params()
  labels = optax_memopt.block_labels(stacked)
  labels["layers"]["scale"] = (-2,) + labels["layers"]["scale"][1:]
  with pytest.raises(ValueError, match="per-slice label of 'layers.scale' holds -2"):
    _init(stacked, blocks=labels)


# ----------------------------------------------------------------------------- examples


def test_examples_train_a_new_task_head_at_every_step():
  from examples import finetune_roberta, optimizers, training

  params = {"embeddings": {"word_embeddings": {"embedding": jnp.ones((8, 4))}},
            "layers": {i: {"mlp": {"kernel": jnp.ones((4, 4))}} for i in range(3)},
            "classifier": {"out_proj": {"kernel": jnp.ones((4, 2))}}}
  task = training.Task("t", lambda: None, lambda m, b: None, {}, {}, head=("classifier",),
                       from_scratch=False)
  for name in ("badam", "badam_ratio"):
    tx = optimizers.make_optimizer(finetune_roberta.Config(switch_every=1, warmup_steps=0), name,
                                   params, task)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      head = updates["classifier"]["out_proj"]["kernel"]
      assert int(jnp.sum(head != 0)) == head.size, name
