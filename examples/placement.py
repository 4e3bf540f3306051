"""Where arrays live: the default device, or a device mesh (``--mesh``, see ``examples/sharding.py``)."""

from __future__ import annotations

from typing import Any

import jax

from examples.config import TrainConfig
from examples.errors import UsageError


def check_mesh(cfg: TrainConfig):
  """The mesh of ``--mesh`` (None without it), with one-line errors for a spec that does not fit
  the devices or the batch. Cheap: scripts call it before building any data."""
  if not cfg.mesh:
    return None
  from examples import sharding

  try:
    mesh = sharding.make_mesh(cfg.mesh)
  except ValueError as e:
    raise UsageError(f"--mesh: {e} (jax sees {jax.device_count()} devices; on a CPU use "
                     "--cpu-devices N to simulate N)") from None
  data = mesh.shape.get(sharding.DATA, 1)
  if cfg.batch_size % data:
    raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the mesh's data axis "
                     f"({data})")
  return mesh


class Placement:
  """Puts params, optimizer state and batches on the default device or on the ``--mesh``.

  On a mesh the params are placed by the task's partition rules (FSDP over ``data``, tensor
  parallelism over ``model``), the optimizer state is born sharded like them
  (``sharding.init_state``), the frozen rest is replicated and each batch is split over ``data``.
  The jitted steps then run as one SPMD program over the mesh.
  """

  def __init__(self, cfg: TrainConfig, rules: Any = None):
    self.mesh = check_mesh(cfg)
    if self.mesh is None:
      return
    from examples import sharding

    self._sharding = sharding
    self._rules = rules or [(r".*", jax.sharding.PartitionSpec())]

  def params(self, params):
    return params if self.mesh is None else self._sharding.shard_params(params, self.mesh,
                                                                        self._rules)

  def replicated(self, tree):
    if self.mesh is None:
      return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  def opt_state(self, tx, params):
    return tx.init(params) if self.mesh is None else self._sharding.init_state(tx, params,
                                                                               self.mesh)

  def batch(self, batch: dict, micro_batches: bool = False) -> dict:
    """``batch`` (``[batch, ...]`` arrays, or ``[micro-batches, batch, ...]`` with
    ``micro_batches``) split over ``data`` along its batch axis."""
    if self.mesh is None:
      return batch
    sharding = self._sharding.batch_sharding(self.mesh)
    if micro_batches:
      sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.device_put(batch, sharding)
