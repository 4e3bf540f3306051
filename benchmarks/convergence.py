"""Held-out loss and accuracy of each optimizer on the examples' tasks over several seeds, against
steps and time, with learning rates chosen on a validation split.

The tasks are the examples' own, built and trained by ``examples/training.py`` (``build_task`` and
``train``). ``roberta-pretrained`` (sequence classification of pydoc paragraphs, three classes) and
``llama-pretrained`` (instruction tuning on the pydoc instruction set, loss on the response
tokens) are the papers' setting and the default: a random-init model is first pretrained with
AdamW on the Python reference manual (masked language modelling on the paragraphs that are not
held out for RoBERTa, causal language modelling on the paragraphs that are not responses for
Llama; ``--pretrain-steps``), once per pretraining configuration (the examples cache the
weights in ``--pretrain-cache``), then fine-tuned by every optimizer from the same weights, with
BAdam's embedding (and Llama's LM head) frozen. ``roberta`` and ``llama`` (random-init models,
BAdam also trains the embedding and the head) can be asked for with ``--tasks``.

Optimizers: ``adamw`` trains every parameter; ``adamw_layers`` is AdamW on BAdam's trainable set
(the transformer layers and the task head, embedding frozen: the papers' Adam), so that the
comparison separates the algorithm from what it trains; ``badam`` is the examples' BAdam, trained
with the block step (``make_block_step``), switching blocks so that a run covers at least
``--block-epochs`` block-epochs (``switch_every`` is chosen from the run's steps and block count,
and reported). GaLore and AdaRankGrad get the same rank (GaLore's rank, AdaRankGrad's maximum
rank).

Learning rates: ``--sweep`` trains each optimizer at a few peak learning rates on the training
split minus a validation split (``VALIDATION_FRACTION`` of the training examples; the held-out
split is never looked at) and writes ``convergence_sweep.json`` with the rate of lowest
validation loss per task and optimizer; the benchmark reads the chosen rates from that file
(``--learning-rates``), and falls back to the examples' defaults (said so in the output) for a
task or optimizer the sweep did not cover.

Every task x optimizer cell runs once per seed. The task itself (held-out split, tokenizer,
pretraining, initialisation and task head) is built once, with the examples' ``--seed`` set to
``--model-seed`` (default 0), as the papers fine-tune one pretrained checkpoint; a seed is the
fine-tuning's ``--seed``: the data order, BAdam's block order and LoRA's adapters (``--model-seed
-1`` builds a task per seed instead). All optimizers of one seed run one after the other, so they
also share the machine's load. Tables give mean +- std over the seeds, and a majority-class row
(the held-out accuracy and loss of always predicting the training split's class frequencies); each
target is checked on the per-seed differences (paired by seed) and says whether it holds beyond
their spread (mean +- one std on the target's side). BAdam's targets are not assessed on a task
where AdamW does not clearly learn (held-out accuracy below the majority share + 0.15).

Time: two clocks. The measured time is the cumulative time of the training steps (the first step,
which compiles, and the evaluations are left out; BAdam's block step compiles once per block
inside the run, and those compilations are counted). The time at the median step time, ``(step -
1) x`` the run's median step time, leaves out the compilations a long run amortises; the plots use
it, so curves against time show what BAdam's cheaper steps buy. The time to reach AdamW's final
held-out loss (same seed) is read at the evaluations (every ``--eval-every`` steps), on both
clocks.

Writes the JSON and one PNG per task (loss against step and against time), next to the JSON.

    python -m benchmarks.convergence --sweep    # learning-rate sweep on validation, seed 0
    python -m benchmarks.convergence            # the benchmark at the swept rates, 3 seeds
    python -m benchmarks.convergence --quick    # roberta-pretrained, 2-layer model, 10 steps, 2 seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from benchmarks import _common as bc
from examples import cli, finetune_llama, finetune_roberta, training
from examples import optimizers as registry  # (`optimizers` names the optimizer lists below)

TASKS = {"llama": finetune_llama, "llama-pretrained": finetune_llama, "roberta": finetune_roberta,
         "roberta-pretrained": finetune_roberta}
PRETRAINED = ("llama-pretrained", "roberta-pretrained")
DEFAULT_TASKS = ("roberta-pretrained", "llama-pretrained")
# Pretraining steps (AdamW, once per task and seed, cached by the examples; every optimizer
# starts from the same weights).
PRETRAIN_STEPS = {"full": {"llama-pretrained": 800, "roberta-pretrained": 800},
                  "quick": {"llama-pretrained": 10, "roberta-pretrained": 10}}
DEFAULT_OPTIMIZERS = ("adamw", "adamw_layers", "badam", "galore", "adarankgrad", "lora")
BLOCK_EPOCHS = 2  # BAdam covers every block at least this many times in a run
VALIDATION_FRACTION = 0.2  # of the training examples: the sweep's validation split
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # the sweep's rates: these multiples of the examples' default
QUICK_SWEEP_FACTORS = (1.0, 3.0)
SWEEP_EXTEND = 2  # rates added beyond an end of the grid that has the lowest validation loss
SWEEP_OUT = bc.RESULTS / "convergence_sweep.json"
# The examples' seed of each task (split, tokenizer, pretraining, initialisation): one pretrained
# model per task, fine-tuned with every seed (which varies the data order, BAdam's block order and
# LoRA's adapters), as the papers fine-tune one checkpoint.
MODEL_SEED = 0
QUICK_TASKS = ("roberta-pretrained",)  # quick: one task, under 2 minutes
QUICK_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--intermediate-size", "128",
               "--num-heads", "2", "--max-examples", "400", "--seq-len", "64"]
QUICK_LLAMA = ["--num-kv-heads", "1"]
# Targets (issue 18): BAdam's held-out accuracy within 2 points of AdamW's and its held-out loss
# within 5% (classification) / 3% (language modelling); AdaRankGrad's held-out loss at most 1.02x
# GaLore's; and the gate: AdamW clearly learns (accuracy >= majority share + 0.15).
BADAM_ACC_GAP = 0.02
BADAM_LOSS_GAP = {"classification": 0.05, "lm": 0.03}
ADARANKGRAD_RATIO = 1.02
LEARNS_MARGIN = 0.15


def expected_blocks(name: str, options: Sequence[str]) -> int:
  """BAdam's block count on task ``name``: one per layer, plus the embedding of a random-init
  model and a random-init Llama's LM head (a RoBERTa task head is always active, not a block,
  unless ``--no-always-active-head``)."""
  layers = 4
  for i, o in enumerate(options[:-1]):
    if o == "--num-layers":
      layers = int(options[i + 1])
  head = 1 if name.startswith("roberta") and "--no-always-active-head" in options else 0
  if name in PRETRAINED:
    return layers + head
  return layers + head + (2 if name.startswith("llama") else 1)


def switch_every(name: str, steps: int, options: Sequence[str],
                 block_epochs: int = BLOCK_EPOCHS) -> int:
  """Steps per block so that ``steps`` cover at least ``block_epochs`` block-epochs."""
  return max(1, steps // (block_epochs * expected_blocks(name, options)))


def task_options(name: str, steps: int, batch_size: int, quick: bool,
                 eval_every: int | None = None, pretrain_steps: int | None = None,
                 extra: Sequence[str] = (), block_epochs: int = BLOCK_EPOCHS) -> list[str]:
  """The example options of a benchmark run of task ``name`` (without ``--seed``)."""
  eval_every = eval_every or steps
  model = list(QUICK_MODEL + (QUICK_LLAMA if name.startswith("llama") else [])) if quick else []
  model += list(extra)
  options = ["--steps", str(steps), "--batch-size", str(batch_size),
             "--eval-every", str(eval_every), "--checkpoint-every", str(steps),
             "--log-every", str(min(10, eval_every)),
             "--switch-every", str(switch_every(name, steps, model, block_epochs))]
  options += model
  if name.startswith("llama"):
    options += ["--gen-tokens", "0"]
  if name in PRETRAINED:
    options += ["--pretrain-steps",
                str(pretrain_steps or PRETRAIN_STEPS["quick" if quick else "full"][name])]
  return options


def count_blocks(task: training.Task, cfg) -> int:
  """BAdam's block count on ``task``, as the examples' optimizer labels the parameters."""
  from flax import nnx

  model = task.make_model()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  labels = registry.badam_labels(cfg, params, task)
  ids = {int(b) for lab in jax.tree.leaves(labels) for b in np.ravel(lab)}
  return len({b for b in ids if b >= 0})


def validation_task(task: training.Task, seed: int,
                    fraction: float = VALIDATION_FRACTION) -> training.Task:
  """``task`` with a validation split of its training examples in place of its held-out split
  (which the sweep never sees)."""
  n = len(task.train_data["weight"])
  order = np.random.default_rng(seed + 1000).permutation(n)
  n_val = max(1, int(round(fraction * n)))
  val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
  return dataclasses.replace(task, train_data={k: v[train] for k, v in task.train_data.items()},
                             eval_data={k: v[val] for k, v in task.train_data.items()},
                             after_training=None)


def majority_baseline(task: training.Task) -> dict | None:
  """Held-out accuracy and loss of a constant predictor of the training class frequencies."""
  labels = task.eval_data.get("labels")
  if labels is None:
    return None
  train = np.bincount(task.train_data["labels"], minlength=labels.max() + 1).astype(float)
  p = (train + 1) / (train + 1).sum()  # add-one: a class absent from training has a finite loss
  counts = np.bincount(labels, minlength=len(p))
  return {"eval_accuracy": float(counts.max() / len(labels)),
          "eval_loss": float(-(counts * np.log(p[:len(counts)])).sum() / len(labels))}


def learning_rates(path: pathlib.Path | None, name: str, optimizers: Sequence[str]) -> dict:
  """``optimizer -> {"lr", "source"}``: the sweep's choice for task ``name``, else the examples'
  default learning rate."""
  chosen = {}
  if path is not None and pathlib.Path(path).is_file():
    result = json.loads(pathlib.Path(path).read_text())
    for t in result["tasks"] + result.get("partial", []):  # a stopped sweep: what it chose
      if t["task"] == name:
        chosen = t.get("chosen", {})
  return {opt: ({"lr": chosen[opt], "source": "sweep"} if opt in chosen else
                {"lr": registry.get(opt).learning_rate, "source": "default"})
          for opt in optimizers}


# ---------------------------------------------------------------------------------------------
# One run's curves.


def timeline(records: Sequence[dict]) -> dict:
  """Train loss and eval loss against step and measured time, from a run's ``metrics.jsonl``.

  A flushed record carries the mean step time of the steps logged since the previous flush; the
  first step of a run (compilation) is not timed and counts 0 s. Returns ``steps``, ``loss``,
  ``time`` per train step, ``eval_steps``, ``eval_loss``, ``eval_time`` per evaluation (seconds
  of training since the end of the first step) and the total ``train_time``.
  """
  train = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
  dt, last = [0.0] * len(train), 0.0
  for i in range(len(train) - 1, -1, -1):  # each step takes the time of the flush that logs it
    last = train[i].get("step_time", last)
    dt[i] = 0.0 if train[i]["step"] == 1 else last
  time_at = dict(zip((r["step"] for r in train), np.cumsum(dt).tolist(), strict=True))
  evals = [r for r in records if "eval_loss" in r]
  return {"steps": [r["step"] for r in train], "loss": [r["loss"] for r in train],
          "time": [time_at[r["step"]] for r in train],
          "eval_steps": [r["step"] for r in evals], "eval_loss": [r["eval_loss"] for r in evals],
          "eval_time": [time_at.get(r["step"], 0.0) for r in evals],
          "train_time": float(sum(dt))}


def steady_time(curve: dict, median_step_s: float | None) -> dict:
  """``curve`` with ``steady_time`` / ``eval_steady_time``: the time of a step at the run's median
  step time, ``(step - 1) * median``, i.e. the measured time without the compilations that a long
  run amortises (BAdam's block step compiles once per block inside the run, which dominates the
  measured time of a short run on a loaded machine)."""
  m = median_step_s or 0.0
  return curve | {"steady_time": [(s - 1) * m for s in curve["steps"]],
                  "eval_steady_time": [(s - 1) * m for s in curve["eval_steps"]]}


def time_to_reach(curve: dict, target: float) -> dict | None:
  """The first evaluation at or below ``target``: its step, measured time and time at the median
  step time (see :func:`steady_time`), else None."""
  for i, (s, loss) in enumerate(zip(curve["eval_steps"], curve["eval_loss"], strict=True)):
    if loss <= target:
      return {"step": s, "time_s": curve["eval_time"][i],
              "steady_time_s": curve["eval_steady_time"][i]}
  return None


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds and the targets.


def _stats(values: Sequence[float | None]) -> dict:
  v = np.array([x for x in values if x is not None], float)
  if not len(v):
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "n": int(len(v))}


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict]:
  """Per optimizer: mean/std over seeds of the summary figures and of the time to target."""
  out = {}
  for opt, per_seed in runs.items():
    row = {k: _stats([r["summary"].get(k) for r in per_seed])
           for k in ("final_loss", "eval_loss", "eval_accuracy", "median_step_s")}
    row["train_time_s"] = _stats([r["curve"]["train_time"] for r in per_seed])
    row["opt_state_bytes"] = per_seed[0]["summary"]["opt_state_bytes"]
    reached = [r["reach_adamw"] for r in per_seed if r.get("reach_adamw") is not None]
    row["reach_adamw"] = {"reached": len(reached), "of": len(per_seed),
                          "time_s": _stats([r["time_s"] for r in reached]),
                          "steady_time_s": _stats([r["steady_time_s"] for r in reached]),
                          "step": _stats([r["step"] for r in reached])}
    out[opt] = row
  return out


def _verdict(diffs: Sequence[float], bound: float) -> tuple[str, dict]:
  """A target ``d <= bound`` on paired per-seed differences ``d``: met or missed, and whether the
  verdict holds beyond the spread (the whole band mean +- std on the verdict's side)."""
  s = _stats(diffs)
  if s["mean"] is None:
    return "not measured", s
  mean, std = s["mean"], s["std"]
  if mean <= bound:
    verdict = "met beyond the spread" if mean + std <= bound else "met within the spread"
  else:
    verdict = "missed beyond the spread" if mean - std > bound else "missed within the spread"
  return verdict, s


def targets(name: str, runs: dict[str, list[dict]], majority: float | None) -> list[dict]:
  """The issue's targets, paired by seed: AdamW learns (classification), BAdam against AdamW
  (and against AdamW on BAdam's trainable set), AdaRankGrad against GaLore."""
  ev = {opt: [r["summary"]["eval_loss"] for r in rs] for opt, rs in runs.items()}
  acc = {opt: [r["summary"].get("eval_accuracy") for r in rs] for opt, rs in runs.items()}
  classification = majority is not None
  out = []

  def add(target, diffs, bound, fmt, assessed=True):
    verdict, s = _verdict(diffs, bound)
    if not assessed:
      verdict = "not assessed: adamw does not clearly learn this task"
    out.append({"target": target, "value": fmt(s), "verdict": verdict,
                "met": assessed and s["mean"] <= bound,
                "beyond_spread": assessed and verdict.endswith("beyond the spread"),
                "assessed": assessed, "diffs": list(diffs)})

  learns = True
  if classification and "adamw" in runs:
    # d = majority + margin - accuracy <= 0
    add(f"adamw learns: held-out accuracy >= majority share + {LEARNS_MARGIN:.2f}",
        [majority + LEARNS_MARGIN - a for a in acc["adamw"]], 0.0,
        lambda s: f"{-s['mean']:+.3f} +- {s['std']:.3f} over {majority + LEARNS_MARGIN:.3f}")
    learns = out[-1]["met"]
  loss_gap = BADAM_LOSS_GAP["classification" if classification else "lm"]
  for ref in ("adamw", "adamw_layers"):
    if {"badam", ref} <= ev.keys():
      add(f"badam's held-out loss within {100 * loss_gap:.0f}% of {ref}'s (or better)",
          [b / a - 1 for a, b in zip(ev[ref], ev["badam"], strict=True)], loss_gap,
          lambda s: f"{100 * s['mean']:+.1f}% +- {100 * s['std']:.1f}%", learns)
      if classification:
        add(f"badam's held-out accuracy within {100 * BADAM_ACC_GAP:.0f} points of {ref}'s "
            "(or better)", [a - b for a, b in zip(acc[ref], acc["badam"], strict=True)],
            BADAM_ACC_GAP, lambda s: f"{-100 * s['mean']:+.1f} +- {100 * s['std']:.1f} points",
            learns)
  if {"adarankgrad", "galore"} <= ev.keys():
    add(f"adarankgrad's held-out loss at most {ADARANKGRAD_RATIO:.2f}x galore's (equal max rank)",
        [a / g for a, g in zip(ev["adarankgrad"], ev["galore"], strict=True)], ADARANKGRAD_RATIO,
        lambda s: f"{s['mean']:.3f}x +- {s['std']:.3f}")
  return out


# ---------------------------------------------------------------------------------------------
# Running.


def reusable_runs(paths: Sequence[pathlib.Path]) -> dict:
  """``(task, options, seed, optimizer, learning rate) -> run`` of earlier results (``--reuse``)."""
  found = {}
  for path in paths:
    for t in json.loads(pathlib.Path(path).read_text())["tasks"]:
      lrs = t.get("learning_rates", {})
      for opt, per_seed in t["runs"].items():
        for r in per_seed:
          found[(t["task"], tuple(t["config_overrides"]), r["seed"], opt,
                 lrs.get(opt, {}).get("lr"))] = {
              **r, "majority_accuracy": t.get("majority_accuracy"),
              "majority": r.get("majority"), "blocks": t.get("blocks")}
  return found


def run_task(name: str, overrides: list[str], optimizers: Sequence[str], seeds: Sequence[int],
             runs_dir: pathlib.Path, png: pathlib.Path, reuse: dict | None = None,
             rerun: Sequence[str] = (), lrs: dict | None = None,
             model_seed: int | None = MODEL_SEED) -> dict:
  """Every optimizer on task ``name`` for each seed (optimizers of a seed back to back), each at
  its learning rate in ``lrs`` (``optimizer -> {"lr", "source"}``; default: the examples'); runs
  found in ``reuse`` (same task, options, seed, optimizer and rate) are taken from there.

  ``model_seed``: the examples' seed of the task itself (held-out split, tokenizer, pretraining,
  initialisation), shared by every fine-tuning seed, as the papers fine-tune one pretrained model
  with several seeds; None: each seed builds its own task.
  """
  module = TASKS[name]
  lrs = lrs or learning_rates(None, name, optimizers)
  runs: dict[str, list[dict]] = {opt: [] for opt in optimizers}
  majority, baseline = [], []
  blocks = None
  reuse = reuse or {}
  tasks: dict[int, training.Task] = {}
  for seed in seeds:
    built = seed if model_seed is None else model_seed
    cfg = cli.parse_config(
        module.Config, overrides + ["--seed", str(built), "--out", str(runs_dir / name / str(built))],
        module.__doc__.splitlines()[0])
    earlier = {opt: reuse.get((name, tuple(overrides), seed, opt, lrs[opt]["lr"]))
               if opt not in rerun else None for opt in optimizers}
    task = None
    if not all(earlier.values()):
      if built not in tasks:  # split, tokenizer and (pre)trained init
        tasks[built] = module.build_task(cfg)
      task = tasks[built]
      base = majority_baseline(task)
      if blocks is None and "badam" in optimizers:
        blocks = count_blocks(task, cfg)
    else:
      first = next(iter(earlier.values()))
      base, blocks = first.get("majority"), blocks or first.get("blocks")
    if base is not None:
      majority.append(base["eval_accuracy"])
      baseline.append(base)
    for opt in optimizers:
      if earlier[opt]:
        r = earlier[opt]
        runs[opt].append({"seed": seed, "summary": r["summary"], "reused": True, "majority": base,
                          "curve": steady_time(r["curve"], r["summary"]["median_step_s"])})
        continue
      out = runs_dir / name / str(seed) / opt
      # The fine-tuning seed: data order, BAdam's block order, LoRA's adapters.
      summary = training.train(dataclasses.replace(cfg, seed=seed, learning_rate=lrs[opt]["lr"]),
                               task, opt, out)
      curve = steady_time(timeline([json.loads(line) for line in (out / "metrics.jsonl").open()]),
                          summary["median_step_s"])
      runs[opt].append({"seed": seed, "summary": summary, "curve": curve, "majority": base})
      print(f"{name}/seed {seed}/{opt} (lr {lrs[opt]['lr']:g}): final loss "
            f"{summary['final_loss']:.4f}, eval loss {summary['eval_loss']:.4f}"
            + (f", accuracy {summary['eval_accuracy']:.3f}" if "eval_accuracy" in summary else "")
            + f", {curve['train_time']:.0f} s", flush=True)
    if "adamw" in runs:
      target = runs["adamw"][-1]["summary"]["eval_loss"]
      for opt in optimizers:
        runs[opt][-1]["reach_adamw"] = time_to_reach(runs[opt][-1]["curve"], target)
  plot(name, runs, png, title=f"{name}: {cfg.steps} steps, batch {cfg.batch_size}, "
       f"{len(seeds)} seeds (mean)")
  maj = float(np.mean(majority)) if majority else None
  return {"task": name, "config_overrides": overrides, "steps": cfg.steps,
          "batch_size": cfg.batch_size, "rank": cfg.rank, "eval_every": cfg.eval_every,
          "pretrain_steps": getattr(cfg, "pretrain_steps", 0),
          "switch_every": cfg.switch_every, "blocks": blocks,
          "block_epochs": cfg.steps / (cfg.switch_every * blocks) if blocks else None,
          "learning_rates": lrs, "seeds": list(seeds), "model_seed": model_seed,
          "plot": png.name,
          "majority_accuracy": maj,
          "majority": ({k: _stats([b[k] for b in baseline]) for k in baseline[0]}
                       if baseline else None),
          "runs": runs, "aggregate": aggregate(runs), "targets": targets(name, runs, maj)}


def sweep_task(name: str, overrides: list[str], optimizers: Sequence[str], seed: int,
               factors: Sequence[float], runs_dir: pathlib.Path,
               model_seed: int | None = MODEL_SEED, reuse: dict | None = None,
               on_row: Callable[[dict], None] | None = None, extend: int = SWEEP_EXTEND) -> dict:
  """Each optimizer at ``factors`` x its default learning rate, trained on the training split
  minus a validation split and evaluated on that validation split; the chosen rate has the
  lowest validation loss (where it is at an end of the grid, the grid is extended beyond it, at
  most ``extend`` rates). Rows found in ``reuse`` (same task, options, seed, optimizer and rate)
  are taken from there; ``on_row(partial result)`` is called after each row."""
  module = TASKS[name]
  reuse = reuse or {}
  built = seed if model_seed is None else model_seed
  cfg = cli.parse_config(
      module.Config, overrides + ["--seed", str(built), "--out", str(runs_dir / name / str(built))],
      module.__doc__.splitlines()[0])
  task = None
  rows, chosen = [], {}

  def run(opt: str, lr: float) -> dict:
    nonlocal task
    earlier = reuse.get((name, tuple(overrides), seed, opt, lr))
    if earlier is not None:
      rows.append(earlier | {"reused": True})
      return rows[-1]
    if task is None:
      task = validation_task(module.build_task(cfg), built)
    out = runs_dir / name / f"sweep-{seed}" / f"{opt}-{lr:g}"
    summary = training.train(dataclasses.replace(cfg, seed=seed, learning_rate=lr), task, opt, out)
    rows.append({"optimizer": opt, "learning_rate": lr, "seed": seed,
                 "validation_loss": summary["eval_loss"],
                 "validation_accuracy": summary.get("eval_accuracy"),
                 "final_loss": summary["final_loss"], "median_step_s": summary["median_step_s"],
                 "train_examples": int(len(task.train_data["weight"])),
                 "validation_examples": int(len(task.eval_data["weight"]))})
    print(f"sweep {name}/{opt} lr {lr:g}: validation loss {summary['eval_loss']:.4f}", flush=True)
    if on_row is not None:
      on_row({"task": name, "config_overrides": overrides, "seed": seed, "model_seed": model_seed,
              "steps": cfg.steps, "train_examples": rows[-1]["train_examples"],
              "validation_examples": rows[-1]["validation_examples"], "factors": list(factors),
              "rows": rows, "chosen": dict(chosen)})
    return rows[-1]

  def key(r):
    return (not np.isfinite(r["validation_loss"]), r["validation_loss"])

  for opt in optimizers:
    default = registry.get(opt).learning_rate
    done = {lr: run(opt, lr) for lr in sorted({float(f"{default * f:.3g}") for f in factors})}
    # A best rate at an end of the grid: one more rate beyond it (a factor 3), at most
    # ``extend`` times, so that the choice is not the grid's edge.
    for _ in range(extend if len(done) > 1 else 0):
      best = min(done.values(), key=key)["learning_rate"]
      lo, hi = min(done), max(done)
      if best not in (lo, hi):
        break
      lr = float(f"{(lo / 3 if best == lo else hi * 3):.3g}")
      done[lr] = run(opt, lr)
    chosen[opt] = min(done.values(), key=key)["learning_rate"]
  return {"task": name, "config_overrides": overrides, "seed": seed, "model_seed": model_seed,
          "steps": cfg.steps, "train_examples": rows[0]["train_examples"],
          "validation_examples": rows[0]["validation_examples"],
          "factors": list(factors), "rows": rows, "chosen": chosen}


def reusable_sweep_rows(paths: Sequence[pathlib.Path]) -> dict:
  """``(task, options, seed, optimizer, learning rate) -> row`` of earlier (possibly incomplete)
  sweep JSONs."""
  found = {}
  for path in paths:
    result = json.loads(pathlib.Path(path).read_text())
    for t in result["tasks"] + result.get("partial", []):
      for r in t["rows"]:
        found[(t["task"], tuple(t["config_overrides"]), r["seed"], r["optimizer"],
               r["learning_rate"])] = {k: v for k, v in r.items() if k != "reused"}
  return found


def sweep_header(t: dict) -> str:
  rows = t["rows"][0] if t["rows"] else {}
  return (f"*{t['task']}*, seed {t['seed']}: {t.get('steps', '?')} steps, trained on "
          f"{t.get('train_examples', rows.get('train_examples', '?'))} examples, the learning rate "
          f"of lowest loss on {t.get('validation_examples', rows.get('validation_examples', '?'))} "
          "validation examples chosen (held out of the training "
          f"split; the benchmark's held-out split is not used); options "
          f"`{' '.join(t['config_overrides'])}`:")


def _chosen_mark(t: dict, r: dict) -> str:
  """``**chosen**`` on the chosen row, and whether it is at an end of the grid (where a wider grid
  could choose differently)."""
  if t.get("chosen", {}).get(r["optimizer"]) != r["learning_rate"]:
    return ""
  rates = sorted(x["learning_rate"] for x in t["rows"] if x["optimizer"] == r["optimizer"])
  edge = ("lowest" if r["learning_rate"] == rates[0] else
          "highest" if r["learning_rate"] == rates[-1] else "")
  return "**chosen**" + (f" (the grid's {edge} rate)" if edge and len(rates) > 1 else "")


def sweep_summary(t: dict) -> str:
  """Each optimizer at its chosen rate: validation loss (and accuracy) and the loss relative to
  AdamW's and to AdamW's on BAdam's trainable set (one seed: a first look, not the benchmark)."""
  best = {opt: next(r for r in t["rows"] if r["optimizer"] == opt and r["learning_rate"] == lr)
          for opt, lr in t["chosen"].items()}
  refs = [o for o in ("adamw", "adamw_layers") if o in best]
  has_acc = any(r["validation_accuracy"] is not None for r in best.values())
  headers = (["optimizer", "chosen rate", "validation loss"]
             + (["validation accuracy"] if has_acc else []) + [f"loss / {o}'s" for o in refs])
  rows = [[opt, f"{r['learning_rate']:g}", f"{r['validation_loss']:.4f}"]
          + ([f"{r['validation_accuracy']:.3f}"] if has_acc else [])
          + [f"{r['validation_loss'] / best[o]['validation_loss']:.3f}" for o in refs]
          for opt, r in best.items()]
  return bc.markdown_table(headers, rows)


def sweep_table(t: dict) -> str:
  if t.get("chosen"):
    return sweep_summary(t) + "\n\nEvery rate tried:\n\n" + _sweep_rows(t)
  return _sweep_rows(t)


def _sweep_rows(t: dict) -> str:
  has_acc = any(r["validation_accuracy"] is not None for r in t["rows"])
  headers = (["optimizer", "peak learning rate", "validation loss"]
             + (["validation accuracy"] if has_acc else []) + ["final train loss", "chosen"])
  rows = [[r["optimizer"], f"{r['learning_rate']:g}", f"{r['validation_loss']:.4f}"]
          + ([f"{r['validation_accuracy']:.3f}"] if has_acc else [])
          + [f"{r['final_loss']:.4f}", _chosen_mark(t, r)] for r in t["rows"]]
  return bc.markdown_table(headers, rows)


def plot(name: str, runs: dict[str, list[dict]], png: pathlib.Path, title: str) -> None:
  """Loss against step (left) and measured time (right): the seeds' mean train loss (smoothed)
  and mean eval loss (dots), one colour per optimizer."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for i, (opt, per_seed) in enumerate(runs.items()):
    color = f"C{i}"
    n = min(len(r["curve"]["loss"]) for r in per_seed)
    loss = np.mean([r["curve"]["loss"][:n] for r in per_seed], axis=0)
    steps = np.array(per_seed[0]["curve"]["steps"][:n])
    t = np.mean([r["curve"]["steady_time"][:n] for r in per_seed], axis=0)
    w = max(n // 30, 5) if n >= 10 else 1
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ev_steps = per_seed[0]["curve"]["eval_steps"]
    ev = np.mean([r["curve"]["eval_loss"] for r in per_seed], axis=0)
    ev_t = np.mean([r["curve"]["eval_steady_time"] for r in per_seed], axis=0)
    for ax, x, ex in ((axes[0], steps, ev_steps), (axes[1], t, ev_t)):
      ax.plot(x, loss, color=color, alpha=0.25, lw=0.7)
      ax.plot(x[w - 1:], smooth, color=color, label=f"{opt} (train)")
      ax.plot(ex, ev, "o--", color=color, ms=3, label=f"{opt} (eval)")
  axes[0].set(xlabel="step", ylabel="loss")
  axes[1].set(xlabel="training time at the run's median step time (s)")
  axes[1].legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Tables.


def _pm(s: dict, spec: str, scale: float = 1.0, unit: str = "") -> str:
  if s is None or s.get("mean") is None:
    return "n/a"
  return f"{scale * s['mean']:{spec}} ± {scale * s['std']:{spec}}{unit}"


def task_table(result: dict) -> str:
  agg = result["aggregate"]
  has_acc = any(a["eval_accuracy"]["n"] for a in agg.values())
  headers = (["optimizer", "peak lr", "final train loss", "held-out loss"]
             + (["held-out accuracy"] if has_acc else [])
             + ["optimizer state", "median step", "measured training time",
                "time to adamw's final held-out loss (at median step time; measured)"])
  rows = []
  lrs = result.get("learning_rates", {})
  for opt, a in agg.items():
    reach = a["reach_adamw"]
    if reach["reached"]:
      to = (f"{_pm(reach['steady_time_s'], '.1f', unit=' s')}; "
            f"{_pm(reach['time_s'], '.0f', unit=' s')} (step {reach['step']['mean']:.0f}; "
            f"{reach['reached']}/{reach['of']} seeds)")
    else:
      to = f"not reached (0/{reach['of']} seeds)"
    lr = lrs.get(opt)
    rows.append([opt, f"{lr['lr']:g} ({lr['source']})" if lr else "",
                 _pm(a["final_loss"], ".4f"), _pm(a["eval_loss"], ".4f")]
                + ([_pm(a["eval_accuracy"], ".3f")] if has_acc else [])
                + [bc.gb(a["opt_state_bytes"]), _pm(a["median_step_s"], ".0f", 1e3, " ms"),
                   _pm(a["train_time_s"], ".0f", unit=" s"), to])
  if result.get("majority"):
    m = result["majority"]
    rows.append(["majority class (constant: training class frequencies)", "", "",
                 _pm(m["eval_loss"], ".4f"), _pm(m["eval_accuracy"], ".3f"), "", "", "", ""])
  table = bc.markdown_table(headers, rows)
  tgt = bc.markdown_table(["target (paired by seed)", "measured (mean ± std)", "verdict"],
                          [[t["target"], t["value"], t["verdict"]] for t in result["targets"]])
  return table + "\n\n" + tgt


def task_header(t: dict) -> str:
  badam = (f", BAdam switching every {t['switch_every']} steps over {t['blocks']} blocks "
           f"({t['block_epochs']:.1f} block-epochs)" if t.get("blocks") else "")
  pre = f", pretrained for {t['pretrain_steps']} AdamW steps" if t.get("pretrain_steps") else ""
  return (f"*{t['task']}*: {t['steps']} steps, batch {t['batch_size']}{pre}, seeds "
          f"{', '.join(map(str, t['seeds']))}, rank {t['rank']} (GaLore rank = AdaRankGrad max "
          f"rank), evaluation every {t['eval_every']} steps{badam}"
          + (f", majority-class accuracy {t['majority_accuracy']:.3f}"
             if t.get("majority_accuracy") is not None else "") + ":")


def main(argv: Sequence[str] | None = None) -> dict:
  argv = list(argv) if argv is not None else sys.argv[1:]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bc.add_output_args(parser, "convergence")
  parser.add_argument("--sweep", action="store_true",
                      help="the learning-rate sweep on a validation split (writes "
                      f"{SWEEP_OUT.name} unless --out is given) instead of the benchmark")
  parser.add_argument("--learning-rates", type=pathlib.Path, default=SWEEP_OUT,
                      help="the sweep's JSON whose chosen rates the benchmark uses (default "
                      f"{SWEEP_OUT.name}; optimizers it lacks get the examples' default)")
  parser.add_argument("--tasks", nargs="*", default=None, choices=tuple(TASKS),
                      help=f"default: {', '.join(DEFAULT_TASKS)}; --quick: {', '.join(QUICK_TASKS)}")
  parser.add_argument("--optimizers", nargs="*", default=list(DEFAULT_OPTIMIZERS),
                      choices=registry.OPTIMIZERS)
  parser.add_argument("--seeds", type=int, nargs="*", default=None,
                      help="default 0 1 2 (--quick: 0 1; --sweep: 0)")
  parser.add_argument("--steps", type=int, default=None, help="steps (default 200; --quick: 10)")
  parser.add_argument("--eval-every", type=int, default=None,
                      help="evaluate every this many steps (default steps/10, --quick: steps/2)")
  parser.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick: 8)")
  parser.add_argument("--pretrain-steps", type=int, default=None,
                      help="AdamW pretraining steps of the *-pretrained tasks (default "
                      f"{PRETRAIN_STEPS['full']['roberta-pretrained']}, --quick: 10); cached by the "
                      "examples in runs/pretrained ($OPTAX_MEMOPT_PRETRAIN_CACHE)")
  parser.add_argument("--model-seed", type=int, default=MODEL_SEED,
                      help="the examples' seed of every task's split, tokenizer, pretraining and "
                      "initialisation, shared by all seeds (-1: each seed its own)")
  parser.add_argument("--block-epochs", type=int, default=BLOCK_EPOCHS,
                      help="BAdam's switch_every is chosen so that a run covers at least this "
                      "many block-epochs")
  parser.add_argument("--runs-dir", type=pathlib.Path, default=None,
                      help="where the examples' run directories go (default: a temporary one)")
  parser.add_argument("--task-args", default="",
                      help="extra example options for every task, e.g. '--num-layers 1'")
  parser.add_argument("--rerun", nargs="*", default=[], choices=registry.OPTIMIZERS,
                      help="optimizers to run again even if --reuse has them (e.g. after a "
                      "change of their defaults)")
  parser.add_argument("--reuse", type=pathlib.Path, nargs="*", default=[],
                      help="earlier result JSONs: their runs with the same task options, seed, "
                      "optimizer and learning rate are taken from there instead of being run again "
                      "(e.g. to add an optimizer, or to merge tasks run in separate processes)")
  args = parser.parse_args(argv)
  if args.sweep and "--out" not in argv:
    args.out = args.out.with_name(SWEEP_OUT.name)
  steps = args.steps or (10 if args.quick else 200)
  eval_every = args.eval_every or max(1, steps // (2 if args.quick else 10))
  batch_size = args.batch_size or (8 if args.quick else 16)
  tasks = args.tasks or list(QUICK_TASKS if args.quick else DEFAULT_TASKS)
  seeds = args.seeds if args.seeds is not None else (
      [0] if args.sweep else [0, 1] if args.quick else [0, 1, 2])
  model_seed = None if args.model_seed < 0 else args.model_seed
  env = bc.environment()
  start = time.perf_counter()
  runs_dir = args.runs_dir or pathlib.Path(tempfile.mkdtemp(prefix="convergence_"))
  command = " ".join(["python -m benchmarks.convergence", *map(shlex.quote, argv)])
  result = {"benchmark": "convergence_sweep" if args.sweep else "convergence",
            "quick": args.quick, "environment": env, "command": command, "tasks": [],
            "reused": [str(p) for p in args.reuse],
            "reused_environments": [json.loads(p.read_text())["environment"] for p in args.reuse]}
  if not args.sweep:
    result["learning_rates_from"] = (str(args.learning_rates) if args.learning_rates.is_file()
                                     else None)
  for name in tasks:
    overrides = task_options(name, steps, batch_size, args.quick, eval_every,
                             args.pretrain_steps, args.task_args.split(), args.block_epochs)
    if args.sweep:
      factors = QUICK_SWEEP_FACTORS if args.quick else SWEEP_FACTORS
      for seed in seeds:
        partial = lambda t: bc.write_json(  # noqa: E731 - an interrupted sweep keeps its rows
            args.out, result | {"complete": False, "partial": [t], "table": "\n\n".join(
                [bc.environment_header(env)] + [sweep_header(x) + "\n\n" + sweep_table(x)
                                                for x in result["tasks"] + [t]])})
        result["tasks"].append(sweep_task(name, overrides, args.optimizers, seed, factors,
                                          runs_dir, model_seed, reusable_sweep_rows(args.reuse),
                                          partial, 0 if args.quick else SWEEP_EXTEND))
    else:
      png = args.out.with_name(f"{args.out.stem}_{name}.png")
      png.parent.mkdir(parents=True, exist_ok=True)
      lrs = learning_rates(args.learning_rates, name, args.optimizers)
      result["tasks"].append(run_task(name, overrides, args.optimizers, seeds, runs_dir, png,
                                      reusable_runs(args.reuse), args.rerun, lrs, model_seed))
    bc.write_json(args.out, result | {"complete": False})
  result["wall_s"] = time.perf_counter() - start
  result["complete"] = True
  parts = [bc.environment_header(env)]
  for t in result["tasks"]:
    if args.sweep:
      parts.append(sweep_header(t))
      parts.append(sweep_table(t))
    else:
      parts.append(task_header(t) + f" options `{' '.join(t['config_overrides'])}`; "
                   f"curves: {t['plot']}")
      parts.append(task_table(t))
  result["table"] = "\n\n".join(parts)
  bc.write_json(args.out, result)
  print(result["table"])
  return result


if __name__ == "__main__":
  main()
