"""The optimizers the examples compare: the factory, LoRA adapters, and what the progress bar shows.

Every optimizer sees the trainable parameters as a plain nested dict (paths such as
``layers.3.mlp.gate_proj.kernel``, from which BAdam's :func:`optax_memopt.block_labels` finds one
block per layer). LoRA is the one optimizer that changes the model: :func:`add_adapters` wraps the
layers' linear maps in ``nnx.LoRA`` and only the adapters (and a task head) train.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_memopt
from examples.config import DEFAULT_LEARNING_RATES, OPTIMIZERS, TrainConfig, UsageError


def apply_lora(module: nnx.Module, rank: int, rngs: nnx.Rngs) -> None:
  """Wraps every ``nnx.Linear`` below ``module`` in ``nnx.LoRA`` (``lora_b`` starts at zero)."""
  for name, value in list(vars(module).items()):
    if isinstance(value, nnx.Linear):
      lora = nnx.LoRA(value.in_features, rank, value.out_features, base_module=value,
                      param_dtype=value.param_dtype, rngs=rngs)
      setattr(module, name, lora)
    elif isinstance(value, nnx.Module):
      apply_lora(value, rank, rngs)
    elif isinstance(value, list | tuple | nnx.List):
      for item in value:
        if isinstance(item, nnx.Module):
          apply_lora(item, rank, rngs)


def merge_lora(module: nnx.Module) -> None:
  """Replaces every ``nnx.LoRA`` below ``module`` by its base ``nnx.Linear`` with the adapter
  folded in (``kernel + lora_a @ lora_b``): the plain model, e.g. to export it."""
  for name, value in list(vars(module).items()):
    if isinstance(value, nnx.LoRA):
      linear = value.base_module
      delta = jnp.asarray(value.lora_a[...], jnp.float32) @ jnp.asarray(value.lora_b[...],
                                                                        jnp.float32)
      kernel = linear.kernel[...]
      linear.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
      setattr(module, name, linear)
    elif isinstance(value, nnx.Module):
      merge_lora(value)
    elif isinstance(value, list | tuple | nnx.List):
      for item in value:
        if isinstance(item, nnx.Module):
          merge_lora(item)


def add_adapters(model: nnx.Module, optimizer: str, cfg: TrainConfig, task: Any):
  """Prepares ``model`` for ``optimizer`` and returns the ``nnx`` filter of what trains.

  LoRA: adapters on the decoder/encoder layers' projections (not an LM head or a task head), and
  the adapters plus the task head train. Any other optimizer: every ``nnx.Param``.
  """
  if optimizer != "lora":
    return nnx.Param
  if getattr(model.config, "scan_layers", False):
    raise UsageError("--optimizer lora needs the layers as a list (no --scan-layers)")
  rngs = nnx.Rngs(cfg.seed + 1)
  for layer in model.layers:
    apply_lora(layer, cfg.lora_rank, rngs)
  return nnx.Any(nnx.LoRAParam, *[nnx.PathContains(h) for h in task.head])


def always_active_patterns(cfg: TrainConfig, task: Any) -> list[str]:
  """The regular expressions of the leaves BAdam trains at every step: a new task head (unless
  ``--no-always-active-head``) and ``--always-active``'s."""
  head = [re.escape(h) for h in task.head] if cfg.always_active_head else []
  return head + [p.strip() for p in cfg.always_active.split(",") if p.strip()]


def _checked_labels(cfg: TrainConfig, params: dict, always: list[str], **kwargs):
  """``optax_memopt.block_labels(params, ...)``, with a pattern that matches nothing (or empties a
  block) as one line naming the option."""
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


def make_optimizer(cfg: TrainConfig, name: str, params: dict,
                   task: Any) -> optax.GradientTransformation:
  """The optimizer ``name`` over the trainable ``params`` (a nested dict).

  ``task.from_scratch`` and ``task.head`` decide BAdam's blocks (:func:`badam_labels`): a
  random-init model also trains its embedding and LM head as blocks; a new task head is always
  active (trained at every step, as the BAdam paper and its reference's ``active_modules`` do for a
  classifier), not a block. ``adamw_layers`` is AdamW on BAdam's trainable set (the leaves BAdam
  freezes stay unchanged).
  """
  lr = cfg.learning_rate or DEFAULT_LEARNING_RATES.get(name, 1e-3)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, cfg.steps,
                                                end_value=0.1 * lr)
  if name in ("adamw", "lora"):
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif name == "adamw_layers":  # AdamW on BAdam's trainable set (the papers' Adam)
    labels = badam_labels(cfg, params, task)
    trained = jax.tree.map(lambda label: "train" if np.all(np.asarray(label) != -1) else "frozen",
                           labels, is_leaf=lambda x: isinstance(x, tuple))
    tx = optax.multi_transform({"train": optax.adamw(schedule, weight_decay=cfg.weight_decay),
                                "frozen": optax.set_to_zero()}, trained)
  elif name == "galore":
    dims = None  # optax's default: every 2-D leaf
    if cfg.projection == "layers":  # the same leaves as AdaRankGrad's default
      inside = optax_memopt.block_labels(params)
      dims = jax.tree.map(
          lambda label, p: optax.contrib.GaLoreDimensionNumbers(0, 1)
          if p.ndim == 2 and np.all(np.asarray(label) >= 0) else None, inside, params,
          is_leaf=lambda x: isinstance(x, tuple))
    tx = optax.contrib.galore(schedule, rank=cfg.rank, update_proj_gap=cfg.galore_update_gap,
                              weight_decay=cfg.weight_decay, weight_dimension_numbers=dims)
  elif name == "badam":
    tx = optax_memopt.badam(schedule, blocks=badam_labels(cfg, params, task),
                            reset_always_active=cfg.reset_always_active,
                            switch_every=cfg.switch_every, switch_mode=cfg.switch_mode,
                            seed=cfg.seed, weight_decay=cfg.weight_decay,
                            accumulate_every=cfg.grad_accum)
  elif name == "badam_ratio":
    tx = optax_memopt.badam_ratio(schedule, update_ratio=cfg.update_ratio,
                                  always_active=always_active_patterns(cfg, task) or None,
                                  switch_every=cfg.switch_every, seed=cfg.seed,
                                  weight_decay=cfg.weight_decay)
  elif name == "adarankgrad":
    extra = {k: getattr(cfg, k) for k in ("info_threshold", "refresh_threshold", "min_rank")
             if getattr(cfg, k) is not None}
    tx = optax_memopt.adarankgrad(schedule, max_rank=cfg.rank, weight_decay=cfg.weight_decay,
                                  moment_transform=cfg.moment_transform,
                                  projection_mask="layers" if cfg.projection == "layers" else None,
                                  **extra)
  else:
    raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  if cfg.clip_norm > 0:
    # With BAdam's own accumulation the clip sees each micro-batch's (active block's) gradient;
    # under MultiSteps it sees the window's mean.
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  if cfg.grad_accum > 1 and name != "badam" and not cfg.layerwise:
    # (The layer-wise step accumulates itself: make_layerwise_step(accumulate=N).)
    tx = optax.MultiSteps(tx, cfg.grad_accum).gradient_transformation()
  return tx


def optimizer_probe(name: str, opt_state) -> dict:
  """What the progress bar shows besides the loss: BAdam's block, AdaRankGrad's mean rank."""
  if name == "badam":
    return {"block": int(optax_memopt.active_block(opt_state))}
  if name == "adarankgrad":
    ranks = [np.ravel(np.asarray(r)) for r in jax.tree.leaves(optax_memopt.effective_ranks(opt_state))]
    return {"rank": round(float(np.mean(np.concatenate(ranks))), 2)} if ranks else {}
  return {}


def tree_bytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))
