"""Sharded training on a device mesh: Llama partition rules, mesh parsing, parameter placement.

The mesh has two axes:

* ``data``: fully-sharded data parallelism (FSDP). The batch is split over it, and every weight
  matrix is split over it along one dimension, so each device holds ``1/data`` of the model and of
  anything the optimizer keeps per parameter.
* ``model``: tensor parallelism. The attention heads and the MLP's intermediate dimension are split
  over it (Megatron style: q/k/v and gate/up by output columns, o_proj and down_proj by input rows),
  so the activations of one layer never need all-gathering along ``model``.

The rules are data (:data:`LLAMA_RULES`: a path regex and a ``PartitionSpec`` per kind of leaf), so
other models only need their own list. Parameter paths are the dotted key paths of the trainable
params dict, e.g. ``layers.3.self_attn.q_proj.kernel`` (``layers.self_attn.q_proj.kernel`` with a
stacked, scanned layer: a leaf with more dimensions than its spec gets leading ``None`` entries, so
the stack axis stays whole). A dimension not divisible by its mesh axes is left unsharded rather
than padded.

The mesh is *automatic* by default (``AxisType.Auto``): the example models carry no sharding
annotations, so XLA's partitioner propagates the parameters' shardings through the model. Optimizer
states are made with :func:`init_state`, which pins each state leaf to the sharding the optimizer
gives it (:func:`state_shardings`, read from an abstract trace on the explicit-axes version of the
mesh); a plain ``jax.jit(tx.init)`` would replicate every leaf built from a shape. What that gives,
measured by ``tests/test_sharding.py`` on a data=2 x model=4 mesh:

* ``badam`` / ``block_coordinate``: the slot (and its Adam moments / master copy) is sharded exactly
  like the block's parameters; an update moves no bytes between devices (it is elementwise on
  co-sharded arrays), and ``make_block_step`` returns params and state with their input shardings.
* ``badam_ratio``: the ``[n]``-vectors of selected entries are replicated (they are
  ``update_ratio`` of a tensor); an update gathers the selected entries of the gradient and the
  parameter by coordinates, about ``4 x update_ratio`` of the parameter bytes, never a whole tensor.
* ``optax.adamw``: moments sharded like the parameters, no collectives in the update.
* ``adarankgrad``: each projector ``[M, R]`` is sharded like its parameter's M dimension (the long
  side: q/k/v_proj ``P('data', 'model')`` give ``P('data', None)``, o_proj / down_proj / embedding
  ``P('model', None)``; a wide weight such as gate_proj ``[64, 128]`` is transposed first, so
  ``P('model', None)`` too) and the moments ``[R, N]`` like its N dimension (``P(None, 'model')``
  for q/k/v_proj, ``P(None, 'data')`` for the others); R is never sharded, and an update keeps all of
  it, with no ``out_shardings`` needed. No collective returns a whole weight matrix, projector or
  moment: the randomized SVD of a subspace refresh replicates only the thin sketch panels for its
  QRs (``[M, l]``, ``[N, l]``) and ``Q^T G`` (``[l, N]``, ``l = max_rank + oversample``), and
  all-reduces partial products; a step without a refresh only all-reduces the projected
  gradients. ``tests/test_sharding.py`` bounds these collectives by the sketch and projected panel
  sizes and prints the bytes it measures (on its tiny model the panels are not small next to a
  matrix, as they are at real widths). Under an Explicit
  mesh (sharding in types) the update works too: its linear algebra runs inside
  ``jax.sharding.auto_axes`` and every state leaf keeps its type.

Usage (one host)::

    from examples import sharding
    mesh = sharding.make_mesh("data=2,model=4")
    params = sharding.shard_params(params, mesh)          # trainable params dict (or nnx.State)
    opt_state = sharding.init_state(tx, params, mesh)      # state sharded like the params
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    params, opt_state, loss = train_step(params, opt_state, batch)   # jax.jit'ed as usual
    # or: step = optax_memopt.make_block_step(loss_fn, tx); step(params, opt_state, rest, batch)

``shard_params`` may alias the buffers of single-device leaves into replicated ones: do not reuse
the unsharded tree after a step that donates its inputs.

Multi-host (several machines, each with its own accelerators):

1. Call ``jax.distributed.initialize()`` first, before any other JAX call (on TPU pods and SLURM it
   finds the coordinator itself; elsewhere pass ``coordinator_address``, ``num_processes``,
   ``process_id``).
2. Run the *same* script on every host with the same arguments and seeds: every host traces the same
   program, and ``jax.jit`` runs it as one SPMD program over all devices.
3. Build one global mesh over ``jax.devices()`` (all hosts' devices, which :func:`make_mesh` does);
   ``data × model`` must equal ``jax.device_count()``. Put ``model`` on the innermost (fastest)
   interconnect: ``jax.make_mesh`` orders devices so that the last axis stays within a host / ICI
   ring, which is where tensor parallelism's per-layer collectives belong.
4. Each host loads only its own slice of the data: make global batch arrays with
   ``jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)``. Params made by a
   jitted init (or loaded with orbax using the target shardings) are never materialised whole on
   one host; :func:`shard_params` on a host-local params tree needs the full tree on every host.
5. Write checkpoints with orbax (every host calls save; each writes its shards).

Choosing the axis sizes: ``model`` should divide the number of key/value heads, the intermediate size
and the hidden size; keep it as small as memory allows (1 to 8, within a host), because its
collectives run at every layer of the forward and backward passes. Give the rest to ``data``: its
collectives are one all-gather of each weight per layer use and one reduce-scatter of its gradient,
which overlap with compute. The global batch must be divisible by ``data``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"

# (path regex, spec): the first rule whose regex matches (``re.search``) a leaf's dotted path wins.
LLAMA_RULES: list[tuple[str, P]] = [
    (r"embed_tokens\.embedding$", P(MODEL, DATA)),  # [vocab, hidden]
    (r"(q_proj|k_proj|v_proj)\.kernel$", P(DATA, MODEL)),  # [hidden, heads * head_dim]
    (r"(q_proj|k_proj|v_proj)\.bias$", P(MODEL)),
    (r"o_proj\.kernel$", P(MODEL, DATA)),  # [heads * head_dim, hidden]
    (r"(gate_proj|up_proj)\.kernel$", P(DATA, MODEL)),  # [hidden, intermediate]
    (r"(gate_proj|up_proj)\.bias$", P(MODEL)),
    (r"down_proj\.kernel$", P(MODEL, DATA)),  # [intermediate, hidden]
    (r"lm_head\.kernel$", P(DATA, MODEL)),  # [hidden, vocab]
    (r".*", P()),  # norm scales, o_proj / down_proj biases: replicated (they are tiny)
]


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None, *,
              explicit: bool = False) -> Mesh:
  """A mesh from ``"data=2,model=4"`` (axis names and sizes, outermost first).

  The axes are ``Auto`` (sharding propagated by XLA), which the example models need; ``explicit=True``
  makes them ``Explicit`` (sharding in types, ``jax.make_mesh``'s default), under which the models
  would need sharding annotations of their own.

  One size may be ``-1``: it takes the devices left over (``"data=-1,model=4"``). The product of
  the sizes must equal the number of devices (by default all of ``jax.devices()``, every host's).

  Raises:
    ValueError: a malformed spec, a repeated axis, or sizes that do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = [], []
  for part in spec.split(","):
    name, eq, size = part.strip().partition("=")
    name = name.strip()
    if not eq or not name.isidentifier():
      raise ValueError(f"mesh spec {spec!r}: expected 'name=size,...', e.g. 'data=2,model=4'")
    try:
      value = int(size)
    except ValueError:
      raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
    if value < 1 and value != -1:
      raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1")
    if name in names:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} appears twice")
    names.append(name)
    sizes.append(value)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh spec {spec!r}: at most one size may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh spec {spec!r}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"mesh spec {spec!r}: sizes multiply to {int(np.prod(sizes))}, but there are "
        f"{len(devices)} devices"
    )
  kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  return jax.make_mesh(tuple(sizes), tuple(names), devices=devices,
                       axis_types=(kind,) * len(names))


def leaf_path(path: Sequence[Any]) -> str:
  """The dotted path of a leaf (``layers.3.self_attn.q_proj.kernel``), without NNX's ``.value``."""
  text = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
  return text[: -len(".value")] if text.endswith(".value") else text


def spec_for(path: str, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = LLAMA_RULES) -> P:
  """The ``PartitionSpec`` of one leaf: the first matching rule, fitted to the leaf's shape.

  Extra leading dimensions (a scanned layer stack) are not sharded; a dimension whose size is not a
  multiple of its mesh axes' size, or an axis the mesh does not have, is left unsharded.
  """
  spec = next((s for pattern, s in rules if re.search(pattern, path)), P())
  entries = list(spec)
  if len(entries) > len(shape):
    entries = entries[len(entries) - len(shape):] if len(shape) else []
  entries = [None] * (len(shape) - len(entries)) + entries
  fitted = []
  for dim, axes in zip(shape, entries):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if any(a not in mesh.shape for a in names):
      fitted.append(None)
      continue
    size = int(np.prod([mesh.shape[a] for a in names]))
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def param_shardings(params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, P]] = LLAMA_RULES) -> Any:
  """A tree of ``NamedSharding`` with the structure of ``params`` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(leaf_path(path), x.shape, mesh, rules)), params
  )


def shard_params(params_state: Any, mesh: Mesh,
                 rules: Sequence[tuple[str, P]] = LLAMA_RULES) -> Any:
  """``params_state`` (a params dict or an ``nnx.State``) with every array placed by ``rules``.

  Works on any pytree whose leaves have shapes; with ``jax.ShapeDtypeStruct`` leaves it returns
  ShapeDtypeStructs carrying the shardings (for ``jax.jit(...).lower`` / ``jax.eval_shape``).
  """
  shardings = param_shardings(params_state, mesh, rules)

  def place(x, s):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.device_put(x, s)

  return jax.tree.map(place, params_state, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Inputs ``[batch, ...]``: the batch split over ``data``, replicated over ``model``."""
  return NamedSharding(mesh, P(DATA if DATA in mesh.shape else None))


def explicit_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis ``Explicit`` (sharding in types), same devices and names."""
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(jax.sharding.AxisType.Explicit,) * len(mesh.axis_names))


def state_shardings(tx: Any, params: Any, mesh: Mesh) -> Any:
  """The ``NamedSharding`` (on ``mesh``) of every leaf of ``tx.init(params)``, as the optimizer types it.

  ``params`` are sharded arrays or ShapeDtypeStructs with shardings. The init is traced abstractly
  (``jax.eval_shape``, nothing is computed or allocated) under the explicit-axes version of ``mesh``,
  where every array's type carries its sharding, so each state leaf gets the sharding the optimizer
  derives from the parameter it stands for (BAdam's slot: the block's leaves' shardings; AdamW's
  moments: their parameter's); leaves built from shapes alone (counters) are replicated.
  """
  exp = explicit_mesh(mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(exp, x.sharding.spec)),
      params,
  )
  specs = {}

  def init_types(p):
    state = tx.init(p)
    specs["state"] = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, state)
    return state

  with jax.set_mesh(exp):
    jax.eval_shape(init_types, abstract)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs["state"],
                      is_leaf=lambda x: isinstance(x, P))


def init_state(tx: Any, params: Any, mesh: Mesh) -> Any:
  """``tx.init(params)`` computed on the mesh, each leaf born with its :func:`state_shardings` sharding.

  Under automatic sharding (the default mesh of :func:`make_mesh`) ``jax.jit(tx.init)`` alone would
  replicate every state leaf made from a shape (``jnp.zeros``) rather than from a parameter: this
  pins the output shardings instead.
  """
  return jax.jit(tx.init, out_shardings=state_shardings(tx, params, mesh))(params)
