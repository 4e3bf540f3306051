"""Checks shared by several test files."""

import math
import re

import chex
import jax
import optax


def assert_resume_is_exact(tx, params, grad_fn, tmp_path, total, interrupts):
  """Train ``total`` steps at once, and again saved and restored with orbax after each step count in
  ``interrupts``: the two runs end with bitwise equal params and state.

  The checkpoint is restored into the abstract target ``jax.eval_shape(tx.init, params)``, as a
  training script resuming in a new process does. ``grad_fn(params)`` gives the step's gradients.
  """
  import orbax.checkpoint as ocp

  # A zero-size array in the state is refused by StandardCheckpointer.
  assert not any(x.size == 0 for x in jax.tree_util.tree_leaves(tx.init(params)))

  @jax.jit
  def step(p, s):
    u, s = tx.update(grad_fn(p), s, p)
    return optax.apply_updates(p, u), s

  def run(p, s, n):
    for _ in range(n):
      p, s = step(p, s)
    return p, s

  want = run(params, tx.init(params), total)
  target = {"params": jax.eval_shape(lambda: params), "opt_state": jax.eval_shape(tx.init, params)}
  p, s, done = params, tx.init(params), 0
  for save_at in interrupts:
    p, s = run(p, s, save_at - done)
    done = save_at
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp_path / f"step_{save_at}", {"params": p, "opt_state": s})
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(tmp_path / f"step_{save_at}", target)
    chex.assert_trees_all_equal_structs(restored["opt_state"], s)
    chex.assert_trees_all_equal(restored, {"params": p, "opt_state": s})
    p, s = restored["params"], restored["opt_state"]
  chex.assert_trees_all_equal(run(p, s, total - done), want)


_LAPACK_CALL = re.compile(r"=\s*\(?\s*[a-z0-9]+\[([0-9,]*)\][^\n]*?custom-call\([^\n]*"
                          r"custom_call_target=\"(lapack_\w+)\"")


def batched_lapack_calls(hlo_text):
  """The ``(kernel, result shape)`` of every LAPACK custom call of a compiled CPU module that gets
  more than one matrix. jaxlib's CPU kernels split such a batch over XLA's intra-op thread pool and
  block until it is done, which deadlocks the simulated devices of a CPU mesh (they run on that
  pool); ``optax_memopt.linalg`` gives them one matrix at a time."""
  out = []
  for m in _LAPACK_CALL.finditer(hlo_text):
    dims = [int(d) for d in m.group(1).split(",") if d]
    # The first result is the factorised matrix (geqrf, orgqr: [..., m, n]; syevd: the vectors).
    if math.prod(dims[:-2]) > 1:
      out.append((m.group(2), tuple(dims)))
  return out
