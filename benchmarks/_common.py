"""What the benchmark scripts share: environment header, timing, tables, JSON, optimizer setups.

Optimizer construction, the model split and the training steps are the examples' own
(``examples/optimizers.py``, ``examples/training.py``); this module only names the benchmark
variants on top of them:

* ``badam_dropin``: ``optax_memopt.badam`` used as an ordinary optax transformation
  (``jax.grad`` of every parameter, then ``tx.update``);
* ``badam_block``: the same optimizer through ``optax_memopt.make_block_step``, which
  differentiates only the active block (what ``examples/training.py`` uses for ``badam``).

What kind of method a variant's optimizer is (block step, adapters, master copy in the state,
stacked leaves...) is the examples' optimizer registry's answer: :func:`optimizer`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_memopt
from examples import config, optimizers, training
from examples.models import llama

RESULTS = pathlib.Path(__file__).parent / "results"

# Benchmark variant -> the examples' optimizer name.
VARIANTS = {
    "adamw": "adamw",
    "badam_dropin": "badam",
    "badam_block": "badam",
    "badam_ratio": "badam_ratio",
    "adarankgrad": "adarankgrad",
    "galore": "galore",
    "lora": "lora",
}

# Layer-wise variants (optax_memopt.make_layerwise_step: the optimizer runs inside the backward
# pass, layer by layer): the examples' optimizer, on a scanned model, without global-norm clipping.
LAYERWISE = {
    "adamw_layerwise": "adamw",
    "adarankgrad_layerwise": "adarankgrad",
}

LLAMA_SHAPES = {
    # name: LlamaConfig fields (vocab, hidden, layers, heads, kv heads, intermediate)
    "micro": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=128),
    "tiny": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=384),
    "small": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1536),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632),  # TinyLlama-1.1B
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                      rope_theta=500000.0),
}


# ---------------------------------------------------------------------------------------------
# Environment, tables, JSON.


def environment() -> dict:
  """Machine, date and library versions, recorded with every result."""
  import flax

  return {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "machine": platform.machine(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "load_average": [round(x, 2) for x in os.getloadavg()],
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "backend": jax.default_backend(),
  }


def environment_header(env: dict) -> str:
  return (f"Machine: {env['platform']} ({env['processor']}), {env['cpu_count']} CPUs, "
          f"backend {env['backend']}, load average {env['load_average'][0]:.1f} at start. "
          f"Date: {env['date']}. Versions: jax {env['jax']}, optax {env['optax']}, "
          f"flax {env['flax']}, python {env['python']}.")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def gb(n: float) -> str:
  """Bytes as decimal gigabytes (the papers' GB), or MB below 1 GB."""
  return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def write_json(path: pathlib.Path, result: dict) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=float))


def add_output_args(parser, default_name: str) -> None:
  parser.add_argument("--quick", action="store_true", help="small settings, under 2 minutes")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS / f"{default_name}.json",
                      help="JSON output path")


# ---------------------------------------------------------------------------------------------
# Timing.


def interleaved_median(cases: dict[str, Callable[[], Any]], repeats: int,
                       warmup: int = 1) -> dict[str, float]:
  """Median seconds of each zero-argument callable, timed round-robin so that load drifts hit all.

  Each call's result is waited for (``jax.block_until_ready``) inside the timed region.
  """
  for _ in range(warmup):
    for fn in cases.values():
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(repeats):
    for name, fn in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------------------
# Subspace refreshes (benchmarks/adarankgrad_refresh.py, and the refresh row of benchmarks/speed.py).


def low_rank_gradients(m: int, n: int, count: int = 4, spectrum_rank: int = 64) -> jax.Array:
  """``count`` gradients sharing a decaying low-rank part, with small independent noise."""

  @jax.jit
  def make(key):
    ka, kb, kn = jax.random.split(key, 3)
    decay = 0.9 ** jnp.arange(spectrum_rank, dtype=jnp.float32)
    a = jax.random.normal(ka, (m, spectrum_rank)) * decay / jnp.sqrt(m)
    b = jax.random.normal(kb, (spectrum_rank, n)) / jnp.sqrt(n)
    noise = 0.01 * jax.random.normal(kn, (count, m, n)) / jnp.sqrt(float(m * n))
    return (a @ b)[None] + noise

  return make(jax.random.key(0))


def compiled(fn: Callable, *args):
  """``fn`` jitted, lowered and compiled for ``args``."""
  return jax.jit(fn).lower(*args).compile()


def refresh_step(tx: optax.GradientTransformation, grads: jax.Array):
  """A compiled update that refreshes, and its arguments (state after one ordinary step)."""
  params = {"w": jnp.zeros_like(grads[0])}
  state = tx.init(params)
  _, state = jax.jit(tx.update)({"w": grads[0]}, state, params)
  fn = lambda g, s, p: tx.update({"w": g}, s, p)
  args = (grads[1], state, params)
  return compiled(fn, *args), args


# ---------------------------------------------------------------------------------------------
# Models and optimizer setups, on the examples' machinery.


def tree_bytes(tree) -> int:
  """Exact bytes of a tree of arrays or ``ShapeDtypeStruct`` (sum of size * itemsize)."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def tree_size(tree) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def llama_config(shape: str | dict, *, seq_len: int, param_dtype: str = "float32",
                 dtype: str = "float32", scan_layers: bool = False) -> llama.LlamaConfig:
  fields = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
  return llama.LlamaConfig(**fields, max_position_embeddings=max(seq_len, 16),
                           param_dtype=param_dtype, dtype=dtype, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, scan_layers=scan_layers)


def llama_task(model_cfg: llama.LlamaConfig, *, from_scratch: bool, seed: int = 0) -> training.Task:
  """A Task for ``make_optimizer`` (no data): the instruction-tuning loss of the Llama example."""
  from examples import finetune_llama

  empty = {"weight": np.zeros(0, np.float32)}
  return training.Task(name="bench", make_model=lambda: llama.Llama(model_cfg, rngs=nnx.Rngs(seed)),
                     loss_fn=finetune_llama.lm_loss, train_data=empty, eval_data=empty,
                     from_scratch=from_scratch)


def llama_batch(batch: int, seq_len: int, vocab: int, *, abstract: bool, seed: int = 0) -> dict:
  if abstract:
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    return {"input_ids": ids, "attention_mask": ids, "loss_mask": ids,
            "weight": jax.ShapeDtypeStruct((batch,), jnp.float32)}
  rng = np.random.default_rng(seed)
  ones = np.ones((batch, seq_len), np.int32)
  return {"input_ids": rng.integers(3, vocab, (batch, seq_len), dtype=np.int32),
          "attention_mask": ones, "loss_mask": ones, "weight": np.ones(batch, np.float32)}


@dataclasses.dataclass
class Setup:
  """One optimizer variant on one model: trainable params, frozen rest, optimizer, step."""

  variant: str
  params: Any  # trainable parameters (nested dict; ShapeDtypeStruct leaves when abstract)
  rest: Any  # frozen part of the model (LoRA bases)
  tx: optax.GradientTransformation
  opt_state: Any
  step: Any  # step(params, opt_state, rest, batch) -> (params, opt_state, (loss, aux))
  labels: Any = None  # BAdam block labels of params

  def lower(self, batch, block: int = 0):
    if self.variant == "badam_block":
      return self.step.lower(block, self.params, self.opt_state, self.rest, batch)
    return self.step.lower(self.params, self.opt_state, self.rest, batch)


def optimizer(variant: str) -> optimizers.Optimizer:
  """The examples' registry entry of a benchmark variant's optimizer (``badam_block`` -> badam)."""
  return optimizers.get({**VARIANTS, **LAYERWISE}[variant])


def _model(task: training.Task, optimizer: str, cfg: config.TrainConfig) -> nnx.Module:
  """``task``'s model as the examples train it with ``optimizer`` (LoRA: with its adapters)."""
  model = task.make_model()
  optimizers.add_adapters(model, optimizer, cfg, task)
  return model


def make_setup(variant: str, task: training.Task, cfg: config.TrainConfig, *,
               abstract: bool) -> Setup:
  """The examples' model split, optimizer and training step for ``variant``.

  ``abstract``: build the model with ``nnx.eval_shape`` and the optimizer state with
  ``jax.eval_shape(tx.init, params)``: nothing is allocated.
  """
  layerwise = variant in LAYERWISE
  name = LAYERWISE[variant] if layerwise else VARIANTS[variant]
  if layerwise:  # a global-norm clip needs the whole gradient; accumulation is the step's own
    cfg = dataclasses.replace(cfg, clip_norm=0.0, layerwise=True)
  build = functools.partial(_model, task, name, cfg)
  model = nnx.eval_shape(build) if abstract else build()
  split = training.Trainable(model, optimizers.trainable_filter(name, task))
  tx = optimizers.make_optimizer(cfg, name, split.params, task)
  if abstract:
    opt_state = jax.eval_shape(tx.init, split.params)
  else:
    opt_state = jax.tree.map(jnp.copy, tx.init(split.params))
  # The examples' step for "badam" is the block step; any other name gives jax.grad + tx.update.
  step, _ = training.make_steps(split, task.loss_fn, tx,
                               "badam" if variant == "badam_block" else "adamw",
                               layerwise=layerwise, grad_accum=cfg.grad_accum)
  labels = None
  if optimizer(variant).block_step:
    labels = optax_memopt.block_labels(split.params, include_embedding=task.from_scratch,
                                       include_lm_head=task.from_scratch or bool(task.head))
  return Setup(variant, split.params, split.rest, tx, opt_state, step, labels)


def block_sizes(labels, params) -> dict[int, int]:
  """Parameter count of each BAdam block (frozen leaves and slices, label -1, left out).

  A stacked leaf's label is one block id per slice of its leading (layer) axis.
  """
  sizes: dict[int, int] = {}
  flat = jax.tree_util.tree_structure(params).flatten_up_to(labels)
  for lab, x in zip(flat, jax.tree.leaves(params), strict=True):
    if isinstance(lab, (int, np.integer)):
      per = {int(lab): int(np.prod(x.shape))}
    else:
      per = {}
      for b in lab:
        per[int(b)] = per.get(int(b), 0) + int(np.prod(x.shape[1:]))
    for b, n in per.items():
      if b >= 0:
        sizes[b] = sizes.get(b, 0) + n
  return sizes
