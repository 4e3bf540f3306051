"""Sharded training on a simulated 8-device CPU mesh (data=2 FSDP x model=4 tensor parallel).

A small Llama's params are placed by ``examples.sharding.LLAMA_RULES``. For each optimizer the tests
check that the state's shardings follow the parameters', that an update keeps the state's shardings
and shapes, that the results equal the unsharded run, and -- from the compiled HLO -- how many bytes
the collectives of one step move, against the parameter bytes and one block's bytes.

The measured figures are printed (``pytest -s``, lines starting ``[collectives]``): bytes are the
summed per-device result shapes of all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute in the compiled module.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import optax_memopt
from examples import sharding
from examples.models.llama import Llama, LlamaConfig
from optax_memopt import adarankgrad
from tests._checks import batched_lapack_calls

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
BATCH, SEQ = 4, 16
# Sharded vs single-device results. With the same gradients fed to both (the update tests), only the
# rounding of the update arithmetic and of AdaRankGrad's sharded projection differ: a few float32 ulps
# of parameters of size ~0.1-1 after 3 updates, far inside TOL.
TOL = dict(rtol=2e-5, atol=2e-6)
# When each side computes its own gradients (the block-step test), the sharded reductions round in
# another order (and the order depends on the CPU), the parameters drift apart by a rounding and the
# next gradients differ by dg; Adam turns that into a step error of at most lr * dg / eps. With
# eps=1e-3, lr=1e-2 and |dg| <~ 1e-7 that is <= 1e-6 per update, 4e-6 over 4 updates: TRAIN_TOL leaves
# 5x headroom and is 500x below the lr=1e-2 step a wrong block or a wrong gradient would make.
TRAIN_EPS = 1e-3
TRAIN_TOL = dict(rtol=2e-5, atol=2e-5)


def optimizers():
  return {
      "badam": optax_memopt.badam(1e-2, switch_every=2, switch_mode="ascending",
                                  weight_decay=0.1),
      "block_coordinate": optax_memopt.block_coordinate(
          optax.adam(1e-2), switch_every=2, switch_mode="descending"),
      "badam_ratio": optax_memopt.badam_ratio(1e-2, update_ratio=0.25, switch_every=2),
      # Every matrix projected (not only the layers', the default), so that the sharded
      # projections of the vocabulary-sharded embedding and LM head are covered too; no rank floor
      # (min_rank=1), the configuration these sharding and tolerance checks were written for.
      "adarankgrad": adarankgrad(1e-2, max_rank=8, min_rank=1, projection_mask=None),
      "adamw": optax.adamw(1e-2),
  }


@functools.lru_cache(maxsize=1)
def model_parts():
  model = Llama(LlamaConfig(**CFG), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, state, nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=1)
def mesh():
  assert jax.device_count() >= 8, "the root conftest.py sets jax_num_cpu_devices=8"
  return sharding.make_mesh("data=2,model=4", devices=jax.devices()[:8])


def params():
  return model_parts()[2]


def loss_fn(params, ids):
  graphdef, state, _ = model_parts()
  state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(state, params)
  logits = nnx.merge(graphdef, state)(ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


TOKENS = (np.arange(BATCH * SEQ).reshape(BATCH, SEQ) * 37 + 5) % CFG["vocab_size"]


def grads_like(params, seed=1):
  """Gradients with the decaying spectrum of real ones (rank 3 plus noise for matrices): with a flat
  spectrum the leading subspace AdaRankGrad finds would hinge on float32 rounding."""
  leaves, treedef = jax.tree.flatten(params)
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(leaves)))

  def one(x):
    noise = 0.01 * jax.random.normal(next(keys), x.shape, x.dtype)
    if x.ndim != 2:
      return jax.random.normal(next(keys), x.shape, x.dtype) + noise
    u = jax.random.normal(next(keys), (x.shape[0], 3))
    v = jax.random.normal(next(keys), (3, x.shape[1]))
    return (u * jnp.array([1.0, 0.5, 0.25])) @ v + noise

  return treedef.unflatten([one(x) for x in leaves])


def nbytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# --- collectives in the compiled HLO ----------------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*([^\n]+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(-done)?\("
)
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text):
  """``{op: total bytes of the result shapes}`` over the collectives of a compiled HLO module.

  Shapes are per device (after SPMD partitioning). Asynchronous pairs are counted once, at their
  ``-done``; an op inside a conditional's branches is counted once per branch, so for a
  ``lax.switch`` over blocks this over-counts (an upper bound on what one step moves).
  """
  out = {}
  for m in _COLLECTIVE.finditer(hlo_text):
    size = sum(_ITEMSIZE[dt] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dt, dims in _SHAPE.findall(m.group(1)))
    out[m.group(2)] = out.get(m.group(2), 0) + size
  return out


def test_collective_bytes_parser():
  text = """
  %ag = f32[64,64]{1,0} all-gather(f32[32,64]{1,0} %p), replica_groups={{0,1}}, dimensions={0}
  %ar = (f32[8]{0}, /*index=1*/s32[2]{0}) all-reduce(f32[8]{0} %a, s32[2]{0} %b), to_apply=%add
  %s = (f32[4]{0}, f32[8]{0}) collective-permute-start(f32[4]{0} %x), source_target_pairs={{0,1}}
  %d = f32[8]{0} collective-permute-done((f32[4]{0}, f32[8]{0}) %s)
  %rs = bf16[16]{0} reduce-scatter(bf16[128]{0} %y), dimensions={0}
  """
  assert collective_bytes(text) == {"all-gather": 64 * 64 * 4, "all-reduce": 8 * 4 + 2 * 4,
                                    "collective-permute": 32, "reduce-scatter": 32}


MEASURED = {}


def report(name, hlo_text):
  by_op = collective_bytes(hlo_text)
  total = sum(by_op.values())
  MEASURED[name] = total
  block = nbytes(params()["layers"][0])
  print(f"\n[collectives] {name}: {total} B per step per device ({by_op}); "
        f"params {nbytes(params())} B, one block {block} B")
  return total


# --- partition rules and the mesh -------------------------------------------------------------

def test_make_mesh_parses_specs():
  m = mesh()
  assert dict(m.shape) == {"data": 2, "model": 4}
  assert dict(sharding.make_mesh("data=-1,model=2", devices=jax.devices()[:8]).shape) == {
      "data": 4, "model": 2}
  for bad in ("data=3,model=4", "data", "data=2,data=4", "data=x,model=4", "data=-1,model=-1"):
    with pytest.raises(ValueError):
      sharding.make_mesh(bad, devices=jax.devices()[:8])


def test_partition_rules():
  p = sharding.shard_params(params(), mesh())
  specs = {sharding.leaf_path(path): x.sharding.spec
           for path, x in jax.tree_util.tree_leaves_with_path(p)}
  assert specs["layers.1.self_attn.q_proj.kernel"] == P("data", "model")
  assert specs["layers.1.self_attn.o_proj.kernel"] == P("model", "data")
  assert specs["layers.0.mlp.gate_proj.kernel"] == P("data", "model")
  assert specs["layers.0.mlp.down_proj.kernel"] == P("model", "data")
  assert specs["embed_tokens.embedding"] == P("model", "data")
  assert specs["lm_head.kernel"] == P("data", "model")
  assert specs["layers.0.input_layernorm.scale"] == P(None)
  # A stacked (scanned) layer keeps its stack axis whole; a dimension the mesh does not divide
  # stays unsharded.
  assert sharding.spec_for("layers.self_attn.q_proj.kernel", (3, 64, 64), mesh()) == P(
      None, "data", "model")
  assert sharding.spec_for("layers.0.mlp.up_proj.kernel", (64, 6), mesh()) == P("data", None)
  # Every device holds 1/8 of each matrix.
  q = p["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert {s.data.shape for s in q.addressable_shards} == {(32, 16)}
  # ShapeDtypeStructs get their shardings too.
  abstract = sharding.shard_params(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params()), mesh())
  assert abstract["lm_head"]["kernel"].sharding.spec == P("data", "model")


# --- optimizer states on sharded params -------------------------------------------------------

def assert_adarankgrad_specs(inner, params_tree, spec_of):
  """AdaRankGrad's state follows its parameters: a matrix seen as ``[M, N]``, ``M >= N`` (transposed
  if it is wide), has its projector ``[M, R]`` sharded like the parameter's M axis and its moments
  ``[R, N]`` like its N axis, R unsharded; a vector's moments are sharded like the vector."""
  flat = {sharding.leaf_path(path): x for path, x in jax.tree_util.tree_leaves_with_path(params_tree)}
  got = {field: {sharding.leaf_path(path): spec_of(x)
                 for path, x in jax.tree_util.tree_leaves_with_path(getattr(inner, field))}
         for field in ("mu", "nu", "projector")}
  for path, x in flat.items():
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    if x.ndim != 2:
      assert got["mu"][path] == got["nu"][path] == P(*spec), (path, spec, got["mu"][path])
      assert path not in got["projector"]
      continue
    rows, cols = spec if x.shape[0] >= x.shape[1] else spec[::-1]
    assert got["projector"][path] == P(rows, None), (path, spec, got["projector"][path])
    assert got["mu"][path] == got["nu"][path] == P(None, cols), (path, spec, got["mu"][path])
  # Spelled out: q_proj [64, 64] P('data', 'model') is M=64 rows on 'data', N=64 columns on
  # 'model'; o_proj P('model', 'data') the other way round; gate_proj [64, 128] P('data', 'model') is
  # wide, so M is its 128 columns ('model') and N its 64 rows ('data').
  for path, proj, mom in (("layers.0.self_attn.q_proj.kernel", P("data", None), P(None, "model")),
                          ("layers.1.self_attn.o_proj.kernel", P("model", None), P(None, "data")),
                          ("layers.0.mlp.gate_proj.kernel", P("model", None), P(None, "data"))):
    assert (got["projector"][path], got["mu"][path]) == (proj, mom), path


def assert_same_shardings(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.shape == y.shape
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def slot_leaves(tx_name, state):
  """The state leaves that stand for parameters (moments, slot, master), by optimizer."""
  if tx_name in ("badam", "block_coordinate"):
    return state.inner_state
  if tx_name == "badam_ratio":
    return (state.mu, state.nu)
  if tx_name == "adarankgrad":
    return (state[0].mu, state[0].nu, state[0].projector)
  return (state[0].mu, state[0].nu)


@pytest.mark.parametrize("name", ["badam", "block_coordinate", "badam_ratio", "adarankgrad",
                                  "adamw"])
def test_state_sharding_init_update_and_results(name):
  tx = optimizers()[name]
  m = mesh()
  sharded = sharding.shard_params(params(), m)
  grads = sharding.shard_params(grads_like(params()), m)

  # The shardings the optimizer gives its state, derived abstractly from ShapeDtypeStructs.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          sharded)
  expected = sharding.state_shardings(tx, abstract, m)
  state = sharding.init_state(tx, sharded, m)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  # jit(init).lower on the abstract inputs compiles to the same output shardings.
  lowered = jax.jit(tx.init, out_shardings=expected).lower(abstract).compile()
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(lowered.output_shardings), strict=True):
    assert x.sharding.is_equivalent_to(s, x.ndim)

  if name in ("badam", "block_coordinate", "adamw"):
    # Every moment / slot array is sharded exactly like the parameters it stands for: the slot of
    # block b holds layer b's leaves, whose shardings are the same for every layer.
    like = sharded["layers"][0] if name != "adamw" else sharded
    param_specs = [str(x.sharding.spec) for x in jax.tree.leaves(like)]
    moments = [x for x in jax.tree.leaves(slot_leaves(name, state)) if x.ndim]
    assert sorted(str(x.sharding.spec) for x in moments) == sorted(param_specs * 2)
  if name == "adarankgrad":
    assert_adarankgrad_specs(state[0], sharded, lambda x: x.sharding.spec)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(slot_leaves(name, state))}
    print(f"\n[state shardings] adarankgrad moments/projectors: {specs}")
  if name == "badam_ratio":
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(slot_leaves(name, state))}
    print(f"\n[state shardings] badam_ratio [n]-vectors: {specs}")

  # Three updates (one crosses a block / selection switch): shardings and shapes never change, and
  # the results equal the unsharded run.
  step = jax.jit(tx.update).lower(grads, state, sharded).compile()
  ref_state = tx.init(params())
  ref_params, ref_grads = params(), grads_like(params())
  ref_step = jax.jit(tx.update)
  p = sharded
  for i in range(3):
    g = jax.tree.map(lambda x, c=1.0 + i: x * c, grads)
    updates, new_state = step(g, state, p)
    assert_same_shardings(state, new_state)
    assert_same_shardings(p, updates)
    state, p = new_state, optax.apply_updates(p, updates)
    ref_updates, ref_state = ref_step(jax.tree.map(lambda x, c=1.0 + i: x * c, ref_grads),
                                      ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
  assert_same_shardings(sharded, p)
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
  # Moments and projectors: second moments are squares (twice the relative rounding of the
  # gradients) and a randomized-SVD basis built from sharded reductions rotates by a rounding within
  # near-equal singular values, hence rtol=1e-4 here; a wrongly sharded or stale state is off by O(1).
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)

  # Collectives of one compiled update.
  total = report(f"{name} update", step.as_text())
  whole = whole_matrices(collective_shapes(step.as_text()))
  print(f"[collectives] {name} update: {len(whole)} collectives return a whole weight matrix")
  assert not whole, whole
  if name in ("badam", "block_coordinate", "adamw"):
    assert total == 0  # elementwise on co-sharded arrays: nothing to communicate
  if name == "badam_ratio":
    # Gathering the selected entries of g and p out of 2-D shards: one all-reduce per mesh axis
    # of the [n]-vectors, 4x the selected bytes (about update_ratio of the params), never a whole
    # parameter.
    selected = nbytes(state.mu)
    assert total <= 4 * selected + 1024, (total, selected)
    assert total < nbytes(params()), total
  if name == "adarankgrad":
    # No whole matrix (nor a whole projector or moment) moves: every collective result is a thin
    # panel, at most l = max_rank + oversample wide in one of its two dimensions. The randomized
    # range finder replicates its sketches for the QRs, [M, l] (1 + power_iters times) and
    # [N, l] (power_iters times), and the small SVD's Q^T G [l, N]; the rest are all-reduces of
    # partial products (sketch slices, the projected gradient Q^T G [R, N], Q_new^T Q_old [R, R])
    # and norms. Bound the bytes by the projected sizes plus the sketch, over all matrices.
    rank, sketch, power_iters = 8, 8 + 8, 1  # max_rank, max_rank + oversample, the defaults
    shapes = collective_shapes(step.as_text())
    assert all(len(s) <= 2 and (len(s) < 2 or min(s) <= sketch) for s in shapes), shapes
    sketched = projected = 0
    for x in jax.tree.leaves(params()):
      if x.ndim == 2:
        big, small = max(x.shape), min(x.shape)
        sketched += 4 * sketch * ((1 + power_iters) * big + power_iters * small + small)
        projected += 4 * rank * (big + small)
    print(f"[collectives] adarankgrad update: {total / (sketched + projected):.2f} x the sketch + "
          f"projected bytes ({sketched} + {projected} B), {total / nbytes(params()):.2f} x the "
          "parameter bytes")
    assert total <= 1.5 * (sketched + projected), (total, sketched, projected)
    # The sketch lives in the refresh branch of a lax.cond: a step that refreshes no subspace only
    # all-reduces the projected gradients and a few norms.
    steady = sum(collective_bytes(outside_conditionals(step.as_text())).values())
    print(f"[collectives] adarankgrad update without a refresh: {steady} B per step per device")
    assert steady <= projected, (steady, projected)
    assert total <= 1.5 * nbytes(params()), total


# --- make_block_step on sharded params --------------------------------------------------------

def collective_shapes(hlo_text):
  """Every array shape (dims tuple) in the results of the collectives of a compiled HLO module."""
  return [tuple(int(d) for d in dims.split(",") if d)
          for m in _COLLECTIVE.finditer(hlo_text) for _, dims in _SHAPE.findall(m.group(1))]


def outside_conditionals(hlo_text):
  """The HLO text minus the computations run by conditionals' branches (and what they call): what
  runs at every step, whichever branch is taken."""
  comps, name = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      name = head.group(1)
      comps[name] = []
    elif name:
      comps[name].append(line)
  todo = [b.strip().lstrip("%") for lines in comps.values() for line in lines
          if " conditional(" in line
          for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
          for b in group.split(",")]
  todo += [b for lines in comps.values() for line in lines if " conditional(" in line
           for b in re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)]
  inside = set()
  while todo:
    name = todo.pop()
    if name in inside or name not in comps:
      continue
    inside.add(name)
    todo += [c for line in comps[name]
             for c in re.findall(r"(?:calls|to_apply|body|condition|computation)=%?([\w.\-]+)", line)]
  return "\n".join(line for name, lines in comps.items() if name not in inside for line in lines)


def whole_matrices(shapes):
  """The shapes among ``shapes`` that are a whole (unsharded) weight matrix of the model."""
  full = {x.shape for x in jax.tree.leaves(params()) if x.ndim == 2}
  return [s for s in shapes if s in full]


def test_block_step_keeps_params_sharded():
  m = mesh()
  # eps=TRAIN_EPS: Adam normalises tiny gradient entries, amplifying the float32 rounding differences
  # of sharded reductions (with eps=1e-8 a few entries differ by 3e-6 after 4 steps at lr 1e-2).
  tx = optax_memopt.badam(1e-2, switch_every=2, switch_mode="ascending", eps=TRAIN_EPS)
  # A copy: device_put may alias a single-device buffer into the replicated leaves, and the step
  # donates its inputs.
  p = sharding.shard_params(jax.tree.map(jnp.copy, params()), m)
  ids = jax.device_put(jnp.asarray(TOKENS), sharding.batch_sharding(m))
  state = sharding.init_state(tx, p, m)
  param_sh = jax.tree.map(lambda x: x.sharding, p)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step = optax_memopt.make_block_step(loss_fn, tx)
  ref_step = optax_memopt.make_block_step(loss_fn, tx, donate=False)
  ref_p, ref_state = params(), tx.init(params())

  lowered = step.lower(0, p, state, ids).compile()
  for x, s in zip(jax.tree.leaves(lowered.output_shardings[0]), jax.tree.leaves(param_sh),
                  strict=True):
    assert x.is_equivalent_to(s, len(s.spec))
  block_text = lowered.as_text()

  for _ in range(4):  # blocks 0, 0, 1, 1
    p, state, loss = step(p, state, ids)
    ref_p, ref_state, ref_loss = ref_step(ref_p, ref_state, jnp.asarray(TOKENS))
    for x, s in zip(jax.tree.leaves(p), jax.tree.leaves(param_sh), strict=True):
      assert x.sharding.is_equivalent_to(s, x.ndim)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
      assert x.sharding.is_equivalent_to(s, x.ndim)
    # A scalar mean over 64 tokens: reduction order changes it by ~1e-7 relative.
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  assert sorted(step.compiled_blocks) == [0, 1]
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(p),
                                                             jax.tree.leaves(ref_p)))
  print(f"\n[results] block step, sharded vs unsharded after 4 steps: max |diff| {diff:.2e}")
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TRAIN_TOL)

  # The reference: a full AdamW train step (jax.grad of everything) on the same mesh.
  adamw = optax.adamw(1e-2)

  def adamw_step(params, state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    updates, state = adamw.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  adamw_state = sharding.init_state(adamw, p, m)
  adamw_text = jax.jit(adamw_step).lower(p, adamw_state, ids).compile().as_text()

  block = report("badam block step (forward + block backward + update)", block_text)
  full = report("adamw train step (forward + backward + update)", adamw_text)
  # The block step moves no more than a full step, and nothing in it is a whole weight matrix:
  # no collective rebuilds a replicated copy of a parameter (FSDP's per-layer all-gathers return
  # the 'model'-sharded slice).
  assert block <= full
  assert not whole_matrices(collective_shapes(block_text)), whole_matrices(
      collective_shapes(block_text))


@pytest.mark.parametrize("name", ["badam", "block_coordinate", "badam_ratio", "adarankgrad",
                                  "adamw"])
def test_explicit_sharding_types(name):
  """Sharding in types (an ``Explicit`` mesh, as optax's own sharding tests): init and update keep
  every state leaf's type, sharding included, and the slot is typed like its parameters."""
  tx = optimizers()[name]
  exp = sharding.explicit_mesh(mesh())
  with jax.set_mesh(exp):
    p = sharding.shard_params(params(), exp)
    g = sharding.shard_params(grads_like(params()), exp)
    state0 = jax.jit(tx.init)(p)
    try:
      _, state1 = jax.jit(tx.update)(g, state0, p)
    except Exception as e:  # jax's ShardingTypeError; reported, see examples/sharding.py
      assert type(e).__name__ == "ShardingTypeError", e
      print(f"\n[explicit mesh] {name}: update needs sharding annotations: {str(e)[:120]}")
      assert name == "badam_ratio"
      return
  assert jax.tree.map(jax.typeof, state0) == jax.tree.map(jax.typeof, state1)
  if name == "adarankgrad":
    assert_adarankgrad_specs(state0[0], p, lambda x: jax.typeof(x).sharding.spec)
    return
  moments = [x for x in jax.tree.leaves(slot_leaves(name, state0)) if x.ndim]
  if name == "badam_ratio":  # [n]-vectors of selected entries: replicated by design
    assert {str(jax.typeof(x).sharding.spec) for x in moments} == {"P(None,)"}
    return
  like = p["layers"][0] if name != "adamw" else p
  assert sorted(str(jax.typeof(x).sharding.spec) for x in moments) == sorted(
      [str(x.sharding.spec) for x in jax.tree.leaves(like)] * 2)


# --- a scanned (stacked) Llama ----------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def stacked_parts():
  # Three layers (not the list model's two), stacked into [3, ...] leaves by nnx.vmap.
  model = Llama(LlamaConfig(**dict(CFG, num_hidden_layers=3), scan_layers=True), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, state, nnx.to_pure_dict(state)


def stacked_loss_fn(params, ids):
  graphdef, state, _ = stacked_parts()
  state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(state, params)
  logits = nnx.merge(graphdef, state)(ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.mark.parametrize("name", ["badam", "adarankgrad"])
def test_stacked_llama_state_sharding_and_bounded_collectives(name):
  tx = optimizers()[name]
  m = mesh()
  plain = stacked_parts()[2]
  sharded = sharding.shard_params(plain, m)
  assert sharded["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "data", "model")
  grads = sharding.shard_params(grads_like(plain), m)
  state = sharding.init_state(tx, sharded, m)
  if name == "badam":
    # The slot holds one layer slice per stacked leaf, sharded like that slice (stack axis dropped).
    slice_specs = sorted(str(P(*x.sharding.spec[1:])) for x in jax.tree.leaves(sharded["layers"]))
    moments = [x for x in jax.tree.leaves(state.inner_state) if x.ndim]
    assert sorted(str(x.sharding.spec) for x in moments) == sorted(slice_specs * 2)
  else:
    inner = state[0]
    # [L, M, N]: L projectors [L, M, R] sharded like the layer's M axis, the stack axis whole.
    assert inner.projector["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(
        None, "data", None)
    assert inner.mu["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == 3
    assert inner.projector["layers"]["input_layernorm"]["scale"] == optax.MaskedNode()

  step = jax.jit(tx.update).lower(grads, state, sharded).compile()
  ref_step, ref_state, p, ref_p = jax.jit(tx.update), tx.init(plain), sharded, plain
  for i in range(3):  # crosses a block switch (switch_every=2)
    updates, new_state = step(jax.tree.map(lambda x, c=1.0 + i: x * c, grads), state, p)
    assert_same_shardings(state, new_state)
    assert_same_shardings(p, updates)
    state, p = new_state, optax.apply_updates(p, updates)
    ref_updates, ref_state = ref_step(
        jax.tree.map(lambda x, c=1.0 + i: x * c, grads_like(plain)), ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, ref_updates)
  # AdaRankGrad's subspace comes from a randomized SVD whose small eigendecomposition (eigh of a
  # Gram matrix, see linalg._small_svd) turns the sharded reductions' different rounding into a
  # projector error of ~1e-4 at most; at lr 1e-2 that moves an update by ~1e-6 per step, 3e-6
  # over these 3 steps (measured: 2.1e-6). atol 1e-5 covers it, 1000x below one step's size.
  tol = dict(TOL, atol=1e-5) if name == "adarankgrad" else TOL
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)

  total = report(f"{name} update, stacked llama", step.as_text())
  stacked_leaves = {x.shape for x in jax.tree.leaves(plain)}
  slices = {x.shape[1:] for x in jax.tree.leaves(plain["layers"])}
  whole = [s for s in collective_shapes(step.as_text()) if s in stacked_leaves | slices]
  assert not whole, whole  # no collective returns a whole stack, layer slice or matrix
  if name == "badam":
    assert total == 0  # slicing and writing back along the unsharded stack axis is local
  else:
    assert total <= 1.5 * nbytes(plain), total


def low_rank_stack(key, shape, rank=3):
  """``[L, m, n]``: per layer a rank-``rank`` matrix with a decaying spectrum, plus a little noise."""
  ku, kv, kn = jax.random.split(key, 3)
  u = jax.random.normal(ku, shape[:-1] + (rank,)) * 0.5 ** jnp.arange(rank)
  return u @ jax.random.normal(kv, shape[:1] + (rank, shape[-1])) + 0.01 * jax.random.normal(kn, shape)


def test_adarankgrad_refresh_of_sharded_stacks_leaves_the_cpu_devices_running():
  # A refresh of stacked [L, M, N] leaves factorises [L, M, l] panels. jaxlib's CPU LAPACK kernels
  # split a batch with this much work (over 2e5 flops) over XLA's intra-op thread pool and block
  # their thread until it is done; the simulated devices run on that pool (one thread per core),
  # so once the blocked devices held every thread the step hung for good (`finetune_llama.py
  # --scan-layers --optimizer adarankgrad --mesh data=4`). The compiled update must hand LAPACK
  # one matrix at a time; that is checked on the HLO before the update runs, so that a regression
  # fails here instead of hanging the suite.
  m = mesh()
  keys = jax.random.split(jax.random.key(0), 4)
  names = ("q_proj", "up_proj")
  plain = {"layers": {n: 0.1 * jax.random.normal(k, (4, 128, 64)) for n, k in zip(names, keys)}}
  grads = {"layers": {n: low_rank_stack(k, (4, 128, 64)) for n, k in zip(names, keys[2:])}}
  place = jax.sharding.NamedSharding(m, P(None, "data", "model"))
  p, g = jax.device_put((plain, grads), place)
  tx = adarankgrad(1e-2, max_rank=16)
  state = sharding.init_state(tx, p, m)
  step = jax.jit(tx.update).lower(g, state, p).compile()
  assert not batched_lapack_calls(step.as_text())
  ref_step, ref_state, ref_p = jax.jit(tx.update), tx.init(plain), plain
  for i in range(2):
    updates, state = step(jax.tree.map(lambda x, c=1.0 + i: x * c, g), state, p)
    p = optax.apply_updates(p, updates)
    ref_updates, ref_state = ref_step(jax.tree.map(lambda x, c=1.0 + i: x * c, grads), ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, ref_updates)
  # The sharded reductions round differently, which moves the refreshed subspace by ~1e-4 at most
  # (see test_stacked_llama_state_sharding_and_bounded_collectives): atol 1e-5 after 2 steps.
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **dict(TOL, atol=1e-5))


def test_block_step_on_a_sharded_stack():
  m = mesh()
  tx = optax_memopt.badam(1e-2, switch_every=1, switch_mode="ascending", eps=1e-4)
  plain = stacked_parts()[2]
  p = sharding.shard_params(jax.tree.map(jnp.copy, plain), m)
  ids = jax.device_put(jnp.asarray(TOKENS), sharding.batch_sharding(m))
  state = sharding.init_state(tx, p, m)
  param_sh = jax.tree.map(lambda x: x.sharding, p)
  step = optax_memopt.make_block_step(stacked_loss_fn, tx)
  ref_step = optax_memopt.make_block_step(stacked_loss_fn, tx, donate=False)
  ref_p, ref_state = plain, tx.init(plain)
  for _ in range(2):
    p, state, loss = step(p, state, ids)
    ref_p, ref_state, ref_loss = ref_step(ref_p, ref_state, jnp.asarray(TOKENS))
    for x, s in zip(jax.tree.leaves(p), jax.tree.leaves(param_sh), strict=True):
      assert x.sharding.is_equivalent_to(s, x.ndim)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  # eps=1e-4: see test_block_step_keeps_params_sharded.
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
  q = np.asarray(p["layers"]["self_attn"]["q_proj"]["kernel"])
  q0 = np.asarray(plain["layers"]["self_attn"]["q_proj"]["kernel"])
  assert not np.allclose(q[:2], q0[:2]) and np.array_equal(q[2], q0[2])  # blocks 0, 1 trained
