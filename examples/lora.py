"""LoRA adapters as model surgery: wrap a model's linear maps in ``nnx.LoRA``, and fold them back.

``examples/optimizers.py`` adds them for ``--optimizer lora``; ``examples/checkpoints.py`` merges them
before a Hugging Face export.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


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
