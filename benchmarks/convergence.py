"""Held-out loss of each optimizer on the examples' tasks over several seeds, against steps and time.

The tasks are the examples' own, built and trained by ``examples/training.py`` (``build_task`` and
``train``): Llama instruction tuning on the offline pydoc instruction set (loss on the response
tokens), and RoBERTa sequence classification of pydoc paragraphs (three classes). ``llama`` and
``roberta`` train small randomly initialised models (BAdam also trains the embedding and the
head, as the examples do). ``llama-pretrained`` and ``roberta-pretrained`` are the papers'
setting, fine-tuning a pretrained model: the random-init model is first pretrained with AdamW on
the Python reference manual (causal language modelling on the paragraphs that are not responses
for Llama, masked language modelling on the paragraphs that are not held out for RoBERTa;
``--pretrain-steps``), then fine-tuned by every optimizer from the same weights, with BAdam's
embedding (and Llama's LM head) frozen. ``badam`` is the examples' BAdam, trained with the block
step (``make_block_step``). GaLore and AdaRankGrad get the same rank (GaLore's rank, AdaRankGrad's
maximum rank).

Every task x optimizer cell runs once per seed. A seed is the examples' ``--seed``: the model's
initialisation (and the pretraining's), the held-out split, the data order, BAdam's block order
and LoRA's adapters; all optimizers of one seed share it, and run one after the other, so they
also share the machine's load. Tables give mean +- std over the seeds; each target is checked on
the per-seed differences (paired by seed) and says whether it holds beyond their spread (mean +-
one std on the target's side).

Time: two clocks. The measured time is the cumulative time of the training steps (the first step,
which compiles, and the evaluations are left out; BAdam's block step compiles once per block
inside the run, and those compilations are counted). The time at the median step time, ``(step -
1) x`` the run's median step time, leaves out the compilations a long run amortises; the plots use
it, so curves against time show what BAdam's cheaper steps buy. The time to reach AdamW's final
held-out loss (same seed) is read at the evaluations (every ``--eval-every`` steps), on both
clocks.

Writes the JSON and one PNG per task (loss against step and against time), next to the JSON.

    python -m benchmarks.convergence            # examples' default models, 200 steps, 3 seeds
    python -m benchmarks.convergence --quick    # roberta-pretrained, 2-layer model, 10 steps, 2 seeds
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import _common as bc
from examples import config, finetune_llama, finetune_roberta, training

TASKS = {"llama": finetune_llama, "llama-pretrained": finetune_llama, "roberta": finetune_roberta,
         "roberta-pretrained": finetune_roberta}
PRETRAINED = ("llama-pretrained", "roberta-pretrained")
# Pretraining steps (AdamW, once per task and seed; every optimizer starts from the same weights).
PRETRAIN_STEPS = {"full": {"llama-pretrained": 600, "roberta-pretrained": 600},
                  "quick": {"llama-pretrained": 10, "roberta-pretrained": 10}}
DEFAULT_OPTIMIZERS = ("adamw", "badam", "lora", "galore", "adarankgrad")
QUICK_TASKS = ("roberta-pretrained",)  # quick: one task, under 2 minutes
QUICK_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--intermediate-size", "128",
               "--num-heads", "2", "--max-examples", "400", "--seq-len", "64"]
QUICK_LLAMA = ["--num-kv-heads", "1"]
BADAM_GAP = 0.02  # the target: BAdam's held-out loss within 2% of AdamW's


def task_options(name: str, steps: int, batch_size: int, quick: bool,
                 eval_every: int | None = None, pretrain_steps: int | None = None) -> list[str]:
  """The example options of a benchmark run of task ``name`` (without ``--seed``)."""
  eval_every = eval_every or steps
  options = ["--steps", str(steps), "--batch-size", str(batch_size),
             "--eval-every", str(eval_every), "--checkpoint-every", str(steps),
             "--log-every", str(min(10, eval_every)),
             # quick: few block switches, so that few BAdam block steps are compiled; else ten
             # switches per run (the examples' 20 steps per block at 200 steps)
             "--switch-every", str(max(steps // 2, 1) if quick else max(steps // 10, 1))]
  if quick:
    options += QUICK_MODEL + (QUICK_LLAMA if name.startswith("llama") else [])
  if name.startswith("llama"):
    options += ["--gen-tokens", "0"]
  if name in PRETRAINED:
    options += ["--pretrain-steps",
                str(pretrain_steps or PRETRAIN_STEPS["quick" if quick else "full"][name])]
  return options


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
  mean, std = s["mean"], s["std"]
  if mean <= bound:
    verdict = "met beyond the spread" if mean + std <= bound else "met within the spread"
  else:
    verdict = "missed beyond the spread" if mean - std > bound else "missed within the spread"
  return verdict, s


def targets(name: str, runs: dict[str, list[dict]], majority: float | None) -> list[dict]:
  """The issue's targets on the held-out loss, paired by seed."""
  ev = {opt: [r["summary"]["eval_loss"] for r in rs] for opt, rs in runs.items()}
  out = []

  def add(target, diffs, bound, fmt):
    verdict, s = _verdict(diffs, bound)
    out.append({"target": target, "value": fmt(s), "verdict": verdict, "met": s["mean"] <= bound,
                "beyond_spread": verdict.endswith("beyond the spread"), "diffs": list(diffs)})

  if {"badam", "adamw"} <= ev.keys():
    add(f"badam's held-out loss within {100 * BADAM_GAP:.0f}% of adamw's (or better)",
        [b / a - 1 for a, b in zip(ev["adamw"], ev["badam"], strict=True)], BADAM_GAP,
        lambda s: f"{100 * s['mean']:+.1f}% +- {100 * s['std']:.1f}%")
  if {"badam", "lora"} <= ev.keys():
    add("badam's held-out loss below lora's",
        [b - lo for b, lo in zip(ev["badam"], ev["lora"], strict=True)], 0.0,
        lambda s: f"{s['mean']:+.4f} +- {s['std']:.4f}")
  if {"adarankgrad", "galore"} <= ev.keys():
    add("adarankgrad's held-out loss at most galore's (equal max rank)",
        [a - g for a, g in zip(ev["adarankgrad"], ev["galore"], strict=True)], 0.0,
        lambda s: f"{s['mean']:+.4f} +- {s['std']:.4f}")
  if majority is not None and "adarankgrad" in runs:
    acc = [r["summary"]["eval_accuracy"] for r in runs["adarankgrad"]]
    # d = majority - accuracy <= -0.01: at least one point above the majority class.
    add("adarankgrad learns: held-out accuracy above the majority class's",
        [majority - a for a in acc], -0.01,
        lambda s: f"{-s['mean']:+.3f} +- {s['std']:.3f} over {majority:.3f}")
  return out


# ---------------------------------------------------------------------------------------------
# Running.


def reusable_runs(paths: Sequence[pathlib.Path]) -> dict:
  """``(task, options, seed, optimizer) -> run`` of earlier results (``--reuse``)."""
  found = {}
  for path in paths:
    for t in json.loads(pathlib.Path(path).read_text())["tasks"]:
      for opt, per_seed in t["runs"].items():
        for r in per_seed:
          found[(t["task"], tuple(t["config_overrides"]), r["seed"], opt)] = {
              **r, "majority_accuracy": t.get("majority_accuracy")}
  return found


def run_task(name: str, overrides: list[str], optimizers: Sequence[str], seeds: Sequence[int],
             runs_dir: pathlib.Path, png: pathlib.Path, reuse: dict | None = None,
             rerun: Sequence[str] = ()) -> dict:
  """Every optimizer on task ``name`` for each seed (optimizers of a seed back to back); runs
  found in ``reuse`` (same task, options, seed and optimizer) are taken from there."""
  module = TASKS[name]
  runs: dict[str, list[dict]] = {opt: [] for opt in optimizers}
  majority = []
  reuse = reuse or {}
  for seed in seeds:
    cfg = config.parse_config(
        module.Config, overrides + ["--seed", str(seed), "--out", str(runs_dir / name / str(seed))],
        module.__doc__.splitlines()[0])
    earlier = {opt: reuse.get((name, tuple(overrides), seed, opt)) if opt not in rerun else None
               for opt in optimizers}
    task = None
    if not all(earlier.values()):
      task = module.build_task(cfg)  # split, tokenizer and (pre)trained init of this seed
      labels = task.eval_data.get("labels")
      if labels is not None:
        majority.append(float(np.bincount(labels).max() / len(labels)))
    elif next(iter(earlier.values()))["majority_accuracy"] is not None:
      majority.append(next(iter(earlier.values()))["majority_accuracy"])
    for opt in optimizers:
      if earlier[opt]:
        r = earlier[opt]
        runs[opt].append({"seed": seed, "summary": r["summary"], "reused": True,
                          "curve": steady_time(r["curve"], r["summary"]["median_step_s"])})
        continue
      out = runs_dir / name / str(seed) / opt
      summary = training.train(cfg, task, opt, out)
      curve = steady_time(timeline([json.loads(line) for line in (out / "metrics.jsonl").open()]),
                          summary["median_step_s"])
      runs[opt].append({"seed": seed, "summary": summary, "curve": curve})
      print(f"{name}/seed {seed}/{opt}: final loss {summary['final_loss']:.4f}, eval loss "
            f"{summary['eval_loss']:.4f}, {curve['train_time']:.0f} s", flush=True)
    if "adamw" in runs:
      target = runs["adamw"][-1]["summary"]["eval_loss"]
      for opt in optimizers:
        runs[opt][-1]["reach_adamw"] = time_to_reach(runs[opt][-1]["curve"], target)
  plot(name, runs, png, title=f"{name}: {cfg.steps} steps, batch {cfg.batch_size}, "
       f"{len(seeds)} seeds (mean)")
  return {"task": name, "config_overrides": overrides, "steps": cfg.steps,
          "batch_size": cfg.batch_size, "rank": cfg.rank, "eval_every": cfg.eval_every,
          "seeds": list(seeds), "plot": png.name,
          "majority_accuracy": float(np.mean(majority)) if majority else None,
          "runs": runs, "aggregate": aggregate(runs),
          "targets": targets(name, runs, float(np.mean(majority)) if majority else None)}


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
  headers = (["optimizer", "final train loss", "held-out loss"]
             + (["held-out accuracy"] if has_acc else [])
             + ["optimizer state", "median step", "measured training time",
                "time to adamw's final held-out loss (at median step time; measured)"])
  rows = []
  for opt, a in agg.items():
    reach = a["reach_adamw"]
    if reach["reached"]:
      to = (f"{_pm(reach['steady_time_s'], '.1f', unit=' s')}; "
            f"{_pm(reach['time_s'], '.0f', unit=' s')} (step {reach['step']['mean']:.0f}; "
            f"{reach['reached']}/{reach['of']} seeds)")
    else:
      to = f"not reached (0/{reach['of']} seeds)"
    rows.append([opt, _pm(a["final_loss"], ".4f"), _pm(a["eval_loss"], ".4f")]
                + ([_pm(a["eval_accuracy"], ".3f")] if has_acc else [])
                + [bc.gb(a["opt_state_bytes"]), _pm(a["median_step_s"], ".0f", 1e3, " ms"),
                   _pm(a["train_time_s"], ".0f", unit=" s"), to])
  table = bc.markdown_table(headers, rows)
  tgt = bc.markdown_table(["target (paired by seed)", "measured (mean ± std)", "verdict"],
                          [[t["target"], t["value"], t["verdict"]] for t in result["targets"]])
  return table + "\n\n" + tgt


def task_header(t: dict) -> str:
  return (f"*{t['task']}*: {t['steps']} steps, batch {t['batch_size']}, seeds "
          f"{', '.join(map(str, t['seeds']))}, rank {t['rank']} (GaLore rank = AdaRankGrad max "
          f"rank), evaluation every {t['eval_every']} steps"
          + (f", majority-class accuracy {t['majority_accuracy']:.3f}"
             if t.get("majority_accuracy") is not None else "") + ":")


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bc.add_output_args(parser, "convergence")
  parser.add_argument("--tasks", nargs="*", default=None, choices=tuple(TASKS),
                      help=f"default: all ({', '.join(TASKS)}); --quick: {', '.join(QUICK_TASKS)}")
  parser.add_argument("--optimizers", nargs="*", default=list(DEFAULT_OPTIMIZERS),
                      choices=config.OPTIMIZERS)
  parser.add_argument("--seeds", type=int, nargs="*", default=None,
                      help="default 0 1 2 (--quick: 0 1)")
  parser.add_argument("--steps", type=int, default=None, help="steps (default 200; --quick: 10)")
  parser.add_argument("--eval-every", type=int, default=None,
                      help="evaluate every this many steps (default steps/10, --quick: steps/2)")
  parser.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick: 8)")
  parser.add_argument("--pretrain-steps", type=int, default=None,
                      help="AdamW pretraining steps of the *-pretrained tasks (default 600, "
                      "--quick: 10)")
  parser.add_argument("--runs-dir", type=pathlib.Path, default=None,
                      help="where the examples' run directories go (default: a temporary one)")
  parser.add_argument("--task-args", default="",
                      help="extra example options for every task, e.g. '--num-layers 1'")
  parser.add_argument("--rerun", nargs="*", default=[], choices=config.OPTIMIZERS,
                      help="optimizers to run again even if --reuse has them (e.g. after a "
                      "change of their defaults)")
  parser.add_argument("--reuse", type=pathlib.Path, nargs="*", default=[],
                      help="earlier result JSONs: their runs with the same task options, seed and "
                      "optimizer are taken from there instead of being run again (e.g. to add an "
                      "optimizer, or to merge tasks run in separate processes)")
  args = parser.parse_args(argv)
  steps = args.steps or (10 if args.quick else 200)
  eval_every = args.eval_every or max(1, steps // (2 if args.quick else 10))
  batch_size = args.batch_size or (8 if args.quick else 16)
  tasks = args.tasks or list(QUICK_TASKS if args.quick else TASKS)
  seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
  env = bc.environment()
  start = time.perf_counter()
  runs_dir = args.runs_dir or pathlib.Path(tempfile.mkdtemp(prefix="convergence_"))
  result = {"benchmark": "convergence", "quick": args.quick, "environment": env, "tasks": [],
            "reused": [str(p) for p in args.reuse],
            "reused_environments": [json.loads(p.read_text())["environment"] for p in args.reuse]}
  for name in tasks:
    overrides = task_options(name, steps, batch_size, args.quick, eval_every,
                             args.pretrain_steps) + args.task_args.split()
    png = args.out.with_name(f"{args.out.stem}_{name}.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    result["tasks"].append(run_task(name, overrides, args.optimizers, seeds, runs_dir, png,
                                    reusable_runs(args.reuse), args.rerun))
    bc.write_json(args.out, result | {"complete": False})
  result["wall_s"] = time.perf_counter() - start
  result["complete"] = True
  parts = [bc.environment_header(env)]
  for t in result["tasks"]:
    parts.append(task_header(t) + f" options `{' '.join(t['config_overrides'])}`; "
                 f"curves: {t['plot']}")
    parts.append(task_table(t))
  result["table"] = "\n\n".join(parts)
  bc.write_json(args.out, result)
  print(result["table"])
  return result


if __name__ == "__main__":
  main()
