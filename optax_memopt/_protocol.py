"""The internal channel between the step builders and the transformations, in one place.

:func:`optax_memopt.make_block_step` and :func:`optax_memopt.make_layerwise_step` receive an opaque
``tx`` and an opaque ``loss_fn``. They learn what they need from them, and tell them what they
decided, over two channels only. Nothing here is public API: each name is read and written by the
modules listed with it, and nowhere else.

**Extra keyword arguments of ``tx.update``** (optax hands unknown keyword arguments through
``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``, ``multi_transform``; a
transformation that does not know a name ignores it, so ``tx`` still works without a builder):

``LABELS_PROBE``
  A ``dict`` that ``make_block_step`` passes while it traces ``tx.update`` once with
  ``jax.make_jaxpr`` (``_block_step._probe_stage``). Each
  :func:`optax_memopt.block_coordinate` stage writes ``{its token: (labels, key paths of the leaves
  it sees)}`` into it (``_badam._BlockCoordinate.update``): the partition the step compiles
  for, and where that stage's leaves sit in the step's tree. Exactly one entry is expected.

``STATIC_BLOCK``
  An ``int``: the block that a compiled block step was built for. ``block_coordinate`` then
  treats the active block as that constant (only its slot is gathered and scattered; no
  ``lax.switch`` over the blocks). Passed by ``_block_step.BlockStep._trace_block`` only.

(``global_step``, :data:`optax_memopt._badam.GLOBAL_STEP_ARG`, is a different channel: BAdam tells
its inner transformation the optimizer step. It is documented on :func:`optax_memopt.badam`.)

**Context variables read by** :func:`optax_memopt.scan_layers` (defined in ``_scan.py``, next to
their one reader), set only for the duration of one trace of ``loss_fn`` by the context managers
that the step builders call:

``_scan.active_slices(entries, whole)`` (set by ``_block_step._StackLoss``)
  ``_scan._ACTIVE``: ``id`` of each stacked leaf handed to ``loss_fn`` -> its active layer slice
  and index (``_scan._Active``; ``scan_layers`` marks the entries it consumed as ``used``);
  ``_scan._WHOLE``: the ``id`` of the stacked leaves differentiated whole on purpose (always
  active); ``_scan._UNMATCHED``: per ``scan_layers`` call that found none of the entries, its
  leaves' shapes and dtypes (yielded to the step, which says why its stack was not sliced).

``_scan.layerwise_stacks(members)`` (set by ``_layerwise._LayerwiseTrace.loss_of``)
  ``_scan._LAYERWISE``: ``id`` of each stacked leaf handed to ``loss_fn`` -> its stack and the
  per-layer update (``_scan._Member``, ``_scan._Stack``; ``scan_layers`` counts its calls in
  ``used``).

Arrays are matched by ``id``: ``scan_layers`` must receive the very arrays the step handed to
``loss_fn`` (a cast, a copy or a nested ``jax.jit`` / ``jax.checkpoint`` gives new arrays; the
steps then say so).
"""

from __future__ import annotations

LABELS_PROBE = "block_coordinate_labels_probe"
STATIC_BLOCK = "block_coordinate_static_block"
