"""What the two step builders share: the compiled-step object and its setup.

:func:`optax_memopt.make_block_step` and :func:`optax_memopt.make_layerwise_step` return instances of
subclasses of :class:`Step` (``_block_step.BlockStep``, ``_layerwise.LayerwiseStep``). A step object is
called like a function, ``step(params, opt_state, *args, **kwargs) -> (params, opt_state, loss)``,
and keeps its host state (compiled functions, counters) as attributes:

``trace_count``
  How many times a compiled function of this step was traced (each trace is followed by an XLA
  compilation): stays constant once every function the run needs exists.
``lower(...)``
  The ``jax.stages.Lowered`` step (inputs may be ``jax.ShapeDtypeStruct``), for XLA's cost and memory
  analyses; its arguments are those of the subclass.

The helpers below are the setup both builders do the same way: argument checks, ``jax.jit`` with
donation, keeping a device mesh's shardings, distinct buffers for donation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_memopt import _tree


class Step:
  """A compiled training step built around ``loss_fn`` and ``tx`` (see the module docstring).

  Attributes:
    loss_fn: the loss the step differentiates.
    tx: the optimizer (with extra-args support).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    donate: ``params`` and ``opt_state`` are donated to the compiled step.
    trace_count: the number of traces so far.
  """

  #: The builder's name, which starts every error message.
  name = "step"

  def __init__(self, loss_fn: Callable[..., Any], tx: Any, *, has_aux: bool, donate: bool):
    self.loss_fn = loss_fn
    self.tx = tx
    self.has_aux = has_aux
    self.donate = donate
    self.trace_count = 0

  def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit(fn)``, donating its first two arguments (params, opt_state) when ``donate``."""
    return jax.jit(fn, donate_argnums=(0, 1) if self.donate else ())

  def scalar_loss(self, out: Any) -> Any:
    """The loss in ``loss_fn``'s output ``out``, after a one-line error when it is not a scalar."""
    loss = out[0] if self.has_aux else out
    if not (hasattr(loss, "shape") and loss.shape == ()):
      shape = getattr(loss, "shape", type(loss).__name__)
      raise TypeError(f"{self.name}: loss_fn must return a scalar loss, got {shape}")
    return loss


def check_loss_fn(name: str, loss_fn: Any) -> None:
  if not callable(loss_fn):
    raise TypeError(f"{name}: loss_fn must be callable")


def as_transformation(name: str, tx: Any) -> Any:
  """``tx`` with extra-args support, after a one-line error when it is not an optax transformation."""
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(f"{name}: tx must be an optax transformation, got {type(tx).__name__}")
  if isinstance(tx, optax.GradientTransformation):
    tx = optax.with_extra_args_support(tx)
  return tx


def deleted_leaf(tree) -> str | None:
  """The path of the first array of ``tree`` whose buffer was deleted (donated), else ``None``."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, jax.Array) and x.is_deleted():
      return _tree.path_str(path)
  return None


def distinct_buffers(tree):
  """``tree`` with every array that appears a second time copied (donation needs distinct buffers)."""
  seen = set()

  def fresh(x):
    if isinstance(x, jax.Array) and id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(fresh, tree)


def mesh_shardings(tree):
  """Per leaf, its ``NamedSharding`` when it is placed on a device mesh, else ``None``."""
  def one(x):
    sh = getattr(x, "sharding", None)
    return sh if isinstance(sh, jax.sharding.NamedSharding) else None
  return [one(x) for x in jax.tree_util.tree_leaves(tree)]


def keep_shardings(tree, shardings):
  """``tree`` with each leaf constrained to the matching sharding (``None``: left to XLA)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, [
      x if s is None else jax.lax.with_sharding_constraint(x, s)
      for x, s in zip(leaves, shardings, strict=True)
  ])
