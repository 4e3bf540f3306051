"""Per-step time of each optimizer relative to AdamW on a CPU-sized Llama, and the refresh speedup.

Every optimizer trains its own copy of the same model on the same batch. Timing is interleaved in
one process: after a warm-up (compilation, and for the BAdam block step one full block-epoch so
that every block's step is compiled), each timed call runs one block-epoch worth of steps
(``D`` steps, ``D`` = number of BAdam blocks) for every optimizer in turn, repeated ``--repeats``
times; the figure is the median per-step time. BAdam switches block every step here
(``switch_every=1``), so each timed call of the block step visits every block once: the lower
blocks (long backward) and the upper ones (short backward) are all counted. AdaRankGrad's steps
include its subspace refreshes as they occur (the table counts the matrices refreshed
during the timed steps).

Gradient accumulation (``--grad-accum N``): on the scanned model, BAdam's block step with its own
one-block accumulator (``badam(accumulate_every=N)``) against ``optax.MultiSteps(adamw)``, both
as the examples build them, timed per micro-batch over one block-epoch of optimizer steps.

The refresh ratio is one optimizer update that recomputes the projection, AdaRankGrad (randomized
SVD) against ``optax.contrib.galore`` (full SVD), for the model's largest weight matrix, measured with
the refresh step ``benchmarks/adarankgrad_refresh.py`` times (``benchmarks/_common.py``).

    python -m benchmarks.speed            # 8 layers, width 512
    python -m benchmarks.speed --quick    # 2 layers, width 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from optax import contrib as optax_contrib

import optax_memopt
from benchmarks import _common as bc
from examples import config, training
from optax_memopt import AdaRankGradState, adarankgrad
from optax_memopt._tree import find_states

VARIANTS = tuple(bc.VARIANTS)
TARGETS = {  # ratio to AdamW, upper bounds (refresh: lower bound on the speedup)
    "badam_dropin": ("<=", 1.0),
    "badam_block": ("<=", 0.7),
    "adarankgrad": ("<=", 1.3),
    "refresh_speedup": (">=", 10.0),
    # Scanned model (one stacked layer run by optax_memopt.scan_layers), the block step's one
    # compiled step against the full-gradient AdamW step on the same scanned model.
    "scanned_block_mean": ("<=", 0.6),
    "scanned_block_top": ("<=", 0.45),
}


# Layer-wise step against the ordinary step of the same optimizer on the same scanned model.
LAYERWISE_PAIRS = (("adamw", "adamw_layerwise"), ("adarankgrad", "adarankgrad_layerwise"))
LAYERWISE_TARGET = ("<=", 1.1)
# Accumulated step per micro-batch: BAdam's block step with its one-block accumulator against
# optax.MultiSteps(adamw), same scanned model (the target).
ACCUMULATION_TARGET = ("<=", 1.05)


def accumulation_rows(shape: str, seq_len: int, batch_size: int, repeats: int,
                      grad_accum: int) -> dict:
  """Per-micro-batch time of the accumulating steps the examples build with ``--grad-accum``:
  BAdam's block step (``badam(accumulate_every=N)``, switching block every optimizer step,
  ascending) and ``optax.MultiSteps(adamw)``, on the scanned model, interleaved: ``repeats``
  rounds of one block-epoch of optimizer steps (``N`` micro-batches each) per variant."""
  model_cfg = bc.llama_config(shape, seq_len=seq_len, scan_layers=True)
  task = bc.llama_task(model_cfg, from_scratch=False)
  cfg = config.TrainConfig(optimizer="adamw", steps=10_000, learning_rate=1e-4, switch_every=1,
                           switch_mode="ascending", grad_accum=grad_accum)
  batch = bc.llama_batch(batch_size, seq_len, model_cfg.vocab_size, abstract=False)
  setups = {"badam_block_accum": bc.make_setup("badam_block", task, cfg, abstract=False),
            "adamw_multisteps": bc.make_setup("adamw", task, cfg, abstract=False)}
  n_blocks = len(bc.block_sizes(setups["badam_block_accum"].labels,
                                setups["badam_block_accum"].params))
  micro = grad_accum * n_blocks
  runners = {v: _runner(s, batch, micro) for v, s in setups.items()}
  for v, (run, _) in runners.items():
    t = time.perf_counter()
    jax.block_until_ready(run())
    print(f"{v} (scanned, {grad_accum} micro-batches): warm-up {time.perf_counter() - t:.1f} s",
          flush=True)
  seconds = bc.interleaved_median({v: run for v, (run, _) in runners.items()}, repeats, warmup=0)
  ratio = seconds["badam_block_accum"] / seconds["adamw_multisteps"]
  op, bound = ACCUMULATION_TARGET
  return {"grad_accum": grad_accum, "micro_batches_per_timed_call": micro, "repeats": repeats,
          "micro_step_s": {v: s / micro for v, s in seconds.items()}, "ratio": ratio,
          "target": f"{op} {bound:g}: {'met' if ratio <= bound else 'missed'}"}


def accumulation_table(acc: dict) -> str:
  t = acc["micro_step_s"]
  return bc.markdown_table(
      ["step", "time per micro-batch", "ratio to MultiSteps(adamw)", "target"],
      [["badam block step, accumulate_every", f"{1e3 * t['badam_block_accum']:.1f} ms",
        f"{acc['ratio']:.2f}x", acc["target"]],
       ["optax.MultiSteps(adamw)", f"{1e3 * t['adamw_multisteps']:.1f} ms", "1.00x", ""]])


def layerwise_rows(shape: str, seq_len: int, batch_size: int, repeats: int, rank: int,
                   pairs=LAYERWISE_PAIRS) -> list[dict]:
  """Per-step time of ``make_layerwise_step`` over the ordinary step (``jax.grad`` + ``tx.update``),
  both on the scanned model (run by ``scan_layers``) and without global-norm clipping (which the
  layer-wise step refuses), timed interleaved: ``repeats`` rounds of 8 steps per variant."""
  model_cfg = bc.llama_config(shape, seq_len=seq_len, scan_layers=True)
  task = bc.llama_task(model_cfg, from_scratch=False)
  cfg = config.TrainConfig(optimizer="adamw", steps=10_000, learning_rate=1e-4, rank=rank,
                           clip_norm=0.0)
  batch = bc.llama_batch(batch_size, seq_len, model_cfg.vocab_size, abstract=False)
  variants = [v for pair in pairs for v in pair]
  runners = {v: _runner(bc.make_setup(v, task, cfg, abstract=False), batch, 8) for v in variants}
  for v, (run, _) in runners.items():
    t = time.perf_counter()
    jax.block_until_ready(run())
    print(f"{v} (scanned): warm-up {time.perf_counter() - t:.1f} s", flush=True)
  seconds = bc.interleaved_median({v: run for v, (run, _) in runners.items()}, repeats, warmup=0)
  op, bound = LAYERWISE_TARGET
  rows = []
  for ordinary, layerwise in pairs:
    ratio = seconds[layerwise] / seconds[ordinary]
    rows.append({"optimizer": ordinary, "ordinary_step_s": seconds[ordinary] / 8,
                 "layerwise_step_s": seconds[layerwise] / 8, "ratio": ratio,
                 "target": f"{op} {bound:g}: {'met' if ratio <= bound else 'missed'}"})
  return rows


def layerwise_table(rows) -> str:
  return bc.markdown_table(
      ["optimizer", "ordinary step (scanned)", "layer-wise step", "layer-wise / ordinary",
       "target"],
      [[r["optimizer"], f"{1e3 * r['ordinary_step_s']:.1f} ms",
        f"{1e3 * r['layerwise_step_s']:.1f} ms", f"{r['ratio']:.2f}x", r["target"]]
       for r in rows])


def _met(key: str, value: float) -> str:
  op, bound = TARGETS[key]
  ok = value <= bound if op == "<=" else value >= bound
  return f"{op} {bound:g}: {'met' if ok else 'missed'}"


def _last_refresh(opt_state) -> list[np.ndarray]:
  """AdaRankGrad's per-matrix step of the last subspace refresh (empty for other optimizers)."""
  states = find_states(opt_state, AdaRankGradState)
  return [np.asarray(x) for s in states for x in jax.tree.leaves(s.last_refresh)]


def _runner(setup: bc.Setup, batch: dict, steps: int):
  """A callable running ``steps`` training steps in place; returns the last loss."""
  state = {"params": setup.params, "opt": setup.opt_state}

  def run():
    loss = None
    for _ in range(steps):
      state["params"], state["opt"], _, (loss, _) = setup.step(state["params"], state["opt"],
                                                               setup.rest, batch)
    return loss

  return run, state


def _scanned(shape: str, seq_len: int, batch_size: int, repeats: int) -> dict:
  """Scanned Llama: each block's step time (block step) against the AdamW step, interleaved; the
  block step's parameters after two block-epochs against the drop-in BAdam's; its trace count."""
  model_cfg = bc.llama_config(shape, seq_len=seq_len, scan_layers=True)
  task = bc.llama_task(model_cfg, from_scratch=False)
  cfg = config.TrainConfig(optimizer="adamw", steps=10_000, learning_rate=1e-4, switch_every=1,
                           switch_mode="ascending")
  batch = bc.llama_batch(batch_size, seq_len, model_cfg.vocab_size, abstract=False)

  # Equality with the drop-in path over two block-epochs, with Adam's eps at 1e-3: with 1e-8, a
  # float32 rounding difference dg in a near-zero gradient entry becomes a step of up to lr * dg / eps
  # (a full step), which measures Adam's amplification, not the block step.
  split = training.Trainable(task.make_model(), nnx.Param)
  tx = optax_memopt.badam(1e-4, switch_every=1, switch_mode="ascending", eps=1e-3)
  paths = {"block": training.make_steps(split, task.loss_fn, tx, "badam")[0],
           "dropin": training.make_steps(split, task.loss_fn, tx, "adamw")[0]}
  n_blocks = len(bc.block_sizes(optax_memopt.block_labels(split.params), split.params))
  eq = {k: [jax.tree.map(jnp.copy, split.params), tx.init(split.params)] for k in paths}
  warm = time.perf_counter()
  for _ in range(2 * n_blocks):
    for k, step in paths.items():
      eq[k][0], eq[k][1], _, (loss, _) = step(eq[k][0], eq[k][1], split.rest, batch)
  jax.block_until_ready(loss)
  traces = paths["block"].trace_count
  rel = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) or 1))
            for a, b in zip(jax.tree.leaves(eq["block"][0]), jax.tree.leaves(eq["dropin"][0]),
                            strict=True))
  del eq, paths

  setups = {v: bc.make_setup(v, task, cfg, abstract=False) for v in ("adamw", "badam_block")}
  state = {v: [s.params, s.opt_state] for v, s in setups.items()}

  def one(v):
    s, st = setups[v], state[v]
    st[0], st[1], _, (loss, _) = s.step(st[0], st[1], s.rest, batch)
    return loss

  for _ in range(n_blocks):  # warm-up: compilation
    jax.block_until_ready(one("badam_block"))
  jax.block_until_ready(one("adamw"))
  warmup_s = time.perf_counter() - warm
  # Timed: per repeat, one AdamW step after each block step (switch_every=1, ascending: the
  # block step visits every block in turn), so each block is paired with an AdamW step timed
  # next to it.
  per_block: dict[int, list[float]] = {b: [] for b in range(n_blocks)}
  adamw: list[float] = []
  for _ in range(repeats * n_blocks):
    block = int(jax.device_get(optax_memopt.active_block(state["badam_block"][1])))
    t = time.perf_counter()
    jax.block_until_ready(one("badam_block"))
    per_block[block].append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(one("adamw"))
    adamw.append(time.perf_counter() - t)
  adamw_s = statistics.median(adamw)
  block_s = {b: statistics.median(ts) for b, ts in per_block.items()}
  mean = statistics.fmean(block_s.values()) / adamw_s
  top = block_s[n_blocks - 1] / adamw_s
  return {
      "model": {k: getattr(model_cfg, k) for k in bc.LLAMA_SHAPES[shape]},
      "adamw_step_s": adamw_s, "block_step_s": {str(b): t for b, t in block_s.items()},
      "ratio_mean": mean, "ratio_top": top, "ratio_bottom": block_s[0] / adamw_s,
      "target_mean": _met("scanned_block_mean", mean), "target_top": _met("scanned_block_top", top),
      "traces_over_two_block_epochs": traces, "max_rel_diff_vs_dropin": rel,
      "warmup_s": warmup_s,
  }


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bc.add_output_args(parser, "speed")
  parser.add_argument("--shape", default=None, choices=tuple(bc.LLAMA_SHAPES),
                      help="model (default: small = 8 layers, width 512; --quick: micro)")
  parser.add_argument("--seq-len", type=int, default=None, help="default 128 (--quick: 64)")
  parser.add_argument("--batch-size", type=int, default=None, help="default 4 (--quick: 2)")
  parser.add_argument("--repeats", type=int, default=None, help="timed block-epochs (default 5)")
  parser.add_argument("--rank", type=int, default=32, help="GaLore rank / AdaRankGrad max rank")
  parser.add_argument("--optimizers", nargs="*", default=list(VARIANTS), choices=VARIANTS)
  parser.add_argument("--no-scanned", action="store_true",
                      help="skip the scanned-model block step section")
  parser.add_argument("--no-layerwise", action="store_true",
                      help="skip the layer-wise against ordinary step table")
  parser.add_argument("--grad-accum", type=int, default=None,
                      help="micro-batches per optimizer step of the accumulation section "
                           "(default 4; --quick: 2)")
  parser.add_argument("--no-accumulation", action="store_true",
                      help="skip the gradient-accumulation section")
  parser.add_argument("--only-accumulation", action="store_true",
                      help="measure only the gradient-accumulation section and merge it into the "
                           "existing --out file")
  parser.add_argument("--only-layerwise", action="store_true",
                      help="measure only the layer-wise against ordinary step table and merge it "
                           "into the existing --out file")
  return parser


def main(argv: Sequence[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  shape = args.shape or ("micro" if args.quick else "small")
  seq_len = args.seq_len or (64 if args.quick else 128)
  batch_size = args.batch_size or (2 if args.quick else 4)
  repeats = args.repeats or (3 if args.quick else 5)
  variants = ["adamw"] + [v for v in args.optimizers if v != "adamw"]
  grad_accum = args.grad_accum or (2 if args.quick else 4)
  env = bc.environment()
  start = time.perf_counter()
  if args.only_accumulation:
    result = json.loads(args.out.read_text())
    result["accumulation"] = {"environment": env, **accumulation_rows(
        shape, seq_len, batch_size, repeats, grad_accum)}
    result["table"] = _with_accumulation(result["table"], result, shape)
    bc.write_json(args.out, result)
    print(result["table"])
    return result
  if args.only_layerwise:
    result = json.loads(args.out.read_text())
    result["layerwise"] = {"environment": env, "repeats": repeats,
                           "rows": layerwise_rows(shape, seq_len, batch_size, repeats, args.rank)}
    result["table"] = _with_layerwise(result["table"], result, shape)
    if "accumulation" in result:
      result["table"] = _with_accumulation(result["table"], result, shape)
    bc.write_json(args.out, result)
    print(result["table"])
    return result

  model_cfg = bc.llama_config(shape, seq_len=seq_len)
  task = bc.llama_task(model_cfg, from_scratch=False)
  cfg = config.TrainConfig(optimizer="adamw", steps=10_000, learning_rate=1e-4, rank=args.rank,
                           switch_every=1, switch_mode="ascending")
  batch = bc.llama_batch(batch_size, seq_len, model_cfg.vocab_size, abstract=False)
  setups = {v: bc.make_setup(v, task, cfg, abstract=False) for v in variants}
  labels = setups.get("badam_block", setups.get("badam_dropin"))
  n_blocks = (len(bc.block_sizes(labels.labels, labels.params)) if labels is not None
              else model_cfg.num_hidden_layers)
  runners = {v: _runner(s, batch, n_blocks) for v, s in setups.items()}
  compile_start = time.perf_counter()
  for v, (run, _) in runners.items():  # warm-up: compile (every block of the block step)
    t = time.perf_counter()
    jax.block_until_ready(run())
    print(f"{v}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
  warmup_s = time.perf_counter() - compile_start
  before = {v: _last_refresh(st["opt"]) for v, (_, st) in runners.items()}
  seconds = bc.interleaved_median({v: run for v, (run, _) in runners.items()}, repeats, warmup=0)
  per_step = {v: s / n_blocks for v, s in seconds.items()}
  rows = []
  for v in variants:
    after = _last_refresh(runners[v][1]["opt"])
    refreshes = int(sum(np.sum(a != b) for a, b in zip(after, before[v], strict=True)))
    rows.append({"optimizer": v, "step_s": per_step[v], "ratio_vs_adamw": per_step[v] / per_step["adamw"],
                 "refreshes_in_timed_steps": refreshes if v == "adarankgrad" else None,
                 "target": _met(v, per_step[v] / per_step["adamw"]) if v in TARGETS else ""})

  # Subspace refresh of the largest weight matrix (MLP: hidden x intermediate).
  m, n = model_cfg.hidden_size, model_cfg.intermediate_size
  grads = bc.low_rank_gradients(m, n)
  refresh_cases = {
      "adarankgrad": bc.refresh_step(
          adarankgrad(1e-3, max_rank=args.rank, max_refresh_interval=1), grads),
      "galore": bc.refresh_step(
          optax_contrib.galore(1e-3, rank=args.rank, update_proj_gap=1), grads),
  }
  refresh = bc.interleaved_median(
      {k: (lambda c=c, a=a: c(*a)) for k, (c, a) in refresh_cases.items()}, max(repeats, 3))
  speedup = refresh["galore"] / refresh["adarankgrad"]
  refresh_row = {"shape": [m, n], "rank": args.rank, "refresh_s": refresh,
                 "speedup_vs_galore": speedup, "target": _met("refresh_speedup", speedup)}

  result = {
      "benchmark": "speed", "complete": True, "quick": args.quick, "environment": env, "shape": shape,
      "model": {k: getattr(model_cfg, k) for k in bc.LLAMA_SHAPES[shape]},
      "seq_len": seq_len, "batch_size": batch_size, "repeats": repeats,
      "steps_per_timed_call": n_blocks, "rank": args.rank, "warmup_s": warmup_s,
      "rows": rows, "refresh": refresh_row,
  }
  table = bc.markdown_table(
      ["optimizer", "step time", "ratio to adamw", "target"],
      [[r["optimizer"], f"{1e3 * r['step_s']:.1f} ms", f"{r['ratio_vs_adamw']:.2f}x",
        r["target"] + (f" ({r['refreshes_in_timed_steps']} matrices refreshed in "
                       f"{repeats * n_blocks} timed steps)"
                       if r["refreshes_in_timed_steps"] is not None else "")] for r in rows])
  refresh_table = bc.markdown_table(
      ["matrix", "rank", "refresh: adarankgrad", "refresh: galore", "speedup", "target"],
      [[f"{m}x{n}", args.rank, f"{1e3 * refresh['adarankgrad']:.1f} ms",
        f"{1e3 * refresh['galore']:.1f} ms", f"{speedup:.1f}x", refresh_row["target"]]])
  sections = []
  if not args.no_scanned:
    sc = _scanned(shape, seq_len, batch_size, repeats)
    result["scanned"] = sc
    blocks = sc["block_step_s"]
    sections = [
        f"Scanned model (the layers stacked and run by `optax_memopt.scan_layers`), BAdam's block "
        f"step (one compiled step for all {len(blocks)} blocks: {sc['traces_over_two_block_epochs']} "
        f"trace over two block-epochs; parameters after them within "
        f"{sc['max_rel_diff_vs_dropin']:.1e} relative of the drop-in path's) against the AdamW "
        f"step on the same model, each block step timed next to an AdamW step, median of {repeats}:",
        bc.markdown_table(
            ["block step", "time", "ratio to adamw", "target"],
            [[f"block {b}", f"{1e3 * t:.1f} ms", f"{t / sc['adamw_step_s']:.2f}x",
              sc["target_top"] if int(b) == len(blocks) - 1 else ""] for b, t in blocks.items()]
            + [["mean over blocks", f"{1e3 * sc['ratio_mean'] * sc['adamw_step_s']:.1f} ms",
                f"{sc['ratio_mean']:.2f}x", sc["target_mean"]],
               ["adamw (full gradient)", f"{1e3 * sc['adamw_step_s']:.1f} ms", "1.00x", ""]]),
    ]
  result["wall_s"] = time.perf_counter() - start
  result["table"] = "\n\n".join([
      bc.environment_header(env),
      f"Llama {shape} ({model_cfg.num_hidden_layers} layers, width {model_cfg.hidden_size}, "
      f"vocab {model_cfg.vocab_size}), float32, batch {batch_size} x {seq_len} tokens; median of "
      f"{repeats} interleaved block-epochs of {n_blocks} steps; BAdam switches block every step:",
      table,
      "Subspace refresh (one update that recomputes the projection):",
      refresh_table,
      *sections,
  ])
  if not args.no_layerwise:
    result["layerwise"] = {"environment": env, "repeats": repeats,
                           "rows": layerwise_rows(shape, seq_len, batch_size, repeats, args.rank)}
    result["table"] = _with_layerwise(result["table"], result, shape)
  if not args.no_accumulation:
    result["accumulation"] = {"environment": env, **accumulation_rows(
        shape, seq_len, batch_size, repeats, grad_accum)}
    result["table"] = _with_accumulation(result["table"], result, shape)
  bc.write_json(args.out, result)
  print(result["table"])
  return result


_ACCUMULATION_MARKER = "\n\nGradient accumulation"


def _with_accumulation(table: str, result: dict, shape: str) -> str:
  """``table`` with the gradient-accumulation section last (replacing an earlier one)."""
  table = table.split(_ACCUMULATION_MARKER)[0]
  acc = result["accumulation"]
  when = ("" if acc["environment"]["date"] == result["environment"]["date"]
          else f" Measured later: {bc.environment_header(acc['environment'])}")
  return table + _ACCUMULATION_MARKER + (
      f" ({acc['grad_accum']} micro-batches per optimizer step, as `--grad-accum` builds it) on "
      f"the scanned Llama {shape}: BAdam's block step with its one-block accumulator against "
      f"`optax.MultiSteps(adamw)`, per micro-batch; median of {acc['repeats']} interleaved rounds "
      f"of {acc['micro_batches_per_timed_call']} micro-batches.{when}\n\n"
      + accumulation_table(acc))


def _with_layerwise(table: str, result: dict, shape: str) -> str:
  """``table`` with the layer-wise section (replacing an earlier one)."""
  marker = "\n\nLayer-wise step"
  table = table.split(_ACCUMULATION_MARKER)[0].split(marker)[0]
  lw = result["layerwise"]
  when = ("" if lw["environment"]["date"] == result["environment"]["date"]
          else f" Measured later: {bc.environment_header(lw['environment'])}")
  return table + marker + (
      f" (`make_layerwise_step`) against the ordinary step of the same optimizer, both on the "
      f"scanned Llama {shape} (layers run by `scan_layers`), no gradient clipping; median of "
      f"{lw['repeats']} interleaved rounds of 8 steps.{when}\n\n" + layerwise_table(lw["rows"]))


if __name__ == "__main__":
  main()
