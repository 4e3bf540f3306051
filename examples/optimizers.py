"""The optimizers the examples and benchmarks compare: one registry, :data:`REGISTRY`.

Each entry (:class:`Optimizer`) says how ``--optimizer NAME`` is built from the options and what
kind of method it is: its default learning rate, whether ``--layerwise`` can apply it, whether it
trains through ``optax_memopt.make_block_step``, accumulates ``--grad-accum`` itself, adds LoRA
adapters, keeps its master weights in its state, switches what it trains every ``--switch-every``
steps, handles stacked (``--scan-layers``) leaves, and what the progress bar shows of its state.
The command line (``examples/config.py``), the training loop, the run directories and the
benchmarks all ask this table; none decodes the name itself.

Every optimizer sees the trainable parameters as a plain nested dict (paths such as
``layers.3.mlp.gate_proj.kernel``, from which BAdam's :func:`optax_memopt.block_labels` finds one
block per layer). LoRA is the one optimizer that changes the model: :func:`add_adapters` wraps the
layers' linear maps in ``nnx.LoRA`` (``examples/lora.py``) and only the adapters (and a task head)
train.

This module imports JAX, Optax and Flax only inside its functions: the command line reads the
registry before the few seconds those imports take.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from examples.errors import UsageError

if TYPE_CHECKING:
  import optax

  from examples.config import TrainConfig


# ---------------------------------------------------------------------------------------------
# Which leaves train: BAdam's blocks and always-active leaves.


def always_active_patterns(cfg: TrainConfig, task: Any) -> list[str]:
  """The regular expressions of the leaves BAdam trains at every step: a new task head (unless
  ``--no-always-active-head``) and ``--always-active``'s."""
  head = [re.escape(h) for h in task.head] if cfg.always_active_head else []
  return head + [p.strip() for p in cfg.always_active.split(",") if p.strip()]


def _checked_labels(cfg: TrainConfig, params: dict, always: list[str], **kwargs):
  """``optax_memopt.block_labels(params, ...)``, with a pattern that matches nothing (or empties a
  block) as one line naming the option."""
  import optax_memopt

  try:
    return optax_memopt.block_labels(params, always_active=always or None, **kwargs)
  except (ValueError, re.error) as e:
    raise UsageError(f"--always-active {cfg.always_active!r}: {e}") from None


def badam_labels(cfg: TrainConfig, params: dict, task: Any):
  """BAdam's block labels of ``params`` (``-1`` frozen, ``-2`` always active).

  One block per layer; a random-init model's embedding (and LM head) are blocks too, a pretrained
  model's are frozen. A new task head is always active (``--no-always-active-head``: a block of its
  own, with whatever else follows the layers), and so are the leaves ``--always-active`` names.
  """
  if not task.head and not cfg.always_active_head:
    raise UsageError("--no-always-active-head: this task has no new task head (an LM head is a "
                     "block of a random-init model and frozen in a pretrained one); leave it out")
  head_block = task.from_scratch if not task.head else not cfg.always_active_head
  return _checked_labels(cfg, params, always_active_patterns(cfg, task),
                         include_embedding=task.from_scratch, include_lm_head=head_block)


# ---------------------------------------------------------------------------------------------
# How each optimizer is built: (cfg, schedule, params, task) -> optax.GradientTransformation.


def _adamw(cfg: TrainConfig, schedule, params: dict, task: Any):
  import optax

  return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def _adamw_layers(cfg: TrainConfig, schedule, params: dict, task: Any):
  """AdamW on BAdam's trainable set (the papers' Adam): the leaves BAdam freezes stay unchanged."""
  import jax
  import numpy as np
  import optax

  labels = badam_labels(cfg, params, task)
  trained = jax.tree.map(lambda label: "train" if np.all(np.asarray(label) != -1) else "frozen",
                         labels, is_leaf=lambda x: isinstance(x, tuple))
  return optax.multi_transform({"train": optax.adamw(schedule, weight_decay=cfg.weight_decay),
                                "frozen": optax.set_to_zero()}, trained)


def _galore(cfg: TrainConfig, schedule, params: dict, task: Any):
  import jax
  import numpy as np
  import optax

  import optax_memopt

  dims = None  # optax's default: every 2-D leaf
  if cfg.projection == "layers":  # the same leaves as AdaRankGrad's default
    inside = optax_memopt.block_labels(params)
    dims = jax.tree.map(
        lambda label, p: optax.contrib.GaLoreDimensionNumbers(0, 1)
        if p.ndim == 2 and np.all(np.asarray(label) >= 0) else None, inside, params,
        is_leaf=lambda x: isinstance(x, tuple))
  return optax.contrib.galore(schedule, rank=cfg.rank, update_proj_gap=cfg.galore_update_gap,
                              weight_decay=cfg.weight_decay, weight_dimension_numbers=dims)


def _badam(cfg: TrainConfig, schedule, params: dict, task: Any):
  import optax_memopt

  return optax_memopt.badam(schedule, blocks=badam_labels(cfg, params, task),
                            reset_always_active=cfg.reset_always_active,
                            switch_every=cfg.switch_every, switch_mode=cfg.switch_mode,
                            seed=cfg.seed, weight_decay=cfg.weight_decay,
                            accumulate_every=cfg.grad_accum)


def _badam_ratio(cfg: TrainConfig, schedule, params: dict, task: Any):
  import optax_memopt

  return optax_memopt.badam_ratio(schedule, update_ratio=cfg.update_ratio,
                                  always_active=always_active_patterns(cfg, task) or None,
                                  switch_every=cfg.switch_every, seed=cfg.seed,
                                  weight_decay=cfg.weight_decay)


def _adarankgrad(cfg: TrainConfig, schedule, params: dict, task: Any):
  import optax_memopt

  extra = {k: getattr(cfg, k) for k in ("info_threshold", "refresh_threshold", "min_rank")
           if getattr(cfg, k) is not None}
  return optax_memopt.adarankgrad(schedule, max_rank=cfg.rank, weight_decay=cfg.weight_decay,
                                  moment_transform=cfg.moment_transform,
                                  projection_mask="layers" if cfg.projection == "layers" else None,
                                  **extra)


# What the progress bar shows besides the loss: (opt_state) -> {field: value}.


def _block_probe(opt_state) -> dict:
  import optax_memopt

  return {"block": int(optax_memopt.active_block(opt_state))}


def _rank_probe(opt_state) -> dict:
  import jax
  import numpy as np

  import optax_memopt

  ranks = [np.ravel(np.asarray(r)) for r in jax.tree.leaves(optax_memopt.effective_ranks(opt_state))]
  return {"rank": round(float(np.mean(np.concatenate(ranks))), 2)} if ranks else {}


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One ``--optimizer`` choice: how it is built and what kind of method it is."""

  name: str
  build: Callable[..., optax.GradientTransformation]  # (cfg, schedule, params, task) -> tx
  # Peak learning rate of the examples' short runs when --learning-rate is not given: full AdamW
  # lower than the block, projected and adapter methods, which change fewer directions per step.
  learning_rate: float
  layerwise: bool = False  # a per-leaf update: make_layerwise_step can run it layer by layer
  block_step: bool = False  # trained with make_block_step (only the active block differentiated)
  accumulates: bool = False  # takes --grad-accum micro-batches itself (no optax.MultiSteps)
  adapters: bool = False  # adds LoRA adapters to the model: only they (and a task head) train
  master_in_state: bool = False  # keeps the float32 master copy of what it trains in its state
  switches: bool = False  # trains one part at a time, another every --switch-every steps
  stacked_leaves: bool = True  # handles stacked [L, ...] leaves (--scan-layers) as L matrices
  probe: Callable[[Any], dict] | None = None  # opt_state -> what the progress bar shows


REGISTRY: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", _adamw, 1e-3, layerwise=True),
    Optimizer("adamw_layers", _adamw_layers, 1e-3),
    Optimizer("badam", _badam, 3e-3, block_step=True, accumulates=True, master_in_state=True,
              switches=True, probe=_block_probe),
    Optimizer("badam_ratio", _badam_ratio, 3e-3, master_in_state=True, switches=True),
    Optimizer("adarankgrad", _adarankgrad, 3e-3, layerwise=True, probe=_rank_probe),
    # optax.contrib.galore projects 2-D leaves only (its dimension numbers have no batch axis).
    Optimizer("galore", _galore, 3e-3, stacked_leaves=False),
    # The adapters are added layer by layer to a python list of layers.
    Optimizer("lora", _adamw, 3e-3, adapters=True, stacked_leaves=False),
)}
OPTIMIZERS = tuple(REGISTRY)
LAYERWISE_OPTIMIZERS = tuple(name for name, o in REGISTRY.items() if o.layerwise)
# Each optimizer's default rate, in the order --learning-rate's help lists them. The convergence
# benchmark chooses its own rate per optimizer on a validation split (`--sweep`).
DEFAULT_LEARNING_RATES = {name: REGISTRY[name].learning_rate for name in (
    "adamw", "adamw_layers", "galore", "adarankgrad", "badam", "badam_ratio", "lora")}


def get(name: str) -> Optimizer:
  """The registry's entry of ``name``, or a one-line error listing the choices."""
  if name not in REGISTRY:
    raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  return REGISTRY[name]


# ---------------------------------------------------------------------------------------------
# What the training loop asks.


def add_adapters(model, optimizer: str, cfg: TrainConfig, task: Any):
  """Prepares ``model`` for ``optimizer`` and returns the ``nnx`` filter of what trains.

  LoRA: adapters on the decoder/encoder layers' projections (not an LM head or a task head), and
  the adapters plus the task head train. Any other optimizer: every ``nnx.Param``.
  """
  from flax import nnx

  if not get(optimizer).adapters:
    return nnx.Param
  if getattr(model.config, "scan_layers", False):
    raise UsageError(f"--optimizer {optimizer} needs the layers as a list (no --scan-layers)")
  from examples import lora

  rngs = nnx.Rngs(cfg.seed + 1)
  for layer in model.layers:
    lora.apply_lora(layer, cfg.lora_rank, rngs)
  return trainable_filter(optimizer, task)


def trainable_filter(optimizer: str, task: Any):
  """The ``nnx`` filter of what ``optimizer`` trains: every ``nnx.Param``, or LoRA's adapters and
  the task head."""
  from flax import nnx

  if not get(optimizer).adapters:
    return nnx.Param
  return nnx.Any(nnx.LoRAParam, *[nnx.PathContains(h) for h in task.head])


def make_optimizer(cfg: TrainConfig, name: str, params: dict,
                   task: Any) -> optax.GradientTransformation:
  """The optimizer ``name`` over the trainable ``params`` (a nested dict).

  ``task.from_scratch`` and ``task.head`` decide BAdam's blocks (:func:`badam_labels`): a
  random-init model also trains its embedding and LM head as blocks; a new task head is always
  active (trained at every step, as the BAdam paper and its reference's ``active_modules`` do for a
  classifier), not a block. ``adamw_layers`` is AdamW on BAdam's trainable set (the leaves BAdam
  freezes stay unchanged).
  """
  import optax

  spec = get(name)
  lr = cfg.learning_rate or spec.learning_rate
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, cfg.steps,
                                                end_value=0.1 * lr)
  tx = spec.build(cfg, schedule, params, task)
  if cfg.clip_norm > 0:
    # With BAdam's own accumulation the clip sees each micro-batch's (active block's) gradient;
    # under MultiSteps it sees the window's mean.
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  if cfg.grad_accum > 1 and not spec.accumulates and not cfg.layerwise:
    # (The layer-wise step accumulates itself: make_layerwise_step(accumulate=N).)
    tx = optax.MultiSteps(tx, cfg.grad_accum).gradient_transformation()
  return tx


def optimizer_probe(name: str, opt_state) -> dict:
  """What the progress bar shows besides the loss: BAdam's block, AdaRankGrad's mean rank."""
  probe = get(name).probe
  return probe(opt_state) if probe is not None else {}


def tree_bytes(tree) -> int:
  import jax

  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))
