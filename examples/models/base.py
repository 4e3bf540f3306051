"""Pieces shared by the example models: dtypes, attention, the layer stack and HF checkpoint I/O.

Parameters are moved between the NNX model and a Hugging Face checkpoint through a *weight map*: a
list of ``(path, hf_name, transpose)`` where ``path`` is the parameter's path in the model with
the layers as a python list (``("layers", 3, "mlp", "gate_proj", "kernel")``) and ``transpose`` is
set for torch ``nn.Linear`` weights, stored ``(out, in)`` where ``nnx.Linear`` kernels are
``(in, out)``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optax_memopt

WeightMap = list[tuple[tuple[Any, ...], str, bool]]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
  return DTYPES[name]


def dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


def init_normal(stddev: float = 0.02):
  return nnx.initializers.normal(stddev)


def dot_product_attention(q, k, v, mask):
  """Softmax attention with grouped query heads, computed in float32.

  Args:
    q: ``(batch, q_len, num_heads, head_dim)``.
    k, v: ``(batch, kv_len, num_kv_heads, head_dim)``, ``num_heads`` a multiple of
      ``num_kv_heads``.
    mask: boolean ``(batch, q_len, kv_len)``, True where a query may attend to a key.

  Returns:
    ``(batch, q_len, num_heads * head_dim)`` in the dtype of ``q``.
  """
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(d).astype(np.float32)
  # A large finite value, not -inf, so that fully masked (padding) rows stay finite.
  logits = jnp.where(mask[:, None, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, n * d)


# ---------------------------------------------------------------------------------------------
# The layer stack: a python list (param paths ``layers.3....``) or one scanned, stacked module.


def make_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs,
                scan: bool):
  if not scan:
    return nnx.List([make_layer(rngs) for _ in range(num_layers)])

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make_layer(rngs)

  return create(rngs)


def apply_layers(layers, x, *args, scan: bool, remat: bool):
  """Runs ``x = layer(x, *args)`` through the stack; ``args`` are shared by every layer.

  The scanned stack runs through ``optax_memopt.scan_layers`` (a ``lax.scan`` whose backward pass
  differentiates only BAdam's active layer under ``make_block_step``): the stacked module is split
  into its parameters and the rest of its state (RNG streams of dropout, running statistics), merged
  again inside each step, and the state the layers write comes back into ``layers``, as
  ``nnx.scan`` would leave it.
  """
  if not scan:
    body = nnx.remat(lambda layer, x, *args: layer(x, *args)) if remat else None
    for layer in layers:
      x = body(layer, x, *args) if remat else layer(x, *args)
    return x

  graphdef, params, rest = nnx.split(layers, nnx.Param, ...)

  def one(layer_params, x, *args, state):
    layer = nnx.merge(graphdef, layer_params, state)
    return layer(x, *args), nnx.state(layer, nnx.Not(nnx.Param))

  if remat:
    one = jax.checkpoint(one)
  x, rest = optax_memopt.scan_layers(one, params, x, *args, state=rest)
  nnx.update(layers, rest)
  return x


def stack_layers(tree: dict, num_layers: int) -> dict:
  """List-form pure dict (``layers: {0: ..., 1: ...}``) → scan form (one stacked ``layers``)."""
  tree = dict(tree)
  tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree["layers"][i]
                                                              for i in range(num_layers)])
  return tree


def unstack_layers(tree: dict, num_layers: int) -> dict:
  tree = dict(tree)
  stacked = tree["layers"]
  tree["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
  return tree


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints.


def read_hf_config(path: str | pathlib.Path, model_types: Sequence[str]):
  """Reads ``config.json`` with transformers' AutoConfig, locally, and checks the model type."""
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise ValueError(f"{path} has no config.json: pass a Hugging Face checkpoint directory")
  from transformers import AutoConfig

  hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
  if hf_config.model_type not in model_types:
    raise ValueError(f"{path} holds a {hf_config.model_type!r} model; this loader reads "
                     f"{' or '.join(model_types)}")
  return hf_config


def read_safetensors(path: str | pathlib.Path) -> dict[str, jax.Array]:
  from safetensors.flax import load_file

  files = sorted(pathlib.Path(path).glob("*.safetensors"))
  if not files:
    raise ValueError(f"{path} has no *.safetensors weights")
  tensors = {}
  for f in files:
    tensors.update(load_file(str(f)))
  return tensors


def _nested_set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _nested_get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def load_weights(model: nnx.Module, tensors: dict, weight_map: WeightMap, *, base_prefix: str,
                 num_layers: int, scan: bool) -> None:
  """Copies checkpoint tensors into ``model``'s parameters (in the model's param dtype).

  A name missing from ``tensors`` is also looked up without ``base_prefix``, so that checkpoints of
  the bare base model (``layers.0...`` instead of ``model.layers.0...``) load too.
  """
  state = nnx.state(model, nnx.Param)
  current = nnx.to_pure_dict(state)  # shapes and dtypes (the model may be abstract)
  if scan:
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), current["layers"])
    current = {**current, "layers": dict.fromkeys(range(num_layers), one)}
  new: dict = {}
  for path, hf_name, transpose in weight_map:
    name = hf_name
    if name not in tensors and name.startswith(base_prefix):
      name = name[len(base_prefix):]
    if name not in tensors:
      raise ValueError(f"checkpoint has no tensor {hf_name!r}")
    value = tensors[name]
    if transpose:
      value = value.T
    ref = _nested_get(current, path)
    if value.shape != ref.shape:
      raise ValueError(f"{hf_name}: checkpoint shape {value.shape} != model shape {ref.shape}")
    _nested_set(new, path, jnp.asarray(value, ref.dtype))
  if scan:
    new = stack_layers(new, num_layers)
  nnx.replace_by_pure_dict(state, new)
  nnx.update(model, state)


def export_weights(model: nnx.Module, weight_map: WeightMap, *, num_layers: int,
                   scan: bool) -> dict[str, np.ndarray]:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if scan:
    params = unstack_layers(params, num_layers)
  out = {}
  for path, hf_name, transpose in weight_map:
    value = _nested_get(params, path)
    out[hf_name] = jnp.asarray(value.T if transpose else value)
  return out


def write_hf_checkpoint(path: str | pathlib.Path, hf_config, tensors: dict) -> None:
  """Writes ``config.json`` and ``model.safetensors`` as transformers' ``save_pretrained`` does."""
  from safetensors.flax import save_file

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  hf_config.save_pretrained(str(path))
  save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"),
            metadata={"format": "pt"})
