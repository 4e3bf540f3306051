"""Layer stacks (leaves ``[L, ...]`` run by a scan): labels, BAdam, badam_ratio and resume on them.

The list form of the same model (one subtree per layer) is the reference everywhere: a stacked model
must get the same blocks, the same trajectory and the same state size.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_memopt
from optax_memopt import _blocks, _stacks
from optax_memopt._tree import leaf_paths
from tests import _checks
from tests._models import BATCH, state_bytes
from tests._models import toy_lm_loss as loss_fn
from tests._models import toy_lm_params as make_params


def stack(params):
  """The list-form params of tests.test_badam with the layers stacked into one subtree."""
  return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"]))


def unstack(params, n_layers):
  layers = params["layers"]
  return dict(params, layers=[jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n_layers)])


def block_sizes(labels, params):
  """Parameter count per block, from the flat labels (whole leaves and slices)."""
  leaves = jax.tree_util.tree_leaves(params)
  sizes = {}
  for unit in _blocks.units_of(labels):
    shape = leaves[unit.leaf].shape[0 if unit.index is None else 1:]
    sizes[unit.block] = sizes.get(unit.block, 0) + int(np.prod(shape))
  return sizes


def frozen_paths(labels, params):
  return sorted(p for p, lab in zip(leaf_paths(params), labels)
                if max(_blocks.label_ids(lab)) < 0)


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("n_layers", [3, 5])
def test_dict_stack_labels_match_list_form(n_layers):
  params = make_params(n_layers)
  stacked = stack(params)
  a = _blocks.resolve_blocks(None, params)
  b = _blocks.resolve_blocks(None, stacked)
  # Five leaves per layer, each labelled per slice: block l owns slice l of every stacked leaf.
  labels = optax_memopt.block_labels(stacked)
  assert labels["layers"]["attn"]["q"] == tuple(range(n_layers))
  assert labels["embed"] == -1 and labels["lm_head"] == -1 and labels["final_norm"] == -1
  assert block_sizes(a, params) == block_sizes(b, stacked)
  assert len(block_sizes(b, stacked)) == n_layers
  full = optax_memopt.block_labels(stacked, include_embedding=True, include_lm_head=True)
  assert full["embed"] == 0 and full["layers"]["norm"] == tuple(range(1, n_layers + 1))
  assert full["lm_head"] == n_layers + 1 and full["final_norm"] == n_layers + 1


def _nnx_llama(n_layers, scan):
  from flax import nnx

  from examples.models import llama

  cfg = llama.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                          num_hidden_layers=n_layers, num_attention_heads=2,
                          num_key_value_heads=1, scan_layers=scan)
  return nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)


def _linen(n_layers, form):
  from flax import linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
      x = x + nn.Dense(4)(nn.LayerNorm()(x))
      return nn.Dense(4)(x), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(10, 4)(ids)
      if form == "scan":  # Linen's default name for the scanned module: ScanBlock_0
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=n_layers)()(x, None)
      elif form == "scan_named":
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=n_layers)(name="layers")(x, None)
      elif form == "list_named":
        for i in range(n_layers):
          x, _ = Block(name=f"layers_{i}")(x)
      else:  # automatic names Block_0, Block_1, ...
        for _ in range(n_layers):
          x, _ = Block()(x)
      return nn.Dense(10)(nn.LayerNorm()(x))

  return Model().init(jax.random.key(0), jnp.zeros((2,), jnp.int32))["params"]


def _vmap_stack(n_layers):
  def init_layer(key):
    k1, k2 = jax.random.split(key)
    return {"attn": {"kernel": jax.random.normal(k1, (4, 4))},
            "mlp": {"kernel": jax.random.normal(k2, (4, 8)), "bias": jnp.zeros(8)},
            "norm": {"scale": jnp.ones(4)}}

  keys = jax.random.split(jax.random.key(0), n_layers)
  return {"wte": jnp.zeros((10, 4)), "blocks": jax.vmap(init_layer)(keys),
          "head": {"kernel": jnp.zeros((4, 10))}}


def _vmap_list(n_layers):
  stacked = _vmap_stack(n_layers)
  return dict(stacked, blocks=[jax.tree.map(lambda x, i=i: x[i], stacked["blocks"])
                               for i in range(n_layers)])


@pytest.mark.parametrize("n_layers", [2, 5])
@pytest.mark.parametrize(
    "make_stacked, make_list, frozen",
    [
        (lambda n: _nnx_llama(n, True), lambda n: _nnx_llama(n, False),
         ["embed_tokens.embedding", "lm_head.kernel", "norm.scale"]),
        (lambda n: _linen(n, "scan"), lambda n: _linen(n, "list_auto"),
         ["Dense_0.bias", "Dense_0.kernel", "Embed_0.embedding", "LayerNorm_0.bias",
          "LayerNorm_0.scale"]),
        (lambda n: _linen(n, "scan_named"), lambda n: _linen(n, "list_named"),
         ["Dense_0.bias", "Dense_0.kernel", "Embed_0.embedding", "LayerNorm_0.bias",
          "LayerNorm_0.scale"]),
        (_vmap_stack, _vmap_list, ["head.kernel", "wte"]),
    ],
    ids=["nnx_vmap", "linen_scan", "linen_scan_named", "jax_vmap_dict"],
)
def test_stack_and_list_forms_get_the_same_blocks(n_layers, make_stacked, make_list, frozen):
  stacked, listed = make_stacked(n_layers), make_list(n_layers)
  a = _blocks.resolve_blocks(None, stacked)
  b = _blocks.resolve_blocks(None, listed)
  sizes = block_sizes(a, stacked)
  assert len(sizes) == n_layers  # one block per layer, not one per top-level entry
  assert sizes == block_sizes(b, listed)
  assert len(set(sizes.values())) == 1
  # Embedding and head frozen in both forms.
  assert frozen_paths(a, stacked) == frozen
  assert frozen_paths(b, listed) == frozen
  assert all(isinstance(lab, tuple) and lab == tuple(range(n_layers))
             for lab, p in zip(a, leaf_paths(stacked)) if p not in frozen)


def test_linen_module_names_are_not_layer_indices():
  from flax import linen as nn

  class MLP(nn.Module):  # Dense_0 / Dense_1 / LayerNorm_0 at the top level: no layers here
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.LayerNorm()(nn.relu(nn.Dense(5)(x))))

  params = MLP().init(jax.random.key(0), jnp.zeros((2, 4)))["params"]
  labels = optax_memopt.block_labels(params)
  # The fallback: one block per top-level module, in order; nothing is frozen as "embedding/head".
  assert labels == {"Dense_0": {"bias": 0, "kernel": 0}, "Dense_1": {"bias": 1, "kernel": 1},
                    "LayerNorm_0": {"bias": 2, "scale": 2}}
  # Inside a list of layers, a layer's own Dense_0 / Dense_1 are not layers either.
  listed = _linen(4, "list_named")
  labels = optax_memopt.block_labels(listed)
  assert [labels[f"layers_{i}"]["Dense_1"]["kernel"] for i in range(4)] == [0, 1, 2, 3]
  assert labels["Dense_0"]["kernel"] == -1 and labels["Embed_0"]["embedding"] == -1


def test_explicit_stacks_argument():
  stacked = stack(make_params(4))
  trunk = {"embed": stacked["embed"], "trunk": stacked["layers"], "lm_head": stacked["lm_head"]}
  # "trunk" is not a layer-container name: no layers guessed, one block per top-level entry.
  assert len(block_sizes(_blocks.resolve_blocks(None, trunk), trunk)) == 3
  labels = optax_memopt.block_labels(trunk, stacks="trunk")
  assert labels["trunk"]["mlp"]["up"] == (0, 1, 2, 3) and labels["embed"] == -1
  # stacks=() turns recognition off: the stacked "layers" subtree is then one top-level block.
  off = optax_memopt.block_labels(stacked, stacks=())
  assert off["layers"]["attn"]["q"] == 2  # top-level entries in key order: embed, final_norm, layers
  with pytest.raises(ValueError, match="names no subtree"):
    optax_memopt.block_labels(trunk, stacks="body")
  with pytest.raises(ValueError, match="do not share a layer axis 0"):
    optax_memopt.block_labels(dict(trunk, trunk=dict(trunk["trunk"], extra=jnp.zeros((5, 2)))),
                              stacks=("trunk",))


def test_a_single_layer_under_a_container_name_is_not_a_stack():
  # [4, 4] and [4]: a leading axis 4 shared by accident; a stack needs >= 2 dims in every leaf.
  params = {"embed": jnp.zeros((10, 4)), "layers": {"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}}
  labels = optax_memopt.block_labels(params)
  assert labels == {"embed": 0, "layers": {"w": 1, "b": 1}}


def test_per_slice_label_validation():
  stacked = stack(make_params(3))
  labels = optax_memopt.block_labels(stacked)
  good = jax.tree.map(lambda lab: lab, labels, is_leaf=lambda x: isinstance(x, tuple))
  # Numpy arrays and lists are accepted like tuples.
  good["layers"]["attn"]["q"] = np.array([0, 1, 2])
  good["layers"]["attn"]["o"] = [0, 1, 2]
  assert _blocks.resolve_blocks(good, stacked) == _blocks.resolve_blocks(labels, stacked)
  bad = dict(labels, layers=dict(labels["layers"], norm=(0, 1)))
  with pytest.raises(ValueError, match="'layers.norm' has 2 entries but the leaf has shape"):
    _blocks.resolve_blocks(bad, stacked)
  bad = dict(labels, layers=dict(labels["layers"], norm=np.array([0.0, 1.0, 2.0])))
  with pytest.raises(TypeError, match="layers.norm.*float"):
    _blocks.resolve_blocks(bad, stacked)
  bad = dict(labels, layers=dict(labels["layers"], norm=(0, 1.5, 2)))
  with pytest.raises(TypeError, match="integers only"):
    _blocks.resolve_blocks(bad, stacked)
  bad = dict(labels, layers=dict(labels["layers"], norm=(0, -2, 2)))
  with pytest.raises(ValueError, match=">= 0"):
    _blocks.resolve_blocks(bad, stacked)
  gap = jax.tree.map(lambda lab: tuple(2 * x for x in lab) if isinstance(lab, tuple) else lab,
                     labels, is_leaf=lambda x: isinstance(x, tuple))
  with pytest.raises(ValueError, match="without gaps"):
    optax_memopt.badam(1e-3, blocks=gap).init(stacked)


def test_describe_blocks_lists_slices_and_frozen():
  stacked = stack(make_params(3))
  text = optax_memopt.describe_blocks(stacked)
  lines = text.splitlines()
  assert lines[0].split() == ["block", "params", "bytes", "members"]
  assert len(lines) == 1 + 3 + 1 + 1  # header, three blocks, frozen, summary
  layer = sum(x.size for x in jax.tree.leaves(make_params(3)["layers"][0]))
  assert lines[2].split()[:3] == ["1", f"{layer:,}", f"{4 * layer:,}"]
  assert "layers.attn.q[1]" in lines[2] and "layers.attn.q[0]" not in lines[2]
  assert lines[4].startswith("frozen") and "embed" in lines[4] and "lm_head" in lines[4]
  assert lines[-1] == f"3 blocks; the largest has {layer:,} parameters"


# ----------------------------------------------------------------------------- BAdam on a stack


def stacked_loss(n_layers):
  return lambda params, x: loss_fn(unstack(params, n_layers), x)


def run(tx, params, loss, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  grad = jax.jit(jax.grad(loss))
  actives = []
  for _ in range(steps):
    if optax_memopt._badam.find_block_state(state):
      actives.append(int(optax_memopt.active_block(state)))
    updates, state = update(grad(params, BATCH), state, params)
    params = optax.apply_updates(params, updates)
  return params, state, actives


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_trajectory_equals_list_form(dtype):
  n, k = 3, 2
  params = make_params(n, dtype=dtype)
  # eps 1e-3: the stacked and list gradients are two float32 computations that may differ in the
  # last bit; Adam with a tiny eps would turn that into a full step on near-zero gradients.
  tx = optax_memopt.badam(3e-2, switch_every=k, weight_decay=0.1, seed=3, eps=1e-3)
  want, _, want_actives = run(tx, params, loss_fn, 2 * n * k)
  got, state, actives = run(tx, stack(params), stacked_loss(n), 2 * n * k)
  assert actives == want_actives and sorted(set(actives)) == list(range(n))
  # float32: rounding of two equal computations; bf16: one bf16 ulp of the weights (2^-8 relative)
  # where the master copy's rounding lands differently.
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  chex.assert_trees_all_close(unstack(got, n), want, **tol)
  assert got["layers"]["norm"].dtype == dtype
  # Frozen leaves never move.
  np.testing.assert_array_equal(got["embed"], params["embed"])


def test_several_slices_of_one_leaf_in_one_block():
  n, k = 4, 2
  params = make_params(n)
  list_labels = optax_memopt.block_labels(params)
  for i, layer in enumerate(list_labels["layers"]):
    list_labels["layers"][i] = jax.tree.map(lambda _, i=i: i // 2, layer)
  stacked = stack(params)
  stack_labels = jax.tree.map(lambda lab: (0, 0, 1, 1) if isinstance(lab, tuple) else lab,
                              optax_memopt.block_labels(stacked),
                              is_leaf=lambda x: isinstance(x, tuple))
  opts = dict(switch_every=k, switch_mode="descending", eps=1e-3)  # eps: see above
  want, want_state, _ = run(optax_memopt.badam(3e-2, blocks=list_labels, **opts), params,
                            loss_fn, 2 * 2 * k)
  got, state, _ = run(optax_memopt.badam(3e-2, blocks=stack_labels, **opts), stacked,
                      stacked_loss(n), 2 * 2 * k)
  chex.assert_trees_all_close(unstack(got, n), want, rtol=1e-5, atol=1e-6)
  # Two layers per block: two slot positions per stacked leaf, as in the list form.
  assert state_bytes(state) == state_bytes(want_state)


def test_block_step_on_a_stack_equals_drop_in():
  n, k = 3, 1
  stacked = stack(make_params(n))
  loss = stacked_loss(n)
  tx = optax_memopt.badam(3e-2, switch_every=k, switch_mode="ascending", eps=1e-3)
  want, _, _ = run(tx, stacked, loss, n)
  step = optax_memopt.make_block_step(loss, tx, donate=False)
  params, state = stacked, tx.init(stacked)
  for _ in range(n):
    params, state, _ = step(params, state, BATCH)
  assert sorted(step.compiled_blocks) == [0, 1, 2]
  chex.assert_trees_all_close(params, want, rtol=1e-5, atol=1e-6)  # eps 1e-3: see above


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_state_equals_list_state_and_one_layer(dtype):
  params = make_params(8, width=32, dtype=dtype)
  tx = optax_memopt.badam(1e-3, weight_decay=0.1)
  listed, stacked = state_bytes(tx.init(params)), state_bytes(tx.init(stack(params)))
  assert abs(stacked - listed) <= 0.01 * listed
  layer32 = jax.tree.map(lambda x: x.astype(jnp.float32), params["layers"][0])
  one_layer = state_bytes(optax.adamw(1e-3).init(layer32)) + (
      state_bytes(layer32) if dtype == jnp.bfloat16 else 0)
  assert one_layer <= stacked <= 1.01 * one_layer + 4 * 8 + 24  # + the schedule's scalars/order


def test_drop_in_update_on_a_stack_allocates_no_more_than_the_list_form():
  params = make_params(8, width=64)
  tx = optax_memopt.badam(1e-3)

  def temp_bytes(p):
    state = tx.init(p)
    compiled = jax.jit(tx.update).lower(p, state, p).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  listed, stacked = temp_bytes(params), temp_bytes(stack(params))
  layer = state_bytes(params["layers"][0])
  # The traced block's slices are gathered into the slot and written back with a select along the
  # stack axis: no full-size temporary beyond what the list form's whole-leaf select needs.
  assert stacked <= listed + layer, (stacked, listed)


def test_badam_ratio_and_active_block_on_a_stack():
  n = 3
  params = make_params(n, width=16)
  tx = optax_memopt.badam_ratio(1e-2, update_ratio=0.1, switch_every=2)
  got, state, actives = run(tx, stack(params), stacked_loss(n), 4)
  assert actives == [0, 0, 1, 1]
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), got, stack(params))
  assert all(jax.tree.leaves(moved))
  # A stacked leaf trains a fraction of the whole leaf: about the list form's total.
  listed = state_bytes(tx.init(params))
  assert abs(state_bytes(state) - listed) <= 0.05 * listed


def test_orbax_resume_on_a_stack_is_exact(tmp_path):
  n = 3
  params = stack(make_params(n, dtype=jnp.bfloat16))
  tx = optax_memopt.badam(1e-2, switch_every=2, seed=5)
  grad = jax.grad(stacked_loss(n))
  _checks.assert_resume_is_exact(tx, params, lambda p: grad(p, BATCH), tmp_path, total=10,
                                 interrupts=(3, 5))


# ----------------------------------------------------------------------------- AdaRankGrad


def test_adarankgrad_projects_each_layer_of_a_stack():
  params = stack(make_params(5, width=32))
  state = optax_memopt.scale_by_adarankgrad(max_rank=4).init(params)
  # [L, m, n]: L matrices, each with its own projector, rank and refresh clock.
  assert state.projector["layers"]["mlp"]["up"].shape == (5, 64, 4)
  assert effective_ranks_shape(state) == (5,)
  # [L, d]: plain Adam, not projected across layers.
  assert state.projector["layers"]["norm"] == optax.MaskedNode()
  assert state.mu["layers"]["norm"].shape == (5, 32)


def effective_ranks_shape(state):
  return optax_memopt.effective_ranks(state)["layers.attn.q"].shape


def test_adarankgrad_stacked_state_equals_list_state():
  params = make_params(8, width=32)
  tx = optax_memopt.adarankgrad(1e-3, max_rank=8)
  listed, stacked = state_bytes(tx.init(params)), state_bytes(tx.init(stack(params)))
  assert abs(stacked - listed) <= 0.01 * listed, (stacked, listed)
  assert stacked < 0.5 * state_bytes(optax.adam(1e-3).init(params))


def test_adarankgrad_stacked_updates_equal_list_form():
  n, steps = 3, 6
  params = make_params(n)  # width 8: matrices 8x8, 8x16, 16x8
  # max_rank + oversample = 8 = the short side: the sketch spans the whole column space, so the
  # randomized SVD is exact and the stacked and list runs choose the same subspaces and ranks
  # whatever their random sketches. A refresh at least every 2 steps exercises the moment
  # transformation; eps 1e-3 keeps last-bit gradient differences from becoming full Adam steps.
  tx = optax_memopt.adarankgrad(3e-2, max_rank=4, oversample=4, max_refresh_interval=2,
                                info_threshold=0.95, eps=1e-3)
  want, want_state, _ = run(tx, params, loss_fn, steps)
  got, state, _ = run(tx, stack(params), stacked_loss(n), steps)
  ranks = optax_memopt.effective_ranks(state)
  want_ranks = optax_memopt.effective_ranks(want_state)
  for i in range(n):
    assert int(ranks["layers.mlp.up"][i]) == int(want_ranks[f"layers.{i}.mlp.up"])
  chex.assert_trees_all_close(unstack(got, n), want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(got["layers"]["mlp"]["up"], stack(params)["layers"]["mlp"]["up"])


def test_stack_with_a_per_layer_scalar_is_recognised():
  # Before: the [L] leaf made the whole stack unrecognised: top-level blocks, embedding and head
  # trained, AdaRankGrad projecting the norm scales and giving the kernels plain Adam.
  _, params = _linen_model(3, 0, scalar=True)
  labels = optax_memopt.block_labels(params)
  assert labels["layers"]["alpha"] == (0, 1, 2)
  assert labels["layers"]["Dense_1"]["kernel"] == (0, 1, 2)
  assert labels["Embed_0"]["embedding"] == -1 and labels["Dense_0"]["kernel"] == -1
  ranks = optax_memopt.effective_ranks(optax_memopt.adarankgrad(1e-3, max_rank=2).init(params))
  assert set(ranks) == {"layers.Dense_0.kernel", "layers.Dense_1.kernel"}
  assert ranks["layers.Dense_0.kernel"].shape == (3,)


def _linen_model(n_layers, axis, scalar=False):
  """A small Linen model whose layers run through nn.scan with params on ``axis`` (with
  ``scalar``, each layer also has a scalar parameter: ``[L]`` once stacked), and its init."""
  from flax import linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
      y = nn.Dense(5)(nn.relu(nn.Dense(8)(nn.LayerNorm()(x))))
      if scalar:
        y = y * self.param("alpha", nn.initializers.ones, ())
      return x + y, None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(10, 5)(ids)
      x, _ = nn.scan(Block, variable_axes={"params": axis}, split_rngs={"params": True},
                     length=n_layers)(name="layers")(x, None)
      return nn.Dense(10)(x)

  model = Model()
  return model, model.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))["params"]


def _to_axis_one(params):
  """Axis-0 Linen params with the stack's layer axis moved to axis 1 (1-D leaves [L] stay)."""
  moved = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1) if x.ndim >= 2 else x, params["layers"])
  return dict(params, layers=moved)


def _linen_loss(model):
  def loss(params, ids):
    logits = model.apply({"params": params}, ids)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, (ids + 1) % 10))
  return loss


def _run(tx, loss, params, steps=4):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params, BATCH[:4] % 10)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_stack_scanned_on_axis_one_is_recognised():
  # MaxText's param_scan_axis: 1 gives kernels [d, L, f] and norm scales [d, L]. Before: refused
  # (block_labels, badam, adarankgrad, badam_ratio) or trained as top-level blocks.
  _, params = _linen_model(3, 1)
  assert params["layers"]["Dense_1"]["kernel"].shape == (5, 3, 8)
  labels = optax_memopt.block_labels(params)
  for lab in jax.tree_util.tree_leaves(labels["layers"], is_leaf=lambda x: isinstance(x, tuple)):
    assert lab == (0, 1, 2) and _stacks.label_axis(lab) == 1
  assert labels["Embed_0"]["embedding"] == -1 and labels["Dense_0"]["kernel"] == -1
  # Declared, with the axis or without it (found from the shapes), slashed paths too: the same.
  for stacks in ({"layers": 1}, "layers", ["layers"]):
    assert optax_memopt.block_labels(params, stacks=stacks) == labels
  nested = {"decoder": {"layers": params["layers"]}}
  assert optax_memopt.block_labels(nested, stacks={"decoder/layers": 1})["decoder"] == {
      "layers": labels["layers"]}
  # The same blocks as the axis-0 stack, each member shown as the slice [:, l] of its leaf.
  _, params0 = _linen_model(3, 0)
  table = optax_memopt.describe_blocks(params)
  assert "layers.Dense_0.kernel[:, 2]" in table
  assert [r.split()[:3] for r in table.splitlines()] == [
      r.split()[:3] for r in optax_memopt.describe_blocks(params0).splitlines()]


def test_axis_one_stack_declared_with_a_wrong_axis_is_refused():
  _, params = _linen_model(3, 1)
  with pytest.raises(ValueError, match="do not share a layer axis 0.*stacks=\\{'layers': 1\\}"):
    optax_memopt.block_labels(params, stacks={"layers": 0})
  with pytest.raises(ValueError, match="do not share a layer axis 2"):
    optax_memopt.badam(1e-3, blocks=lambda p: optax_memopt.block_labels(p, stacks={"layers": 2})
                       ).init(params)
  with pytest.raises(ValueError, match="layer axis of 'layers' must be an int >= 0"):
    optax_memopt.adarankgrad(1e-3, stacks={"layers": -1}).init(params)
  stacked = {"layers": {"w": jnp.zeros((3, 4, 5))}}
  with pytest.raises(ValueError, match=r"3 entries but the leaf has shape \(3, 4, 5\).*axis \(1\)"):
    optax_memopt.badam(1e-3, blocks={"layers": {"w": optax_memopt.StackLabels((0, 1, 2), axis=1)}}
                       ).init(stacked)


def test_per_layer_scalar_in_an_axis_one_stack():
  # [L] scalars next to [d, L, f] kernels: the stack is still recognised, the scalar sliced on axis 0.
  params = {"embed": jnp.zeros((10, 4)),
            "layers": {"w": jnp.zeros((4, 3, 6)), "v": jnp.zeros((6, 3, 4)), "alpha": jnp.ones(3)}}
  labels = optax_memopt.block_labels(params)
  assert labels["layers"]["alpha"] == (0, 1, 2) and _stacks.label_axis(labels["layers"]["alpha"]) == 0
  assert _stacks.label_axis(labels["layers"]["w"]) == 1 and labels["embed"] == -1


@pytest.mark.parametrize("switch_mode", ["random", "descending"])
def test_badam_on_an_axis_one_stack_equals_axis_zero(switch_mode):
  # The same model with its layers on axis 0 and on axis 1: the same block order and, up to the
  # layout, the same trajectory; the state is one layer's in both. The two losses compute the same
  # numbers on transposed storage, so they agree to float32 rounding of a few Adam steps.
  model0, params0 = _linen_model(3, 0)
  model1, _ = _linen_model(3, 1)
  params1 = _to_axis_one(params0)
  tx = lambda: optax_memopt.badam(1e-2, switch_every=1, switch_mode=switch_mode, eps=1e-3)
  got0, state0 = _run(tx(), _linen_loss(model0), params0)
  got1, state1 = _run(tx(), _linen_loss(model1), params1)
  assert int(optax_memopt.active_block(state0)) == int(optax_memopt.active_block(state1))
  chex.assert_trees_all_close(_to_axis_one(got0), got1, rtol=1e-5, atol=1e-6)
  # Every layer was trained (4 steps over 3 blocks) and the state holds one layer.
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), got1, params1)
  assert all(jax.tree_util.tree_leaves(moved["layers"]))
  assert not any(jax.tree_util.tree_leaves(moved["Embed_0"]))
  assert state_bytes(state1) == state_bytes(state0)
  one_layer = sum(x.size * 4 for x in jax.tree_util.tree_leaves(params0["layers"])) // 3
  moments = _badam_slot_arrays(state1)  # Adam's mu and nu: two layers' worth
  assert sum(x.size * 4 for x in moments) == 2 * one_layer


def _badam_slot_arrays(state):
  found = [s for s in optax_memopt._badam.find_block_state(state)]
  return [x for x in jax.tree_util.tree_leaves(found[0].inner_state) if x.ndim >= 1]


def test_badam_ratio_on_an_axis_one_stack_equals_axis_zero():
  # The same entries of each layer's slice in both layouts: identical numbers (no reduction).
  model0, params0 = _linen_model(3, 0)
  model1, _ = _linen_model(3, 1)
  tx = lambda: optax_memopt.badam_ratio(1e-2, update_ratio=0.3, min_size=4, weight_decay=0.1,
                                        eps=1e-3)
  got0, _ = _run(tx(), _linen_loss(model0), params0)
  got1, _ = _run(tx(), _linen_loss(model1), _to_axis_one(params0))
  chex.assert_trees_all_close(_to_axis_one(got0), got1, rtol=1e-5, atol=1e-6)


def test_adarankgrad_on_an_axis_one_stack_projects_each_layer():
  # Kernels [d, L, f] are L matrices (batch axis 1); norm scales [d, L] get plain Adam.
  model0, params0 = _linen_model(3, 0)
  model1, params1 = _linen_model(3, 1)
  params1 = _to_axis_one(params0)
  tx = lambda: optax_memopt.adarankgrad(1e-2, max_rank=2, eps=1e-3)
  ranks = optax_memopt.effective_ranks(tx().init(params1))
  assert set(ranks) == {"layers.Dense_0.kernel", "layers.Dense_1.kernel"}
  assert ranks["layers.Dense_1.kernel"].shape == (3,)  # one subspace per layer
  got0, _ = _run(tx(), _linen_loss(model0), params0, steps=3)
  got1, _ = _run(tx(), _linen_loss(model1), params1, steps=3)
  # The randomized SVD sees each layer's matrix in the same orientation in both layouts; the
  # matmuls on transposed storage differ in float32 rounding only (eps=1e-3 keeps Adam's division
  # away from tiny second moments).
  chex.assert_trees_all_close(_to_axis_one(got0), got1, rtol=1e-4, atol=1e-5)
  assert not np.allclose(got1["layers"]["Dense_0"]["kernel"], params1["layers"]["Dense_0"]["kernel"])


def test_step_builders_refuse_an_axis_one_stack_in_one_line():
  model1, params1 = _linen_model(3, 1)
  loss = _linen_loss(model1)
  tx = optax_memopt.badam(1e-2, switch_every=1)
  step = optax_memopt.make_block_step(loss, tx, donate=False)
  with pytest.raises(ValueError, match=r"^make_block_step: 'layers\.\S+' is in a layer stack on axis 1"
                     r".*scans axis 0.*jax\.grad and tx\.update") as e:
    step(params1, tx.init(params1), BATCH[:4] % 10)
  assert "\n" not in str(e.value)
  adam = optax.adam(1e-2)
  layerwise = optax_memopt.make_layerwise_step(loss, adam, donate=False)
  with pytest.raises(ValueError, match="^make_layerwise_step: .* layer stack on axis 1"):
    layerwise(params1, adam.init(params1), BATCH[:4] % 10)


def test_encoder_blocks_come_before_decoder_blocks():
  # A dict flattens its keys alphabetically (decoder first); blocks go from input to output.
  enc = {"w": jnp.zeros((2, 4, 4)), "v": jnp.zeros((2, 4, 8))}
  dec = {"w": jnp.zeros((3, 4, 4)), "v": jnp.zeros((3, 4, 8))}
  params = {"embed": jnp.zeros((10, 4)), "encoder": {"layers": enc}, "decoder": {"layers": dec}}
  labels = optax_memopt.block_labels(params)
  assert labels["encoder"]["layers"]["w"] == (0, 1) and labels["decoder"]["layers"]["w"] == (2, 3, 4)
