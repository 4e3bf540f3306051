"""Gradient accumulation over the active block: the pieces :func:`block_coordinate` uses.

``optax.MultiSteps(badam(...))`` keeps a float32 accumulator shaped like *every* parameter, although
BAdam only ever reads the active block's part of it. Since the active block can only change on an
optimizer step (the end of an accumulation window), the micro-batch gradients of one window all
belong to one block, so the accumulator can live in BAdam's *slot* (the arrays that hold any one
block, see ``_badam``): it is one block's size and follows the block with no reshaping.

The arithmetic is ``optax.MultiSteps``'s: a running (Welford) mean in float32,
``acc <- acc + (g - acc) / (i + 1)`` at micro-step ``i``, and on the window's last micro-step the
inner optimizer runs on the mean; every other micro-step returns zero updates and leaves the
optimizer's state, schedule included, as it was.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_memopt._tree import zeros_like_placed


class SlotAccumulator(NamedTuple):
  """Accumulation state of a block-coordinate stage.

  Attributes:
    micro_step: int32 scalar, micro-batches accumulated in the current window, in
      ``[0, every)``; the next optimizer step is taken when it reaches ``every - 1``.
    every: int32 scalar, the (constant) window length ``accumulate_every``; kept so a host loop can
      tell from the state alone how many calls remain before the next possible block switch.
    grads: dict ``group -> tuple`` of float32 arrays shaped like the slot (one block's size), the
      running mean of the window's gradients; empty when ``every == 1``.
  """

  micro_step: jax.Array
  every: jax.Array
  grads: Any


def validate_every(accumulate_every) -> None:
  # The default is None rather than 1: optax.inject_hyperparams turns every numeric argument,
  # defaults included, into an array unless it is listed in static_args.
  if accumulate_every is None:
    return
  if isinstance(accumulate_every, (jax.Array, jax.core.Tracer)):
    raise TypeError(
        "accumulate_every decides the state's structure and must be a Python int; under "
        "optax.inject_hyperparams pass static_args=('accumulate_every', ...)"
    )
  if (not isinstance(accumulate_every, int) or isinstance(accumulate_every, bool)
      or accumulate_every < 1):
    raise ValueError(
        f"accumulate_every must be None or an int >= 1 (1: no accumulation), got {accumulate_every!r}"
    )


def init(slot_like: Any, every: int) -> SlotAccumulator:
  """An empty window: zeros shaped like the slot ``{group: tuple}`` (nothing for ``every == 1``)."""
  # Zeros derived from the slot's arrays, so that on a device mesh they take their shardings.
  grads = {} if every == 1 else jax.tree.map(
      lambda x: zeros_like_placed(x.astype(jnp.float32)), slot_like)
  return SlotAccumulator(jnp.zeros([], jnp.int32), jnp.asarray(every, jnp.int32), grads)


def add(acc: SlotAccumulator, slot_grads: Any, every: int) -> tuple[Any, jax.Array, Any]:
  """Adds one micro-batch's slot gradients to the window.

  Returns ``(mean, emit, grads)``: the window's mean so far in the dtypes of ``slot_grads`` (what
  the inner optimizer sees), whether this micro-step ends the window (a bool scalar; always true
  for ``every == 1``), and the float32 running mean to keep in the state.
  """
  if every == 1:
    return slot_grads, jnp.asarray(True), {}
  n = acc.micro_step.astype(jnp.float32)
  grads = jax.tree.map(lambda g, a: a + (g.astype(jnp.float32) - a) / (n + 1), slot_grads, acc.grads)
  mean = jax.tree.map(lambda a, g: a.astype(g.dtype), grads, slot_grads)
  return mean, acc.micro_step == every - 1, grads


def advance(acc: SlotAccumulator, grads: Any, emit: jax.Array, every: int) -> SlotAccumulator:
  """The accumulator after a micro-step: emptied when the window ended, else holding ``grads``."""
  if every == 1:
    return acc
  grads = jax.tree.map(lambda a: jnp.where(emit, jnp.zeros((), a.dtype), a), grads)
  return SlotAccumulator(optax.safe_increment(acc.micro_step) % every, acc.every, grads)


def on_emit(emit: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where the window ended, ``old`` elsewhere (an elementwise select, fused by XLA)."""
  return jax.tree.map(lambda n, o: jnp.where(emit, n, o).astype(o.dtype), new, old)


def calls_left(switch_every: int, block_step: int, micro_step: int, every: int) -> int:
  """Calls of the update before the active block can change: the window's remaining micro-steps
  plus ``every`` per remaining optimizer step of the block period."""
  return (switch_every - block_step) * every - micro_step
