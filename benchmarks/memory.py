"""Training-step memory of each optimizer on Llama shapes, from tiny up to Llama 2-7B and Llama 3-8B.

Nothing is allocated: models are built with ``nnx.eval_shape`` and optimizer states with
``jax.eval_shape(tx.init, params)``. Two tables:

* **Mixed-precision account (headline)**, exact from the abstract trees: bf16 weights; the
  BAdam family (``badam``, ``badam_ratio``) runs on the bf16 weights directly, so its optimizer
  state is the library's own state on bf16 params (for ``badam`` that includes the float32 master
  copy of the active block) and its gradients are bf16 (all of them for the drop-in and the ratio
  variant, one block's for the block step); the other optimizers use the usual fp32-master mixed
  precision (fp32 master copy, fp32 gradients and fp32 optimizer state of what they train, the
  convention behind the papers' "Adam 18 bytes per parameter"). Activations are not counted; the
  papers' totals include them.
* **XLA compiled step (float32 configs)**: one training step per optimizer compiled by XLA for
  this backend, batch 1 and a short sequence, with ``compiled.memory_analysis()``: arguments
  (params + optimizer state + batch), outputs, aliased (donated) bytes, temporaries, and a peak
  estimate ``arguments + outputs - aliased + temporaries``. Only float32 configs are compiled:
  XLA on CPU widens bf16 matmul operands to f32, which would inflate bf16 temporaries. For
  ``badam_block`` the step of block 0 (the lowest layer: backpropagation through every layer) is
  compiled, the worst case over blocks. The Llama 2-7B and Llama 3-8B shapes are compiled
  with their layers stacked and run by ``nnx.scan`` (``scan_layers``), as large models are trained:
  the compile time no longer grows with the number of layers, and the optimizer states equal the
  list form's (the account below is taken on the list form). LoRA's adapters need the layers as a
  list, and ``optax.contrib.galore`` projects only 2-D leaves, so their cells stay unscanned.

* **Layer-wise updates** (``optax_memopt.make_layerwise_step``): the account gains
  ``adarankgrad_layerwise_bf16``, pure bf16 training (bf16 weights and AdaRankGrad state, no master
  copy) whose gradients are one layer's plus those of the leaves outside the stack; the XLA table
  gains ``adarankgrad_layerwise``, the float32 layer-wise step compiled on the scanned model.

* **Activation memory of the block step** at a realistic batch (``--activation-shape``, batch
  ``--activation-batch`` x ``--activation-seq``): XLA's temporaries of BAdam's block step for the
  bottom and the top layer block, with the layers as a list and stacked (run by ``scan_layers``),
  and of the drop-in step, without a global-norm clip (on a stack, a clip before BAdam materialises
  the clipped stack gradient, which would hide the activations).

* **Gradient accumulation** (``--grad-accum N``, scanned bf16 models of ``ACCUM_ACCOUNT_SHAPES``):
  the accumulator bytes of ``badam(accumulate_every=N)`` (one block's, float32, in the optimizer
  state) against ``optax.MultiSteps(badam)``'s and ``optax.MultiSteps(adamw)``'s (float32, every
  parameter), exact from the abstract states; the XLA table gains ``badam_block_accum`` (the block
  step with BAdam's accumulator) and ``adamw_multisteps``, one micro-step each. The accumulation
  table also gains ``adarankgrad_layerwise_accum``: pure bf16 AdaRankGrad with layer-wise updates
  and ``make_layerwise_step(accumulate=N)``, one optimizer step over ``N`` micro-batches of
  ``1 x --accum-seq`` compiled by XLA: the model states are XLA's arguments (less the batch), the
  accumulator is one layer's float32 gradient sum (transient, inside the step), and the
  micro-batches' layer inputs it keeps (``N x L x 1 x seq x d``, bf16) are stated beside them.

    python -m benchmarks.memory            # every shape and optimizer
    python -m benchmarks.memory --quick    # account for tiny and Llama 2-7B, XLA for tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence

import jax
import optax

import optax_memopt
from benchmarks import _common as bc
from examples import config
from optax_memopt._tree import find_states

VARIANTS = tuple(bc.VARIANTS)
FULL_XLA_SHAPES = ("tiny", "small", "1b", "llama2-7b", "llama3-8b")
QUICK_XLA_SHAPES = ("tiny",)
QUICK_ACCOUNT_SHAPES = ("tiny", "llama2-7b")
ACCOUNT_SHAPES = ("tiny", "small", "1b", "llama2-7b", "llama3-8b")
# Shapes whose XLA step is compiled from the scanned (stacked) model. With a python list of layers
# AdaRankGrad's step (a randomized SVD, rank selection and moment transformation per matrix inside
# lax.cond) compiles for minutes at these sizes (its compile column in RESULTS.md); stacked, each
# kind of matrix is one batched computation whatever the number of layers.
SCANNED_XLA_SHAPES = ("llama2-7b", "llama3-8b")
# Layer-wise steps (optax_memopt.make_layerwise_step) compiled on the scanned model of every XLA
# shape, and the pure-bf16 layer-wise rows of the account.
LAYERWISE_XLA = ("adarankgrad_layerwise",)
LAYERWISE_ACCOUNT = ("adarankgrad_layerwise_bf16",)
SLOW_CELLS: set[tuple[str, str]] = set()
# The block step's activation memory: a model whose activations at this batch dwarf its weights.
ACTIVATION = {"shape": "small", "batch": 8, "seq": 512}
QUICK_ACTIVATION = {"shape": "micro", "batch": 2, "seq": 32}
# Gradient accumulation: XLA variants (one micro-step of the accumulating step) -> the benchmark
# variant they are built from with TrainConfig.grad_accum (examples.optimizers: BAdam's own
# accumulator, optax.MultiSteps for the others), and the shapes of the accumulator account.
ACCUMULATED = {"badam_block_accum": "badam_block", "adamw_multisteps": "adamw"}
ACCUM_ACCOUNT_SHAPES = ("llama2-7b", "llama3-8b")
# AdaRankGrad layer-wise with accumulation: model states + accumulator targets (decimal bytes).
LAYERWISE_ACCUM = "adarankgrad_layerwise_accum"
LAYERWISE_ACCUM_TARGET = {"llama2-7b": 16.5e9}

# BAdam paper (arXiv:2404.02827 v3), totals including activations, seq 728 batch 2, decimal GB.
PAPER_GB = {
    ("llama2-7b", "badam_block"): "21.8 GB",
    ("llama2-7b", "adamw"): "120 GB+",
    ("llama3-8b", "badam_block"): "23.5 GB (params 16.1, grads 0.9, states 2.6)",
    ("llama3-8b", "adamw"): "144.8 GB+",
    ("llama3-8b", "lora"): "22.3 GB",
}


def _train_config(args) -> config.TrainConfig:
  return config.TrainConfig(optimizer="adamw", steps=1000, rank=args.rank, lora_rank=args.lora_rank,
                            switch_every=100)


def mixed_precision_account(shape: str, args) -> list[dict]:
  """Exact bytes of weights, master copy, gradients and optimizer state per optimizer."""
  cfg = _train_config(args)
  rows = []
  setups = {}
  for dtype in ("float32", "bfloat16"):
    model_cfg = bc.llama_config(shape, seq_len=args.seq_len, param_dtype=dtype)
    task = bc.llama_task(model_cfg, from_scratch=False)
    for variant in VARIANTS:
      if variant == "badam_block":  # same optimizer state as the drop-in
        continue
      setups[variant, dtype] = bc.make_setup(variant, task, cfg, abstract=True)
  full = setups["adamw", "float32"]
  n_model = bc.tree_size(full.params)
  for variant in VARIANTS:
    key = "badam_dropin" if variant == "badam_block" else variant
    s32, s16 = setups[key, "float32"], setups[key, "bfloat16"]
    trained = bc.tree_size(s32.params)
    weights = 2 * (n_model + (trained if bc.optimizer(variant).adapters else 0))
    if bc.optimizer(variant).master_in_state:
      master = 0  # inside the optimizer state (badam keeps the active block's f32 copy)
      state = bc.tree_bytes(s16.opt_state)
      if variant == "badam_block":
        grad_params = max(bc.block_sizes(s16.labels, s16.params).values())
      else:
        grad_params = trained
      grads = 2 * grad_params
    else:
      master, grads = 4 * trained, 4 * trained
      state = bc.tree_bytes(s32.opt_state)
    rows.append({
        "shape": shape, "optimizer": variant, "model_params": n_model, "trained_params": trained,
        "weights_bytes": weights, "master_bytes": master, "grad_bytes": grads,
        "opt_state_bytes": state, "total_bytes": weights + master + grads + state,
        "opt_state_bytes_f32_params": bc.tree_bytes(s32.opt_state),
        "paper": PAPER_GB.get((shape, variant), ""),
    })
  return rows


def layerwise_account(shape: str, args) -> list[dict]:
  """Pure bf16 AdaRankGrad with layer-wise updates: bf16 weights and state, no master copy.

  Gradients: one layer's (the layer-wise step holds no other gradient of the stack) plus those
  of the leaves outside the stack (embedding, head, final norm), all counted as live at once
  (XLA may free the head's before the stack's backward pass: an upper bound).
  """
  cfg = _train_config(args)
  model_cfg = bc.llama_config(shape, seq_len=args.seq_len, param_dtype="bfloat16",
                              scan_layers=True)
  setup = bc.make_setup("adarankgrad_layerwise", bc.llama_task(model_cfg, from_scratch=False),
                        cfg, abstract=True)
  n_model = bc.tree_size(setup.params)
  layers = model_cfg.num_hidden_layers
  stack = bc.tree_size(setup.params["layers"])
  grads = 2 * (stack // layers + n_model - stack)
  weights, state = 2 * n_model, bc.tree_bytes(setup.opt_state)
  return [{
      "shape": shape, "optimizer": "adarankgrad_layerwise_bf16", "model_params": n_model,
      "trained_params": n_model, "weights_bytes": weights, "master_bytes": 0,
      "grad_bytes": grads, "opt_state_bytes": state, "total_bytes": weights + grads + state,
      "one_layer_grad_bytes": 2 * (stack // layers), "outer_grad_bytes": 2 * (n_model - stack),
      "paper": "",
  }]


STACK_CHECK = (("badam_dropin", "float32"), ("badam_dropin", "bfloat16"),
               ("adarankgrad", "float32"))


def stacked_vs_list(shape: str, args) -> list[dict]:
  """Optimizer state of the same model with its layers as a list and as one scanned stack.

  For BAdam also one layer's AdamW state (two float32 moments, plus its float32 master copy for
  bf16 weights): what the state should be whatever the form of the layers.
  """
  cfg = _train_config(args)
  rows = []
  for variant, dtype in STACK_CHECK:
    state, layer = {}, 0
    for scan in (False, True):
      model_cfg = bc.llama_config(shape, seq_len=args.seq_len, param_dtype=dtype, scan_layers=scan)
      setup = bc.make_setup(variant, bc.llama_task(model_cfg, from_scratch=False), cfg,
                            abstract=True)
      state[scan] = bc.tree_bytes(setup.opt_state)
      if not scan:
        layer = bc.tree_size(setup.params["layers"][0])
    row = {"shape": shape, "optimizer": variant, "param_dtype": dtype,
           "list_bytes": state[False], "stacked_bytes": state[True],
           "stacked_over_list": state[True] / state[False]}
    if bc.optimizer(variant).master_in_state:
      row["one_layer_adamw_bytes"] = 8 * layer + (4 * layer if dtype == "bfloat16" else 0)
      row["stacked_over_one_layer"] = state[True] / row["one_layer_adamw_bytes"]
    rows.append(row)
  return rows


def accumulation_account(shape: str, args) -> list[dict]:
  """Accumulator and optimizer-state bytes with ``--grad-accum`` micro-batches per step, scanned
  bf16 model, from the abstract states: BAdam's one-block accumulator against MultiSteps'."""
  cfg = dataclasses.replace(_train_config(args), grad_accum=args.grad_accum)
  model_cfg = bc.llama_config(shape, seq_len=args.seq_len, param_dtype="bfloat16",
                              scan_layers=True)
  task = bc.llama_task(model_cfg, from_scratch=False)
  badam = bc.make_setup("badam_block", task, cfg, abstract=True)
  plain = bc.make_setup("badam_block", task, _train_config(args), abstract=True)
  n_layers = model_cfg.num_hidden_layers
  one_layer = bc.tree_size(badam.params["layers"]) // n_layers
  rows = []
  for name, state in (
      ("badam_block_accum", badam.opt_state),
      ("multisteps_badam", jax.eval_shape(optax.MultiSteps(plain.tx, args.grad_accum).init,
                                          plain.params)),
      ("multisteps_adamw", bc.make_setup("adamw", task, cfg, abstract=True).opt_state),
  ):
    multi = find_states(state, optax.MultiStepsState)
    acc_bytes = (bc.tree_bytes(multi[0].acc_grads) if multi else
                 sum(bc.tree_bytes(s.accumulator.grads)
                     for s in find_states(state, optax_memopt.BlockCoordinateState)))
    rows.append({"shape": shape, "optimizer": name, "grad_accum": args.grad_accum,
                 "layers": n_layers, "accumulator_bytes": acc_bytes,
                 "one_layer_f32_bytes": 4 * one_layer, "opt_state_bytes": bc.tree_bytes(state)})
  if args.layerwise_accum:
    rows.append(layerwise_accumulation_row(shape, args))
  full = next(r["accumulator_bytes"] for r in rows if r["optimizer"] == "multisteps_badam")
  for r in rows:
    r["accumulator_over_multisteps"] = r["accumulator_bytes"] / full
  return rows


def layerwise_accumulation_row(shape: str, args) -> dict:
  """AdaRankGrad layer-wise with ``accumulate=N`` on the scanned model in pure bf16 (weights,
  state and activations): one optimizer step over ``N`` micro-batches of ``1 x args.accum_seq``,
  compiled by XLA.

  Model states: XLA's argument bytes less the batch's (the weights and the optimizer state, which
  the step updates in place). Accumulator: one layer's gradient, summed over the micro-batches in
  float32 (the only accumulator; it lives inside the step, one layer at a time). Micro-batch
  carries: the input of every layer for every micro-batch, which the forward pass keeps for the
  backward pass (``N x L x 1 x seq x d``, bf16), stated separately: they grow with ``N`` and the
  sequence, unlike the states. XLA's temporaries (carries, one micro-batch's recomputed layer,
  the accumulator, the gradients outside the stack, the logits) are reported as measured; XLA on
  CPU widens bf16 matmul operands to float32, which inflates them.
  """
  n, seq = args.grad_accum, args.accum_seq
  cfg = dataclasses.replace(_train_config(args), grad_accum=n)

  def compiled(dtype):
    model_cfg = bc.llama_config(shape, seq_len=seq, param_dtype=dtype, dtype=dtype,
                                scan_layers=True)
    setup = bc.make_setup("adarankgrad_layerwise", bc.llama_task(model_cfg, from_scratch=False),
                          cfg, abstract=True)
    micro = bc.llama_batch(1, seq, model_cfg.vocab_size, abstract=True)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), micro)
    return model_cfg, setup, batch, setup.lower(batch).compile().memory_analysis()

  start = time.perf_counter()
  model_cfg, setup, batch, m = compiled("bfloat16")
  # XLA on CPU widens bf16 matmul operands to float32 (and hoists the widened stacked weights out
  # of the layer loop), which inflates the bf16 step's temporaries: they are also read from the
  # float32 configuration, whose activations are twice the bf16 ones.
  m32 = compiled("float32")[3]
  compile_s = time.perf_counter() - start
  layers, d = model_cfg.num_hidden_layers, model_cfg.hidden_size
  one_layer = bc.tree_size(setup.params["layers"]) // layers
  states = int(m.argument_size_in_bytes) - bc.tree_bytes(batch)
  accumulator = 4 * one_layer
  target = LAYERWISE_ACCUM_TARGET.get(shape)
  return {
      "shape": shape, "optimizer": LAYERWISE_ACCUM, "grad_accum": n, "layers": layers,
      "micro_batch": f"1 x {seq}", "accumulator_bytes": accumulator,
      "one_layer_f32_bytes": 4 * one_layer, "opt_state_bytes": bc.tree_bytes(setup.opt_state),
      "model_states_bytes": states, "states_plus_accumulator_bytes": states + accumulator,
      "tree_states_bytes": bc.tree_bytes((setup.params, setup.rest, setup.opt_state)),
      "target_bytes": target, "xla_temp_bytes": int(m.temp_size_in_bytes),
      "xla_temp_bytes_f32": int(m32.temp_size_in_bytes),
      "carries_bytes_f32": n * layers * 1 * seq * d * 4,
      "xla_alias_bytes": int(m.alias_size_in_bytes),
      "carries_bytes": n * layers * 1 * seq * d * 2, "compile_s": compile_s,
  }


def _accumulation_target(r) -> str:
  if r["optimizer"] == "badam_block_accum":
    return "<= 1/L: " + ("met" if r["accumulator_over_multisteps"] <= 1 / r["layers"] else "missed")
  if r["optimizer"] == LAYERWISE_ACCUM and r.get("target_bytes"):
    met = r["states_plus_accumulator_bytes"] <= r["target_bytes"]
    return f"states + accumulator <= {bc.gb(r['target_bytes'])}: {'met' if met else 'missed'}"
  return ""


def accumulation_table(rows) -> str:
  return bc.markdown_table(
      ["model", "optimizer", "micro-batches", "accumulator", "one layer (fp32)",
       "accumulator / MultiSteps'", "target", "optimizer state incl. accumulator"],
      [[r["shape"] + " (scanned, bf16)", r["optimizer"], r["grad_accum"],
        bc.gb(r["accumulator_bytes"]), bc.gb(r["one_layer_f32_bytes"]),
        f"{r['accumulator_over_multisteps']:.4f}", _accumulation_target(r),
        # The layer-wise step's accumulator is not in its state: counted beside it.
        bc.gb(r["opt_state_bytes"] + (r["accumulator_bytes"] if r["optimizer"] == LAYERWISE_ACCUM
                                      else 0))]
       for r in rows])


def layerwise_accumulation_table(rows) -> str:
  return bc.markdown_table(
      ["model", "micro-batches", "model states (XLA arguments less the batch)",
       "+ accumulator (one layer, fp32)", "micro-batch carries (N x L x b x S x d, bf16)",
       "XLA temporaries, float32 config (its carries)", "XLA temporaries, bf16 (CPU widens)",
       "compiles"],
      [[r["shape"] + " (scanned, bf16)", f"{r['grad_accum']} x {r['micro_batch']}",
        bc.gb(r["model_states_bytes"]), bc.gb(r["states_plus_accumulator_bytes"]),
        bc.gb(r["carries_bytes"]),
        f"{bc.gb(r['xla_temp_bytes_f32'])} ({bc.gb(r['carries_bytes_f32'])})",
        bc.gb(r["xla_temp_bytes"]), f"{r['compile_s']:.1f} s"]
       for r in rows if r["optimizer"] == LAYERWISE_ACCUM])


def stack_table(rows) -> str:
  return bc.markdown_table(
      ["model", "optimizer", "weights", "state, layers as a list", "state, layers stacked",
       "stacked / list", "one layer's AdamW state (+ fp32 master)", "stacked / one layer"],
      [[r["shape"], r["optimizer"], r["param_dtype"], f"{r['list_bytes']:,} B",
        f"{r['stacked_bytes']:,} B", f"{r['stacked_over_list']:.4f}",
        f"{r['one_layer_adamw_bytes']:,} B" if "one_layer_adamw_bytes" in r else "",
        f"{r['stacked_over_one_layer']:.4f}" if "stacked_over_one_layer" in r else ""]
       for r in rows])


def xla_step(shape: str, variant: str, args) -> dict:
  """Compiles one float32 training step abstractly and reads XLA's memory analysis."""
  cfg = _train_config(args)
  base = ACCUMULATED.get(variant, variant)
  if variant in ACCUMULATED:
    cfg = dataclasses.replace(cfg, grad_accum=args.grad_accum)
  # (LoRA's adapters go on a python list of layers; optax.contrib.galore projects 2-D leaves only.)
  scanned = ((shape in args.scan_shapes and bc.optimizer(base).stacked_leaves)
             or variant in LAYERWISE_XLA)
  model_cfg = bc.llama_config(shape, seq_len=args.seq_len, scan_layers=scanned)
  task = bc.llama_task(model_cfg, from_scratch=False)
  setup = bc.make_setup(base, task, cfg, abstract=True)
  batch = bc.llama_batch(1, args.seq_len, model_cfg.vocab_size, abstract=True)
  start = time.perf_counter()
  lowered = setup.lower(batch, block=0)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  row = {
      "shape": shape, "optimizer": variant, "seq_len": args.seq_len, "batch": 1,
      "scan_layers": scanned,
      "params_bytes": bc.tree_bytes(setup.params) + bc.tree_bytes(setup.rest),
      "opt_state_bytes": bc.tree_bytes(setup.opt_state),
      "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
      "compile_s": compile_s,
  }
  if variant in ACCUMULATED:
    row["grad_accum"] = args.grad_accum
  row["peak_bytes"] = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                       + row["temp_bytes"])
  return row


def activation_rows(shape: str, batch_size: int, seq_len: int, args) -> list[dict]:
  """XLA's temporaries of the block step (bottom and top layer block) and of the drop-in step,
  the layers as a list and stacked, at batch ``batch_size`` x ``seq_len``, without a clip."""
  cfg = dataclasses.replace(_train_config(args), clip_norm=0.0)
  rows = []
  for scanned in (False, True):
    model_cfg = bc.llama_config(shape, seq_len=seq_len, scan_layers=scanned)
    task = bc.llama_task(model_cfg, from_scratch=False)
    batch = bc.llama_batch(batch_size, seq_len, model_cfg.vocab_size, abstract=True)
    top = model_cfg.num_hidden_layers - 1  # blocks 0..L-1 are the layers, input to output
    cells = [("badam_block", 0, "block step, bottom layer (block 0)"),
             ("badam_block", top, f"block step, top layer (block {top})"),
             ("badam_dropin", 0, "drop-in (jax.grad + tx.update)")]
    for variant, block, what in cells:
      setup = bc.make_setup(variant, task, cfg, abstract=True)
      m = setup.lower(batch, block=block).compile().memory_analysis()
      rows.append({"shape": shape, "batch": batch_size, "seq_len": seq_len,
                   "layers": "stacked (scan_layers)" if scanned else "list",
                   "optimizer": variant, "block": block, "step": what,
                   "temp_bytes": int(m.temp_size_in_bytes)})
  return rows


def activation_table(rows) -> str:
  return bc.markdown_table(
      ["model", "batch", "layers", "step", "temporaries"],
      [[r["shape"], f"{r['batch']} x {r['seq_len']}", r["layers"], r["step"],
        f"{r['temp_bytes'] / 2**20:,.1f} MiB"] for r in rows])


def account_table(rows) -> str:
  return bc.markdown_table(
      ["model", "optimizer", "trained params", "weights (bf16)", "fp32 master", "gradients",
       "optimizer state", "total (no activations)", "paper (incl. activations)"],
      [[r["shape"], r["optimizer"], f"{r['trained_params'] / 1e6:,.1f} M", bc.gb(r["weights_bytes"]),
        bc.gb(r["master_bytes"]) if r["master_bytes"] else "in state",
        bc.gb(r["grad_bytes"]), bc.gb(r["opt_state_bytes"]), bc.gb(r["total_bytes"]),
        r["paper"]] for r in rows])


def xla_table(rows) -> str:
  return bc.markdown_table(
      ["model", "optimizer", "params", "optimizer state (exact)", "arguments", "outputs",
       "aliased", "temporaries", "peak estimate", "compile"],
      [[r["shape"] + (" (scanned)" if r.get("scan_layers") else ""), r["optimizer"],
        bc.gb(r["params_bytes"]), bc.gb(r["opt_state_bytes"]),
        bc.gb(r["argument_bytes"]), bc.gb(r["output_bytes"]), bc.gb(r["alias_bytes"]),
        bc.gb(r["temp_bytes"]), bc.gb(r["peak_bytes"]), f"{r['compile_s']:.1f} s"]
       for r in rows])


def _merged(old: dict, new: dict) -> dict:
  """``old`` (an earlier complete run) with the account and XLA cells of ``new`` replacing or
  joining its own; the new cells' environment is recorded under ``merged``."""
  out = dict(old)
  cells = []
  for part in ("account", "xla"):
    rows = list(old[part])
    for row in new[part]:
      key = (row["shape"], row["optimizer"])
      cells.append(f"{part} {key[0]}/{key[1]}")
      same = [i for i, r in enumerate(rows) if (r["shape"], r["optimizer"]) == key]
      if same:
        rows[same[0]] = row
      else:  # after the last row of its shape
        last = max((i for i, r in enumerate(rows) if r["shape"] == row["shape"]), default=-1)
        rows.insert(last + 1 if last >= 0 else len(rows), row)
    out[part] = rows
  if new.get("activations"):
    out["activations"] = new["activations"]
    cells.append("activations")
  if new.get("accumulation"):
    out["accumulation"] = new["accumulation"]
    cells.append("accumulation")
  out["merged"] = list(old.get("merged", [])) + [{"environment": new["environment"],
                                                   "cells": cells}]
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bc.add_output_args(parser, "memory")
  parser.add_argument("--xla-shapes", nargs="*", default=None, choices=tuple(bc.LLAMA_SHAPES),
                      help="shapes to compile (default: all; --quick: tiny)")
  parser.add_argument("--account-shapes", nargs="*", default=None, choices=tuple(bc.LLAMA_SHAPES),
                      help="shapes of the mixed-precision account (default: all; --quick: tiny, llama2-7b)")
  parser.add_argument("--optimizers", nargs="*", default=list(VARIANTS), choices=VARIANTS)
  parser.add_argument("--seq-len", type=int, default=64, help="sequence length of the XLA steps")
  parser.add_argument("--rank", type=int, default=128, help="GaLore rank / AdaRankGrad max rank")
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--scan-shapes", nargs="*", default=list(SCANNED_XLA_SHAPES),
                      choices=tuple(bc.LLAMA_SHAPES),
                      help="shapes whose XLA step is compiled from the scanned (stacked) model")
  parser.add_argument("--layerwise", nargs="*", default=list(LAYERWISE_XLA), choices=LAYERWISE_XLA,
                      help="layer-wise steps to compile (on the scanned model of every XLA shape)")
  parser.add_argument("--activation-shape", default=None, choices=tuple(bc.LLAMA_SHAPES),
                      help="model of the block step's activation-memory table (default: "
                           f"{ACTIVATION['shape']}; --quick: {QUICK_ACTIVATION['shape']})")
  parser.add_argument("--activation-batch", type=int, default=None,
                      help=f"its batch size (default: {ACTIVATION['batch']})")
  parser.add_argument("--activation-seq", type=int, default=None,
                      help=f"its sequence length (default: {ACTIVATION['seq']})")
  parser.add_argument("--only-activations", action="store_true",
                      help="compute only the activation-memory table (with --merge: update it "
                           "in the existing --out file)")
  parser.add_argument("--accumulated", nargs="*", default=list(ACCUMULATED), choices=ACCUMULATED,
                      help="gradient-accumulation steps to compile (one micro-step each)")
  parser.add_argument("--grad-accum", type=int, default=8,
                      help="micro-batches per optimizer step of the accumulation rows")
  parser.add_argument("--accum-shapes", nargs="*", default=None, choices=tuple(bc.LLAMA_SHAPES),
                      help="shapes of the accumulator account (default: Llama 2-7B and 3-8B; "
                           "--quick: tiny)")
  parser.add_argument("--layerwise-accum", action=argparse.BooleanOptionalAction, default=True,
                      help="add AdaRankGrad layer-wise with accumulate=N to the accumulation rows "
                           "(one XLA compile per --accum-shapes shape)")
  parser.add_argument("--accum-seq", type=int, default=512,
                      help="sequence length of its micro-batches (batch 1 each)")
  parser.add_argument("--only-accumulation", action="store_true",
                      help="compute only the gradient-accumulation rows (with --merge: replace "
                           "them in the existing --out file)")
  parser.add_argument("--merge", action="store_true",
                      help="update these cells in the existing --out file (an earlier complete "
                           "run) instead of replacing it")
  parser.add_argument("--all-cells", action="store_true",
                      help="also compile the cells listed as slow (none at present)")
  args = parser.parse_args(argv)
  xla_shapes = args.xla_shapes if args.xla_shapes is not None else (
      QUICK_XLA_SHAPES if args.quick else FULL_XLA_SHAPES)
  account_shapes = args.account_shapes if args.account_shapes is not None else (
      QUICK_ACCOUNT_SHAPES if args.quick else ACCOUNT_SHAPES)
  act = QUICK_ACTIVATION if args.quick else ACTIVATION
  act = {"shape": args.activation_shape or act["shape"],
         "batch": args.activation_batch or act["batch"], "seq": args.activation_seq or act["seq"]}
  if args.only_activations or args.only_accumulation:
    xla_shapes, account_shapes = [], []
  env = bc.environment()
  start = time.perf_counter()
  result = {"benchmark": "memory", "quick": args.quick, "environment": env,
            "seq_len": args.seq_len, "rank": args.rank, "lora_rank": args.lora_rank,
            "account": [], "stacked_vs_list": [], "accumulation": [], "xla": [], "skipped": []}
  for shape in account_shapes:
    rows = [r for r in mixed_precision_account(shape, args) if r["optimizer"] in args.optimizers]
    result["account"] += rows
    if "adarankgrad" in args.optimizers:
      result["account"] += layerwise_account(shape, args)
    print(f"account {shape}: done", flush=True)
  for shape in account_shapes:
    result["stacked_vs_list"] += stacked_vs_list(shape, args)
  accum_shapes = args.accum_shapes if args.accum_shapes is not None else (
      ("tiny",) if args.quick else ACCUM_ACCOUNT_SHAPES)
  if args.only_activations:
    accum_shapes = []
  for shape in accum_shapes:
    result["accumulation"] += accumulation_account(shape, args)
    print(f"accumulation {shape}: done", flush=True)
  for what, chosen in (("XLA compile", xla_shapes), ("mixed-precision account", account_shapes)):
    left_out = [s for s in bc.LLAMA_SHAPES if s not in chosen]
    if left_out:
      why = ("--only-activations" if args.only_activations else "--only-accumulation"
             if args.only_accumulation else "--quick" if args.quick
             else "not selected on the command line")
      result["skipped"].append(f"{what} of {', '.join(left_out)}: {why}")
  for shape in xla_shapes:
    for variant in list(args.optimizers) + list(args.layerwise) + list(args.accumulated):
      if (shape, variant) in SLOW_CELLS and not args.all_cells:
        result["skipped"].append(f"XLA {shape}/{variant}: compiles for many minutes on CPU; "
                                 "run with --all-cells")
        continue
      try:
        row = xla_step(shape, variant, args)
      except Exception as e:  # report a failed cell instead of losing the table
        msg = f"XLA {shape}/{variant}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(msg, flush=True)
        result["skipped"].append(msg)
        continue
      print(f"xla {shape}/{variant}: peak {bc.gb(row['peak_bytes'])}, "
            f"compile {row['compile_s']:.1f} s", flush=True)
      result["xla"].append(row)
      if not args.merge:
        bc.write_json(args.out, result | {"complete": False})
  result["activations"] = []
  if not args.only_accumulation:
    result["activations"] = activation_rows(act["shape"], act["batch"], act["seq"], args)
    print(f"activations {act['shape']}: done", flush=True)
  result["wall_s"] = time.perf_counter() - start
  result["complete"] = True
  if args.merge:
    result = _merged(json.loads(args.out.read_text()), result)
    env = result["environment"]
  result["table"] = "\n\n".join([
      bc.environment_header(env),
      "Mixed-precision account (exact, from the abstract trees; bf16 weights; GB = 1e9 bytes):",
      account_table(result["account"]),
      "Optimizer state with the layers as a list and stacked (scanned), same model:",
      stack_table(result["stacked_vs_list"]),
  ] + ([
      "Gradient accumulation: accumulator bytes (exact, from the abstract states; GB = 1e9 bytes):",
      accumulation_table(result["accumulation"]),
  ] if result.get("accumulation") else []) + ([
      "AdaRankGrad with layer-wise updates and accumulation (make_layerwise_step(accumulate=N), "
      "pure bf16; one optimizer step over N micro-batches compiled by XLA; the accumulator is "
      "one layer's gradient, transient; the carries, every layer's input for every micro-batch, "
      "are part of the temporaries and grow with N and the sequence; XLA on CPU widens bf16 "
      "matmul operands to float32, so the temporaries are also given for the float32 config):",
      layerwise_accumulation_table(result["accumulation"]),
  ] if any(r["optimizer"] == LAYERWISE_ACCUM for r in result.get("accumulation", [])) else []) + [
      f"XLA compiled training step, float32 configs, batch 1, sequence {args.seq_len}, "
      f"{env['backend']} backend (bf16 configs are not compiled: XLA on CPU widens bf16 matmul "
      "operands to f32 and would inflate the temporaries):",
      xla_table(result["xla"]),
      f"Activation memory of the block step: XLA's temporaries at batch {act['batch']} x "
      f"{act['seq']}, float32, no global-norm clip (the list form's bottom block backpropagates "
      "through every layer; its top block through one):",
      activation_table(result["activations"]),
  ] + (["Not computed: " + "; ".join(result["skipped"])] if result["skipped"] else [])
    + [f"Cells {', '.join(m['cells'])} measured later: {bc.environment_header(m['environment'])}"
       for m in result.get("merged", [])])
  bc.write_json(args.out, result)
  print(result["table"])
  return result


if __name__ == "__main__":
  main()
