"""The Optax contract, checked the same way for every transformation of the library.

Each transformation runs through the same checks, as optax's own contrib suite does: jit equals
eager and compiles once, extra args are accepted, ``optax.inject_hyperparams`` (a changed learning
rate takes effect), ``optax.MultiSteps``, ``optax.apply_if_finite``, bfloat16 params,
``optax.tree_utils.tree_map_params`` over the state, an exact orbax resume and sharded params. Only
the public API is used. Behaviour specific to one transformation is tested in its own file.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_memopt
from tests import _checks, _models

LR = 1e-2
# Two block switches, an epoch reshuffle and AdaRankGrad refreshes fall inside the short runs below.
SWITCH_EVERY = 2
REFRESH = 3
# Adam's eps for the comparisons of two computation paths: a rounding difference dg in a gradient or
# a moment becomes a step difference of at most lr * dg / eps, 1e-5 * dg here.
EPS = 1e-3
N_LAYERS = 2  # 2 blocks: block switches and a reshuffle of their order in 8 steps
WIDTH = 16  # 16 x 16 matrices: above badam_ratio's min_size once it is 64, so entries are selected.


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build one transformation, plain and with an injected learning rate."""

  name: str
  make: Callable[[float], optax.GradientTransformation]
  make_injected: Callable[[float], optax.GradientTransformation]
  # How many params-shaped trees optax.tree_utils.tree_map_params finds in the state.
  params_shaped_trees: int


def _badam(lr):
  return optax_memopt.badam(lr, switch_every=SWITCH_EVERY, seed=5, weight_decay=0.1, eps=EPS)


def _block_coordinate(lr):
  return optax_memopt.block_coordinate(optax.adam(lr, eps=EPS), switch_every=SWITCH_EVERY, seed=5)


RATIO = dict(update_ratio=0.2, switch_every=SWITCH_EVERY, mask_mode="scatter", min_size=64)


def _badam_ratio(lr):
  return optax_memopt.badam_ratio(lr, eps=EPS, **RATIO)


ARG = dict(max_rank=4, max_refresh_interval=REFRESH)


def _adarankgrad(lr):
  return optax_memopt.adarankgrad(lr, eps=EPS, **ARG)


def _scale_by_adarankgrad(lr):
  return optax.chain(optax_memopt.scale_by_adarankgrad(eps=EPS, **ARG),
                     optax.scale_by_learning_rate(lr))


def _injected_scale(lr):
  return optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=lr)


SPECS = [
    Spec("badam", _badam,
         lambda lr: optax.inject_hyperparams(optax_memopt.badam, static_args=("switch_every", "seed"))(
             learning_rate=lr, switch_every=SWITCH_EVERY, seed=5, weight_decay=0.1, eps=EPS), 0),
    # An injected rate around block_coordinate: inside it, the inner state (and so its
    # hyperparameters) is built afresh at every block switch.
    Spec("block_coordinate", _block_coordinate,
         lambda lr: optax.inject_hyperparams(lambda learning_rate: _block_coordinate(learning_rate))(
             learning_rate=lr), 0),
    Spec("badam_ratio", _badam_ratio,
         lambda lr: optax.inject_hyperparams(
             optax_memopt.badam_ratio, static_args=("update_ratio", "switch_every", "min_size", "seed"))(
                 learning_rate=lr, eps=EPS, **RATIO), 0),
    Spec("adarankgrad", _adarankgrad,
         lambda lr: optax.inject_hyperparams(
             optax_memopt.adarankgrad,
             static_args=("max_rank", "min_rank", "oversample", "power_iters", "seed",
                          "max_refresh_interval"))(learning_rate=lr, eps=EPS, **ARG), 2),
    Spec("scale_by_adarankgrad", _scale_by_adarankgrad,
         lambda lr: optax.chain(optax_memopt.scale_by_adarankgrad(eps=EPS, **ARG), _injected_scale(lr)),
         2),
]

if hasattr(optax_memopt, "scale_by_badam_ratio"):  # the scale_by_ split of badam_ratio, if present
  _scale_by_ratio = optax_memopt.scale_by_badam_ratio
  _ratio_kwargs = {k: v for k, v in dict(RATIO, eps=EPS).items()
                   if k in inspect.signature(_scale_by_ratio).parameters}
  SPECS.append(Spec(
      "scale_by_badam_ratio",
      lambda lr: optax.chain(_scale_by_ratio(**_ratio_kwargs), optax.scale_by_learning_rate(lr)),
      lambda lr: optax.chain(_scale_by_ratio(**_ratio_kwargs), _injected_scale(lr)), 0))

spec_param = pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])


@functools.cache
def compiled(spec):
  """``spec``'s transformation and its jitted update, built once: the float32 runs of several
  checks share the compiled update."""
  tx = spec.make(LR)
  return tx, jax.jit(tx.update)


def params(dtype=jnp.float32):
  return _models.toy_lm_params(N_LAYERS, width=WIDTH, dtype=dtype)


def grads_at(step, like):
  """Gradients for step ``step`` that do not depend on the params, with a decaying spectrum."""
  return _models.spectral_grads(like, seed=100 + step)


def loss_grad(p, x=_models.BATCH):
  return jax.grad(_models.toy_lm_loss)(p, x)


def integer_leaves(tree):
  """The integer arrays of a state: counters, blocks, selections, ranks, refresh steps."""
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.integer)]


def assert_all_zero(tree):
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------------


@spec_param
def test_jit_equals_eager_and_compiles_once(spec):
  # Eager runs op by op and jit fuses: the same arithmetic rounded in another order. Fed the same
  # gradients, the two differ by a few float32 ulps per step; Adam's eps=1e-3 keeps them from being
  # amplified in small moments, so after 5 steps they agree to 1e-5 relative, far below the lr=1e-2
  # step that a wrong block, selection or projection would make.
  # Eager mode compiles every operation (and each branch of a refresh) on its own: a small tree.
  keys = jax.random.split(jax.random.key(0), 3)
  p0 = {"layers": [{"w": jax.random.normal(keys[i], (WIDTH, WIDTH)) / 4, "b": jnp.zeros(WIDTH)}
                   for i in range(2)],
        "head": jax.random.normal(keys[2], (WIDTH, 8)) / 4}
  tx = spec.make(LR)

  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  s_jit = s_eager = tx.init(p0)
  p_jit = p_eager = p0
  for t in range(5):
    g = grads_at(t, p0)
    u_jit, s_jit = step(g, s_jit, p_jit)
    u_eager, s_eager = tx.update(g, s_eager, p_eager)
    chex.assert_trees_all_close(u_jit, u_eager, rtol=1e-5, atol=1e-7)
    p_jit, p_eager = optax.apply_updates(p_jit, u_jit), optax.apply_updates(p_eager, u_eager)
  chex.assert_trees_all_close(s_jit, s_eager, rtol=1e-5, atol=1e-7)
  assert len(traces) == 1  # block switches and refreshes do not recompile


@spec_param
def test_extra_args_are_accepted(spec):
  p = params()
  tx, plain_update = compiled(spec)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  # In a chain after a stage that takes no extra args, given unknown extra args.
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  state = chained.init(p)
  g = grads_at(0, p)
  u, s = jax.jit(lambda g, s, p: chained.update(g, s, p, value=1.0, foo=2))(g, state, p)
  assert jax.tree_util.tree_structure(u) == jax.tree_util.tree_structure(p)
  chex.assert_trees_all_equal_dtypes(u, p)
  # The same step as the transformation alone on the clipped gradient (rounded apart by XLA's
  # fusion of the clipping: float32 ulps; a wrong step differs by ~lr = 1e-2). The same blocks,
  # selections and ranks (AdaRankGrad's float state is compared through the updates only: a basis
  # vector's sign may flip on a rounding).
  clipped, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  u_plain, s_plain = plain_update(clipped, tx.init(p), p)
  chex.assert_trees_all_close(u, u_plain, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_equal(integer_leaves(s[1]), integer_leaves(s_plain))


@spec_param
def test_state_is_stable_under_lax_cond(spec):
  p = params("mixed")  # bfloat16 leaves too: BAdam's master copy must keep its float32 type
  tx = spec.make(LR)
  state = tx.init(p)
  g = grads_at(0, p)

  @jax.jit
  def maybe_step(pred, s):
    return jax.lax.cond(pred, lambda: tx.update(g, s, p),
                        lambda: (jax.tree.map(jnp.zeros_like, g), s))

  u, s1 = maybe_step(True, state)
  _, s2 = maybe_step(False, s1)
  chex.assert_trees_all_equal_dtypes(u, p)  # float32 and bfloat16 leaves keep their types
  chex.assert_trees_all_equal_shapes_and_dtypes(state, s1, s2)
  chex.assert_trees_all_equal(s1, s2)
  counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(s1, "count")]
  assert counts and set(counts) == {1}  # the step was taken once


@spec_param
def test_inject_hyperparams(spec):
  p0 = params()
  injected, (plain, plain_update) = spec.make_injected(LR), compiled(spec)
  s1, s2 = injected.init(p0), plain.init(p0)
  assert float(optax.tree_utils.tree_get(s1, "learning_rate")) == pytest.approx(LR)
  update = jax.jit(injected.update)
  p = p0
  for _ in range(4):
    g = loss_grad(p)
    u1, s1 = update(g, s1, p)
    u2, s2 = plain_update(g, s2, p)
    # Same operations on the same numbers, but the hyperparameters are float32 arrays in one and
    # constants folded by XLA in the other: a few float32 ulps per step, which the next gradients
    # carry on (a step difference of at most lr * dg / eps, see EPS): 1e-6 is 10^4 below a step.
    chex.assert_trees_all_close(u1, u2, rtol=1e-4, atol=1e-6)
    p = optax.apply_updates(p, u1)
  # From the same state and gradients: half the rate is half the step, a zero rate no step.
  g = loss_grad(p)
  u_full, _ = update(g, s1, p)
  u_half, s_half = update(g, optax.tree_utils.tree_set(s1, learning_rate=jnp.asarray(LR / 2)), p)
  # (The rate scales each term of the update before they are summed, which may cancel: a few ulps
  # of the terms, 1e-8 absolute, against the ~lr = 1e-2 by which a half step differs.)
  chex.assert_trees_all_close(u_half, jax.tree.map(lambda u: u / 2, u_full), rtol=1e-4, atol=1e-7)
  assert float(optax.tree_utils.tree_get(s_half, "learning_rate")) == np.float32(LR / 2)  # it stays
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree_util.tree_leaves(u_full))
  u_zero, _ = update(g, optax.tree_utils.tree_set(s1, learning_rate=jnp.asarray(0.0)), p)
  assert_all_zero(u_zero)


@spec_param
def test_multisteps_equals_the_averaged_gradient(spec):
  k, windows = 3, 4
  p0 = params()
  plain, plain_update = compiled(spec)
  ms = optax.MultiSteps(plain, every_k_schedule=k)
  ms_update = jax.jit(ms.update)
  s_ms, s_plain = ms.init(p0), plain.init(p0)
  p_ms = p_plain = p0
  for w in range(windows):
    micro = [grads_at(w * k + i, p0) for i in range(k)]
    for i, g in enumerate(micro):
      u, s_ms = ms_update(g, s_ms, p_ms)
      if i < k - 1:
        assert_all_zero(u)
      p_ms = optax.apply_updates(p_ms, u)
    u, s_plain = plain_update(jax.tree.map(lambda *g: sum(g) / k, *micro), s_plain, p_plain)
    p_plain = optax.apply_updates(p_plain, u)
    # MultiSteps averages incrementally, the reference sums then divides: the mean differs by a
    # rounding dg, a step difference of at most lr * dg / eps (1e-5 * dg, see EPS) per update:
    # within 1e-5 after 4 updates, 1000x below the step a wrong average would make.
    chex.assert_trees_all_close(p_ms, p_plain, rtol=1e-5, atol=1e-5)
    # The same steps, blocks, selections, ranks and refreshes. (The float state is not compared: a
    # low-rank basis is defined up to the sign of each vector, which a rounding can flip.)
    chex.assert_trees_all_equal(integer_leaves(s_ms.inner_opt_state), integer_leaves(s_plain))


@spec_param
def test_apply_if_finite_skips_a_nan_step(spec):
  p = params()
  tx, plain_update = compiled(spec)
  guarded = optax.apply_if_finite(tx, max_consecutive_errors=3)
  update = jax.jit(guarded.update)
  state = guarded.init(p)
  g = loss_grad(p)
  for bad in (jax.tree.map(lambda x: x * jnp.nan, g),
              jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), g)):
    u, after = update(bad, state, p)
    assert_all_zero(u)
    chex.assert_trees_all_equal(after.inner_state, state.inner_state)
    assert int(after.notfinite_count) == 1 and not bool(after.last_finite)
  # A finite step then goes through as the transformation alone makes it.
  u, after = update(g, after, p)
  u_plain, s_plain = plain_update(g, tx.init(p), p)
  chex.assert_trees_all_close(u, u_plain, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(after.inner_state, s_plain, rtol=1e-6, atol=1e-9)
  assert int(after.notfinite_count) == 0 and bool(after.last_finite)


@spec_param
def test_bf16_params_keep_their_dtypes(spec):
  # (float32 and mixed trees: test_extra_args_are_accepted, test_state_is_stable_under_lax_cond.)
  dtype = jnp.bfloat16
  p = params(dtype)
  tx = spec.make(LR)
  state = init_state = tx.init(p)
  update = jax.jit(tx.update)
  for _ in range(4):
    u, state = update(loss_grad(p), state, p)
    chex.assert_trees_all_equal_dtypes(u, p)
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(u))
    p = optax.apply_updates(p, u)
  chex.assert_trees_all_equal_dtypes(p, params(dtype))
  chex.assert_trees_all_equal_shapes_and_dtypes(state, init_state)
  # Training moved the params (a bf16 step is not lost to rounding).
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), p, params(dtype))
  assert any(jax.tree_util.tree_leaves(moved))


@spec_param
def test_tree_map_params_over_the_state(spec):
  p = params()
  tx = optax.chain(optax.clip_by_global_norm(1.0), spec.make(LR))
  update = jax.jit(tx.update)
  g = loss_grad(p)
  _, state = update(g, tx.init(p), p)
  # Which state fields are shaped like the params (AdaRankGrad's moments in their own layout,
  # nothing in BAdam's one-block slot).
  marked = optax.tree_utils.tree_map_params(tx, lambda _: "P", state,
                                            transform_non_params=lambda _: None)
  leaves = jax.tree_util.tree_leaves(marked)
  assert set(leaves) <= {"P"}
  assert len(leaves) == spec.params_shaped_trees * len(jax.tree_util.tree_leaves(p))
  # A function of the float arrays keeps values and dtypes (int32 counters included), and the
  # result is a state the next update takes.
  cast = optax.tree_utils.tree_map_params(tx, lambda x: x * 1.0, state)
  chex.assert_trees_all_equal(cast, state)
  chex.assert_trees_all_equal_dtypes(cast, state)
  # The sharding idiom, with an extra params-shaped tree.
  shardings = jax.tree.map(lambda x: x.sharding, p)
  placed = optax.tree_utils.tree_map_params(tx, lambda x, s: jax.device_put(x, s), state, shardings,
                                            transform_non_params=lambda x: x)
  chex.assert_trees_all_equal(placed, state)
  want = update(g, state, p)
  chex.assert_trees_all_equal(update(g, cast, p), want)
  chex.assert_trees_all_equal(update(g, placed, p), want)


@spec_param
def test_orbax_resume_is_exact(spec, tmp_path):
  # float32 and bfloat16 leaves, matrices and vectors (badam_ratio: selected and trained whole): a
  # float32 leaf has no master copy, a bfloat16 one has, a whole leaf no index; the state once held
  # zero-size arrays for such cases, which StandardCheckpointer refuses. Interrupted twice:
  # mid-block in the first epoch of blocks and mid-block after a reshuffle (AdaRankGrad: between
  # refreshes).
  _checks.assert_resume_is_exact(spec.make(LR), params("mixed"), loss_grad, tmp_path, total=12,
                                 interrupts=(3, 7))


@spec_param
def test_state_is_sharded_like_the_params(spec):
  # The root conftest.py simulates 8 CPU devices; the matrices are split over 4 on their last axis.
  n = min(4, jax.device_count())
  mesh = jax.make_mesh((n,), ("model",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  p = params()
  spec_of = lambda x: P(None, "model") if x.ndim == 2 and x.shape[-1] % n == 0 else P()
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec_of(x)), p)
  p = jax.device_put(p, shardings)
  tx, update = compiled(spec)
  state = jax.jit(tx.init)(p)
  # Every field of the state shaped like its param is placed like it (AdaRankGrad's projected
  # moments have their own shapes).
  placed_like = optax.tree_utils.tree_map_params(
      tx, lambda x, q, s: x.shape != q.shape or x.sharding.is_equivalent_to(s, x.ndim), state, p,
      shardings, transform_non_params=lambda _: True)
  assert all(jax.tree_util.tree_leaves(placed_like))
  # An update on the sharded params and state equals the unsharded one (the same arithmetic split
  # over devices: a few float32 ulps).
  u, after = update(grads_at(0, p), state, p)
  host = params()
  u_ref, s_ref = update(grads_at(0, host), tx.init(host), host)
  chex.assert_trees_all_close(u, u_ref, rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(after, s_ref, rtol=2e-5, atol=2e-6)
